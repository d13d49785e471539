"""Qwen2 / Qwen2.5: Llama with q/k/v bias and sliding windows on the upper layers when
``use_sliding_window`` is on. Not permuted by llama.cpp's converter."""

from __future__ import annotations

import dataclasses

from d2c_jax.models.decoder import FULL, SLIDING
from d2c_jax.models.families.base import (
    Family,
    gguf_common,
    hf_common,
    layer_types_from_hf,
    llama_to_hf,
)


def qwen_layer_types(cfg):
    """Saved ``layer_types``, or (transformers 4 configs) sliding from layer
    ``max_window_layers`` up when ``use_sliding_window``."""
    if "layer_types" not in cfg and cfg.get("use_sliding_window"):
        first = cfg.get("max_window_layers", 0)
        types = [SLIDING if i >= first else FULL for i in range(cfg["num_hidden_layers"])]
        cfg = {**cfg, "layer_types": types}
    return layer_types_from_hf(cfg)


def from_hf(cfg):
    return hf_common(cfg, "qwen2", attention_bias=True, output_bias=False, **qwen_layer_types(cfg))


def from_gguf(get, tensor_names):
    return gguf_common(get, tensor_names, "qwen2")


def to_hf(config):
    if not config.attention_bias or config.output_bias:
        raise ValueError("a qwen2 config has q, k, v biases and no o_proj bias")
    cfg = llama_to_hf(dataclasses.replace(config, output_bias=True), "Qwen2ForCausalLM")
    del cfg["attention_bias"]  # always on in Qwen2
    return cfg


FAMILY = Family(
    name="qwen2",
    hf_architecture="Qwen2ForCausalLM",
    from_hf=from_hf,
    gguf_arch="qwen2",
    from_gguf=from_gguf,
    to_hf=to_hf,
)
