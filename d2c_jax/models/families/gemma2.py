"""Gemma 2: four RMSNorms per layer scaling by ``1 + w``, embeddings times
sqrt(hidden), GELU-tanh MLP, softmax scale ``query_pre_attn_scalar ** -0.5``, attention
and final-logit soft-capping, sliding window on every other layer (the first).

llama.cpp's converter stores every norm as ``1 + w`` (hence `gguf_norm_shift`) and
takes the softmax scale from the head size.
"""

from __future__ import annotations

from d2c_jax.models.decoder import FULL, SLIDING
from d2c_jax.models.families.base import (
    LLAMA_HF_NAMES,
    Family,
    gguf_common,
    hf_common,
    layer_types_from_hf,
)

GEMMA_HF_NAMES = {
    **LLAMA_HF_NAMES,
    "attn_norm": "input_layernorm.weight",
    "post_attn_norm": "post_attention_layernorm.weight",
    "mlp_norm": "pre_feedforward_layernorm.weight",
    "post_mlp_norm": "post_feedforward_layernorm.weight",
}


def gemma_fields(cfg, hidden: int) -> dict:
    """What Gemma 2 and 3 share, from config.json."""
    return dict(
        norm_layout="sandwich",
        norm_offset=1.0,
        embed_scale=hidden**0.5,
        attention_scale=float(cfg.get("query_pre_attn_scalar") or cfg["head_dim"]) ** -0.5,
        attn_softcap=float(cfg.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(cfg.get("final_logit_softcapping") or 0.0),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        **layer_types_from_hf(cfg),
    )


def gguf_layer_types(get, every: int) -> dict:
    """llama.cpp's pattern: every `every`-th layer (1-based) is global, the rest slide."""
    n = int(get("block_count"))
    types = tuple(FULL if (i + 1) % every == 0 else SLIDING for i in range(n))
    return {"layer_types": types, "sliding_window": int(get("attention.sliding_window"))}


def gemma_gguf_fields(get) -> dict:
    hidden = int(get("embedding_length"))
    return dict(
        norm_layout="sandwich",
        norm_offset=1.0,
        embed_scale=hidden**0.5,
        attention_scale=float(get("attention.key_length")) ** -0.5,
        hidden_act="gelu_tanh",
    )


def from_hf(cfg):
    return hf_common(cfg, "gemma2", **gemma_fields(cfg, cfg["hidden_size"]))


def from_gguf(get, tensor_names):
    return gguf_common(
        get,
        tensor_names,
        "gemma2",
        attn_softcap=float(get("attn_logit_softcapping", 0.0)),
        final_softcap=float(get("final_logit_softcapping", 0.0)),
        **gemma_gguf_fields(get),
        **gguf_layer_types(get, 2),
    )


FAMILY = Family(
    name="gemma2",
    hf_architecture="Gemma2ForCausalLM",
    from_hf=from_hf,
    hf_names=GEMMA_HF_NAMES,
    gguf_arch="gemma2",
    gguf_norm_shift=1.0,
    from_gguf=from_gguf,
)
