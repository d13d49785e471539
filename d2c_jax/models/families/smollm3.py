"""SmolLM3: Llama whose ``no_rope_layers`` flags (1 = rotate) turn RoPE off in some
layers (every fourth by default), with optional sliding windows."""

from __future__ import annotations

from d2c_jax.models.families.base import Family, hf_common
from d2c_jax.models.families.qwen2 import qwen_layer_types


def from_hf(cfg):
    flags = cfg.get("no_rope_layers") or [1] * cfg["num_hidden_layers"]
    return hf_common(
        cfg, "smollm3", rope_layers=tuple(bool(x) for x in flags), **qwen_layer_types(cfg)
    )


FAMILY = Family(name="smollm3", hf_architecture="SmolLM3ForCausalLM", from_hf=from_hf)
