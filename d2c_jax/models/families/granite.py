"""Granite 3: Llama with four multipliers: embeddings, block outputs before the residual
add, the attention softmax scale, and logits (divided by ``logits_scaling``)."""

from __future__ import annotations

from d2c_jax.models.families.base import Family, gguf_common, hf_common


def from_hf(cfg):
    return hf_common(
        cfg,
        "granite",
        embed_scale=float(cfg.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(cfg.get("residual_multiplier", 1.0)),
        attention_scale=float(cfg.get("attention_multiplier", 1.0)),
        logit_scale=1.0 / float(cfg.get("logits_scaling", 1.0)),
    )


def from_gguf(get, tensor_names):
    return gguf_common(
        get,
        tensor_names,
        "granite",
        embed_scale=float(get("embedding_scale", 1.0)),
        residual_multiplier=float(get("residual_scale", 1.0)),
        attention_scale=float(get("attention.scale", 1.0)),
        logit_scale=1.0 / float(get("logit_scale", 1.0)),
    )


FAMILY = Family(
    name="granite",
    hf_architecture="GraniteForCausalLM",
    from_hf=from_hf,
    gguf_arch="granite",
    gguf_permute_qk=True,
    from_gguf=from_gguf,
)
