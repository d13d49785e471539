"""GGUF files (llama.cpp): config, dequantized weights and tokenizer, without torch.

* Weights are dequantized to float32 with ``gguf.quants.dequantize`` (Q4_0/Q4_1/Q8_0/
  K-quants/F16/F32 ...). A GGUF tensor of shape ``[ne0, ne1]`` holds a row-major
  ``[ne1, ne0]`` matrix, i.e. Hugging Face's ``[d_out, d_in]``.
* llama.cpp's converter permutes the rows of ``attn_q`` and ``attn_k`` of *llama*
  models (interleaved RoPE pairs); `unpermute_qk` undoes it so the decoder can use
  Hugging Face's rotate-half RoPE. Qwen2 files are not permuted. Getting this wrong
  barely moves plain-text cross-entropy but breaks chat answers.
* The tokenizer is rebuilt from the metadata (vocabulary, merges, token types,
  special ids, chat template) through ``transformers.integrations.gguf.
  gguf_tokenizer_mapping``, which needs no torch. The SmolLM pre-tokenizer (each
  digit on its own, then GPT-2 byte-level splitting) is set here because that module
  has no entry for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from d2c_jax.models.llama import LlamaConfig, Weights, check_weights

SUPPORTED_ARCHS = ("llama", "qwen2")

_LAYER_NAMES = {
    "attn_norm": "attn_norm",
    "ffn_norm": "mlp_norm",
    "attn_q": "q_proj",
    "attn_k": "k_proj",
    "attn_v": "v_proj",
    "attn_output": "o_proj",
    "ffn_gate": "gate_proj",
    "ffn_up": "up_proj",
    "ffn_down": "down_proj",
}


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of q/k rows (``[n_head * hd, d_in]``)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f32(x) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99e-06)."""
    return float(f"{float(x):.7g}")


def gguf_config(reader) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported ({', '.join(SUPPORTED_ARCHS)})"
        )
    get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = get("vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // heads
    scaling = None
    if get("rope.scaling.type") == "linear":
        scaling = (("rope_type", "linear"), ("factor", _f32(get("rope.scaling.factor"))))
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(head_dim),
        rope_theta=_f32(get("rope.freq_base", 10000.0)),
        rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        max_position_embeddings=int(get("context_length", 2048)),
        rope_scaling=scaling,
        model_type="qwen2" if arch == "qwen2" else "llama",
    )


def load_gguf_weights(path: str | os.PathLike) -> tuple[LlamaConfig, Weights, Any]:
    """``(config, float32 NumPy weights, reader)`` of a GGUF file."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # the gguf package raises bare ValueErrors etc.
        raise ValueError(f"{path}: not a readable GGUF file ({err})") from err
    config = gguf_config(reader)
    arch = _field(reader, "general.architecture")
    layers: dict[str, list[np.ndarray | None]] = {}
    weights: Weights = {}
    for tensor in reader.tensors:
        shape = tuple(reversed([int(x) for x in tensor.shape]))
        array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        array = array.reshape(shape)
        name = tensor.name
        if name == "token_embd.weight":
            weights["embed"] = array
        elif name == "output_norm.weight":
            weights["final_norm"] = array
        elif name == "output.weight":
            weights["lm_head"] = array
        elif name.startswith("blk."):
            _, index, kind, suffix = name.split(".")
            layer = int(index)
            if suffix == "bias":
                if kind not in ("attn_q", "attn_k", "attn_v"):
                    raise ValueError(f"{path}: unsupported tensor {name}")
                key = {"attn_q": "q_bias", "attn_k": "k_bias", "attn_v": "v_bias"}[kind]
            elif kind in _LAYER_NAMES:
                key = _LAYER_NAMES[kind]
            else:
                raise ValueError(f"{path}: unsupported tensor {name}")
            if arch == "llama" and kind == "attn_q":
                array = unpermute_qk(array, config.num_heads)
            elif arch == "llama" and kind == "attn_k":
                array = unpermute_qk(array, config.num_kv_heads)
            layers.setdefault(key, [None] * config.num_layers)[layer] = array
        elif name == "rope_freqs.weight":
            raise ValueError(f"{path}: per-dimension rope_freqs are not supported")
        else:
            raise ValueError(f"{path}: unsupported tensor {name}")
    for key, arrays in layers.items():
        if any(a is None for a in arrays):
            raise ValueError(f"{path}: {key} is missing for some layers")
    weights["layers"] = {k: np.stack(v) for k, v in layers.items()}
    check_weights(config, weights, str(path))
    return config, weights, reader


def gguf_tokenizer(reader):
    """A transformers fast tokenizer rebuilt from GGUF metadata (no torch needed)."""
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    arch = _field(reader, "general.architecture")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    tok: dict[str, Any] = {
        "tokenizer_type": _field(reader, "tokenizer.ggml.model"),
        "pre_tokenizer_type": _field(reader, "tokenizer.ggml.pre"),
        "tokens": tokens,
        "token_type": _field(reader, "tokenizer.ggml.token_type"),
    }
    for key, name in (("merges", "merges"), ("scores", "scores")):
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            tok[name] = value
    if tok["tokenizer_type"] == "gpt2":
        tok.setdefault("merges", [])  # byte-level BPE without merges (an empty array)
    backend, _ = convert_gguf_tokenizer(arch, tok)
    if tok["pre_tokenizer_type"] == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    special = {}
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        index = _field(reader, f"tokenizer.ggml.{key}")
        if index is not None:
            special[name] = tokens[int(index)]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=_field(reader, "tokenizer.chat_template"),
        **special,
    )
    return tokenizer


def gguf_model_name(reader, path: str | os.PathLike) -> str:
    """A readable model name from metadata (``org/basename-size``) or the file name."""
    org = _field(reader, "general.organization")
    base = _field(reader, "general.basename")
    size = _field(reader, "general.size_label")
    if base:
        name = base + (f"-{size}" if size else "")
        return f"{org}/{name}" if org else name
    return Path(path).stem
