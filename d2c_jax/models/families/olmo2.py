"""OLMo 2: RMSNorms after attention and after the MLP (none before), and q/k RMSNorm
over the whole projection (before the split into heads)."""

from __future__ import annotations

from d2c_jax.models.families.base import LLAMA_HF_NAMES, Family, gguf_common, hf_common

OLMO2_HF_NAMES = {
    **{k: v for k, v in LLAMA_HF_NAMES.items() if k not in ("attn_norm", "mlp_norm")},
    "post_attn_norm": "post_attention_layernorm.weight",
    "post_mlp_norm": "post_feedforward_layernorm.weight",
}


def from_hf(cfg):
    return hf_common(cfg, "olmo2", norm_layout="post", qk_norm="projection")


def from_gguf(get, tensor_names):
    return gguf_common(get, tensor_names, "olmo2", norm_layout="post", qk_norm="projection")


FAMILY = Family(
    name="olmo2",
    hf_architecture="Olmo2ForCausalLM",
    from_hf=from_hf,
    hf_names=OLMO2_HF_NAMES,
    gguf_arch="olmo2",
    from_gguf=from_gguf,
)
