"""Qwen3: Qwen2 without the q/k/v bias (unless configured) and with a per-head RMSNorm
of q and k before RoPE."""

from __future__ import annotations

from d2c_jax.models.families.base import Family, gguf_common, hf_common
from d2c_jax.models.families.qwen2 import qwen_layer_types


def from_hf(cfg):
    return hf_common(cfg, "qwen3", qk_norm="head", **qwen_layer_types(cfg))


def from_gguf(get, tensor_names):
    return gguf_common(get, tensor_names, "qwen3", qk_norm="head")


FAMILY = Family(
    name="qwen3",
    hf_architecture="Qwen3ForCausalLM",
    from_hf=from_hf,
    gguf_arch="qwen3",
    from_gguf=from_gguf,
)
