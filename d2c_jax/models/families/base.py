"""The family interface: what a model family tells the engine, and the shared pieces.

A `Family` is data, not a class hierarchy: how to read its ``config.json`` (and GGUF
metadata) into a `DecoderConfig`, and two name tables from our weight names to
Hugging Face's (under ``model.layers.{l}.``) and to llama.cpp's (``blk.{l}.<name>``),
with the converter's quirks (q/k row permutation, norms stored as ``1 + w``). A variant
family (Mistral of Llama, Qwen3 of Qwen2) builds on its parent's `from_hf` and tables.
Registered in `d2c_jax.models.families` by Hugging Face ``model_type``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from d2c_jax.models.decoder import FULL, SLIDING, DecoderConfig

HFConfig = Mapping[str, Any]

# Our layer weight names -> Hugging Face names under ``model.layers.{l}.`` (Llama's).
LLAMA_HF_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "o_bias": "self_attn.o_proj.bias",
    **{m: f"self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{m: f"mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")},
}
# Our layer weight names -> llama.cpp's tensor names under ``blk.{l}.`` (without
# ``.weight`` / ``.bias``).
LLAMA_GGUF_NAMES = {
    "attn_norm": "attn_norm",
    "mlp_norm": "ffn_norm",
    "post_attn_norm": "post_attention_norm",
    "post_mlp_norm": "post_ffw_norm",
    "q_norm": "attn_q_norm",
    "k_norm": "attn_k_norm",
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "qkv_proj": "attn_qkv",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "gate_up_proj": "ffn_up",  # llama.cpp keeps Phi-3's fused gate+up as ffn_up
    "down_proj": "ffn_down",
    "q_bias": "attn_q",
    "k_bias": "attn_k",
    "v_bias": "attn_v",
    "o_bias": "attn_output",
}


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
      name: registry key, the Hugging Face ``model_type`` (``"gemma3_text"``).
      hf_architecture: the transformers class (``"Gemma3ForCausalLM"``) for config.json.
      from_hf: ``config.json`` dict -> `DecoderConfig` (raise ValueError naming a
        setting it cannot compute exactly).
      hf_names: our layer weight names -> HF names under ``model.layers.{l}.``.
      gguf_arch: llama.cpp's ``general.architecture`` (None: no GGUF support).
      gguf_names: our layer weight names -> llama.cpp names under ``blk.{l}.``.
      gguf_permute_qk: llama.cpp's converter permutes q/k rows (interleaved RoPE).
      gguf_norm_shift: llama.cpp's converter stores RMSNorm weights as ``w + shift``.
      from_gguf: GGUF metadata (``get(key, default)`` over ``<arch>.<key>``, plus the set
        of tensor names) -> `DecoderConfig`.
      to_hf: `DecoderConfig` -> ``config.json`` dict (None: we never write this family).
      text_prefix: where the text decoder's weights live in multimodal checkpoints
        (``"model.language_model."``) besides ``"model."``.
    """

    name: str
    hf_architecture: str
    from_hf: Callable[[HFConfig], DecoderConfig]
    hf_names: Mapping[str, str] = dataclasses.field(default_factory=lambda: LLAMA_HF_NAMES)
    gguf_arch: str | None = None
    gguf_names: Mapping[str, str] = dataclasses.field(default_factory=lambda: LLAMA_GGUF_NAMES)
    gguf_permute_qk: bool = False
    gguf_norm_shift: float = 0.0
    from_gguf: Callable[..., DecoderConfig] | None = None
    to_hf: Callable[[DecoderConfig], dict[str, Any]] | None = None
    text_prefix: str | None = None


# ----------------------------------------------------------------- config.json


def rope_from_hf(cfg: HFConfig, layer_type: str | None = None) -> dict[str, Any]:
    """``rope_theta``, ``rope_scaling`` and ``partial_rotary_factor`` from a config.json of
    transformers 4 (top-level ``rope_theta`` / ``rope_scaling``) or 5 (``rope_parameters``,
    per layer type for Gemma 3)."""
    params = dict(cfg.get("rope_parameters") or {})
    if layer_type and isinstance(params.get(layer_type), Mapping):
        params = dict(params[layer_type])
    legacy = cfg.get("rope_scaling")
    if legacy and not params.get("rope_type") and not params.get("type"):
        params.update(legacy)
    theta = params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    partial = params.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "longrope" and "original_max_position_embeddings" not in params:
        params["original_max_position_embeddings"] = cfg.get("original_max_position_embeddings")
    scaling = None if kind == "default" else tuple(sorted(params.items()))
    return {"rope_theta": float(theta), "rope_scaling": scaling, "partial_rotary_factor": partial}


def layer_types_from_hf(cfg: HFConfig, all_sliding: bool = False) -> dict[str, Any]:
    """``layer_types`` and ``sliding_window``: the saved ``layer_types`` when present,
    else every layer sliding when `all_sliding` (Mistral, Phi-3) and a window is set."""
    window = cfg.get("sliding_window") or 0
    types = cfg.get("layer_types")
    if types is None:
        kind = SLIDING if all_sliding and window else FULL
        types = [kind] * cfg["num_hidden_layers"]
    if SLIDING in types and not window:
        raise ValueError("config.json: sliding_attention layers but no sliding_window")
    return {"layer_types": tuple(types), "sliding_window": int(window) if SLIDING in types else 0}


def hf_common(cfg: HFConfig, model_type: str, **overrides) -> DecoderConfig:
    """The fields every family reads the same way, then the family's `overrides`."""
    if cfg.get("mlp_bias"):
        raise ValueError("config.json: mlp_bias=true is not supported")
    heads = cfg["num_attention_heads"]
    fields = dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        model_type=model_type,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),  # HF's default
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        output_bias=bool(cfg.get("attention_bias", False)),
        hidden_act=_activation(cfg.get("hidden_activation") or cfg.get("hidden_act", "silu")),
        **rope_from_hf(cfg),
    )
    fields.update(overrides)
    return DecoderConfig(**fields)


def _activation(name: str) -> str:
    known = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
    if name not in known:
        raise ValueError(
            f"config.json: hidden_act {name!r} is not supported (silu, gelu_pytorch_tanh)"
        )
    return known[name]


def llama_to_hf(config: DecoderConfig, architecture: str) -> dict[str, Any]:
    """A config.json dict for the Llama-shaped families (llama, qwen2)."""
    return {
        "architectures": [architecture],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_act": "silu",
        "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
        "attention_bias": config.attention_bias,
    }
    if config.attention_bias != config.output_bias:
        raise ValueError("Llama's attention_bias sets the q, k, v and o biases together")


# ----------------------------------------------------------------- GGUF metadata


def gguf_common(get, tensor_names, model_type: str, **overrides) -> DecoderConfig:
    """The fields llama.cpp writes alike for every architecture (``get(key, default)``
    reads ``<arch>.<key>``)."""
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // heads
    scaling = None
    if get("rope.scaling.type") == "linear":
        scaling = (("factor", get("rope.scaling.factor")), ("rope_type", "linear"))
    fields = dict(
        vocab_size=int(get("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(head_dim),
        model_type=model_type,
        rope_theta=get("rope.freq_base", 10000.0),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        output_bias="blk.0.attn_output.bias" in tensor_names,
        max_position_embeddings=int(get("context_length", 2048)),
        rope_scaling=scaling,
    )
    fields.update(overrides)
    return DecoderConfig(**fields)
