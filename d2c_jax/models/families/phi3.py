"""Phi-3 / Phi-4-mini: Llama with fused ``qkv_proj`` and ``gate_up_proj`` (gate first),
partial rotary embeddings and ``longrope`` scaling (exact up to the original context,
where the short factors apply), a sliding window on every layer when set. PEFT
adapters target the fused modules by those names."""

from __future__ import annotations

from d2c_jax.models.decoder import SLIDING
from d2c_jax.models.families.base import (
    LLAMA_HF_NAMES,
    Family,
    gguf_common,
    hf_common,
    layer_types_from_hf,
)

PHI3_HF_NAMES = {
    **LLAMA_HF_NAMES,
    "qkv_proj": "self_attn.qkv_proj.weight",
    "gate_up_proj": "mlp.gate_up_proj.weight",
}


def from_hf(cfg):
    return hf_common(
        cfg,
        "phi3",
        fused_qkv=True,
        fused_gate_up=True,
        **layer_types_from_hf(cfg, all_sliding=True),
    )


def from_gguf(get, tensor_names):
    if any(name.startswith("rope_factors") for name in tensor_names):
        raise ValueError("Phi-3 GGUF with long-context rope factors is not supported")
    heads = int(get("attention.head_count"))
    head_dim = int(get("embedding_length")) // heads
    window = int(get("attention.sliding_window", 0) or 0)
    n = int(get("block_count"))
    return gguf_common(
        get,
        tensor_names,
        "phi3",
        fused_qkv=True,
        fused_gate_up=True,
        head_dim=head_dim,
        partial_rotary_factor=int(get("rope.dimension_count", head_dim)) / head_dim,
        layer_types=(SLIDING,) * n if window else (),
        sliding_window=window,
    )


FAMILY = Family(
    name="phi3",
    hf_architecture="Phi3ForCausalLM",
    from_hf=from_hf,
    hf_names=PHI3_HF_NAMES,
    gguf_arch="phi3",
    from_gguf=from_gguf,
)
