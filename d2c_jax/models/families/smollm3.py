"""SmolLM3: Llama whose ``no_rope_layers`` flags (1 = rotate) turn RoPE off in some
layers (every fourth by default), with optional sliding windows.

llama.cpp (architecture ``smollm3``, converted like Llama: q/k rows permuted) skips
RoPE in every fourth layer; its GGUF records no per-layer flags."""

from __future__ import annotations

from d2c_jax.models.families.base import Family, gguf_common, hf_common
from d2c_jax.models.families.qwen2 import qwen_layer_types


def from_hf(cfg):
    flags = cfg.get("no_rope_layers") or [1] * cfg["num_hidden_layers"]
    return hf_common(
        cfg, "smollm3", rope_layers=tuple(bool(x) for x in flags), **qwen_layer_types(cfg)
    )


def from_gguf(get, tensor_names):
    step = int(get("no_rope_layer_step", 4))
    n = int(get("block_count"))
    flags = tuple((i + 1) % step != 0 for i in range(n))
    return gguf_common(get, tensor_names, "smollm3", rope_layers=flags)


FAMILY = Family(
    name="smollm3",
    hf_architecture="SmolLM3ForCausalLM",
    from_hf=from_hf,
    gguf_arch="smollm3",
    gguf_permute_qk=True,
    from_gguf=from_gguf,
)
