"""Mistral: Llama with a sliding window on every layer when ``sliding_window`` is set.

llama.cpp converts Mistral checkpoints to its ``llama`` architecture, so GGUF files of
Mistral models load through the Llama family.
"""

from __future__ import annotations

from d2c_jax.models.families.base import Family, hf_common, layer_types_from_hf


def from_hf(cfg):
    return hf_common(cfg, "mistral", **layer_types_from_hf(cfg, all_sliding=True))


FAMILY = Family(name="mistral", hf_architecture="MistralForCausalLM", from_hf=from_hf)
