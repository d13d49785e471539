"""Gemma 3 (text): Gemma 2's block with a per-head q/k RMSNorm, no soft-capping by
default, a 5:1 local/global layer pattern, and a separate RoPE base for the local
(sliding) layers. Also the text decoder of ``Gemma3ForConditionalGeneration``
checkpoints (``model_type`` ``gemma3``; weights under ``model.language_model.``).
"""

from __future__ import annotations

from d2c_jax.models.decoder import FULL, SLIDING
from d2c_jax.models.families.base import Family, gguf_common, hf_common, rope_from_hf
from d2c_jax.models.families.gemma2 import (
    GEMMA_HF_NAMES,
    gemma_fields,
    gemma_gguf_fields,
    gguf_layer_types,
)

# llama.cpp hard-codes the local layers' base for Gemma 3 (its GGUF has no key for it).
GGUF_LOCAL_THETA = 10000.0


def _rope(cfg) -> dict:
    """The global layers' RoPE (with its scaling) and the local layers' base."""
    full = rope_from_hf(cfg, FULL)
    if isinstance((cfg.get("rope_parameters") or {}).get(SLIDING), dict):
        local = rope_from_hf(cfg, SLIDING)["rope_theta"]
    else:  # transformers 4 configs
        local = float(cfg.get("rope_local_base_freq", 10000.0))
    return {**full, "rope_local_theta": local}


def from_hf(cfg):
    return hf_common(
        cfg, "gemma3_text", qk_norm="head", **gemma_fields(cfg, cfg["hidden_size"]), **_rope(cfg)
    )


def from_hf_multimodal(cfg):
    text = dict(cfg.get("text_config") or {})
    if not text:
        raise ValueError("config.json: a gemma3 checkpoint without text_config")
    text.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", True))
    return from_hf(text)


def from_gguf(get, tensor_names):
    return gguf_common(
        get,
        tensor_names,
        "gemma3_text",
        qk_norm="head",
        rope_local_theta=GGUF_LOCAL_THETA,
        final_softcap=float(get("final_logit_softcapping", 0.0)),
        **gemma_gguf_fields(get),
        **gguf_layer_types(get, 6),
    )


FAMILY = Family(
    name="gemma3_text",
    hf_architecture="Gemma3ForCausalLM",
    from_hf=from_hf,
    hf_names=GEMMA_HF_NAMES,
    gguf_arch="gemma3",
    gguf_norm_shift=1.0,
    from_gguf=from_gguf,
)
MULTIMODAL = Family(
    name="gemma3",
    hf_architecture="Gemma3ForConditionalGeneration",
    from_hf=from_hf_multimodal,
    hf_names=GEMMA_HF_NAMES,
    text_prefix="model.language_model.",
)
