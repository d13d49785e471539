"""Base models: one decoder, the families it runs, their loaders and the embedded default.

Public face of the package: `load_base(spec)` returns a `BaseModel` (decoder +
tokenizer) from ``"default"`` (the embedded SmolLM2-135M-Instruct), a Hugging Face
directory or a ``.gguf`` file of any registered family. Modules: `decoder` (the Flax
NNX decoder, its `DecoderConfig` and its LoRA-aware forward), `families` (one module per
model family and the registry by ``model_type`` / GGUF architecture), `loading`
(`load_base`, `BaseModel`, the tokenizer's document start, caches and base-model
identity), `hf` and `gguf` (file formats).
"""

from d2c_jax.models.decoder import (
    Decoder,
    DecoderConfig,
    forward_hidden,
    init_weights,
    logits_from_hidden,
)
from d2c_jax.models.families import FAMILIES
from d2c_jax.models.loading import (
    DEFAULT_MODEL_NAME,
    KNOWN_BASES,
    BaseModel,
    base_config,
    cache_dir,
    default_gguf_path,
    ensure_document_start,
    load_base,
    weights_fingerprint,
)

__all__ = [
    "BaseModel",
    "Decoder",
    "DecoderConfig",
    "FAMILIES",
    "DEFAULT_MODEL_NAME",
    "default_gguf_path",
    "cache_dir",
    "base_config",
    "load_base",
    "forward_hidden",
    "logits_from_hidden",
    "init_weights",
    "ensure_document_start",
    "KNOWN_BASES",
    "weights_fingerprint",
]
