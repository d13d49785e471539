"""Llama (Llama 2 / 3.x, SmolLM2): the reference family the others vary.

Pre-norm blocks, SiLU-gated MLP, rotate-half RoPE with ``llama3`` / ``linear`` /
``dynamic`` scaling, optional q/k/v bias. llama.cpp's converter permutes q/k rows for
its interleaved RoPE; `d2c_jax.models.gguf` undoes it.
"""

from __future__ import annotations

from d2c_jax.models.families.base import Family, gguf_common, hf_common, llama_to_hf


def from_hf(cfg):
    return hf_common(cfg, "llama")


def from_gguf(get, tensor_names):
    return gguf_common(get, tensor_names, "llama")


def to_hf(config):
    return {**llama_to_hf(config, "LlamaForCausalLM"), "mlp_bias": False}


FAMILY = Family(
    name="llama",
    hf_architecture="LlamaForCausalLM",
    from_hf=from_hf,
    gguf_arch="llama",
    gguf_permute_qk=True,
    from_gguf=from_gguf,
    to_hf=to_hf,
)
