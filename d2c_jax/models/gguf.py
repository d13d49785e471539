"""GGUF files (llama.cpp): config, dequantized weights and tokenizer, without torch.

* Weights are dequantized to float32 with ``gguf.quants.dequantize`` (Q4_0/Q4_1/Q8_0/
  K-quants/F16/F32 ...). A GGUF tensor of shape ``[ne0, ne1]`` holds a row-major
  ``[ne1, ne0]`` matrix, i.e. Hugging Face's ``[d_out, d_in]``.
* ``general.architecture`` picks the family (`d2c_jax.models.families`), whose
  `from_gguf` reads the config and whose ``gguf_names`` table maps ``blk.{l}.<name>``
  to ours. The converter's changes are undone per family: llama.cpp permutes the rows
  of ``attn_q`` and ``attn_k`` of *llama*-converted models (interleaved RoPE pairs;
  `unpermute_qk`), and stores Gemma's norms as ``1 + w``. Getting the permutation
  wrong barely moves plain-text cross-entropy but breaks chat answers.
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

from d2c_jax.models.decoder import DecoderConfig, Weights, check_weights, weight_shapes
from d2c_jax.models.families import Family, gguf_family


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of q/k rows (``[n_head * hd, d_in]``)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f32(x) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99e-06)."""
    return float(f"{float(x):.7g}")


def _open(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as err:  # the gguf package raises bare ValueErrors etc.
        raise ValueError(f"{path}: not a readable GGUF file ({err})") from err


def gguf_config(reader, source: str = "GGUF") -> tuple[Family, DecoderConfig]:
    """The family and config a GGUF file's metadata describes."""
    arch = _field(reader, "general.architecture")
    fam = gguf_family(arch, source)

    def get(key, default=None):
        value = _field(reader, f"{arch}.{key}", default)
        if key == "vocab_size" and value is None:
            value = len(reader.fields["tokenizer.ggml.tokens"].data)
        return _f32(value) if isinstance(value, float) else value

    try:
        return fam, fam.from_gguf(get, {t.name for t in reader.tensors})
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None


def gguf_file_config(path: str | os.PathLike) -> tuple[Family, DecoderConfig]:
    """`gguf_config` of a file, reading only its metadata (memory-mapped, no dequantizing)."""
    return gguf_config(_open(Path(path)), str(path))


def _layer_table(fam: Family, config: DecoderConfig) -> dict[tuple[str, str], str]:
    """``(llama.cpp name, "weight" | "bias") -> our layer weight name`` for this config."""
    table = {}
    for ours in weight_shapes(config)["layers"]:
        suffix = "bias" if ours.endswith("_bias") else "weight"
        table[(fam.gguf_names[ours], suffix)] = ours
    return table


def _to_ours(fam: Family, config: DecoderConfig, ours: str, array: np.ndarray) -> np.ndarray:
    """Undo the converter's changes: q/k row permutation, norms stored as ``w + shift``."""
    if fam.gguf_permute_qk and ours in ("q_proj", "q_bias"):
        return unpermute_qk(array, config.num_heads)
    if fam.gguf_permute_qk and ours in ("k_proj", "k_bias"):
        return unpermute_qk(array, config.num_kv_heads)
    if fam.gguf_norm_shift and ours.endswith("norm"):
        return array - np.float32(fam.gguf_norm_shift)
    return array


def load_gguf_weights(path: str | os.PathLike) -> tuple[DecoderConfig, Weights, Any]:
    """``(config, float32 NumPy weights, reader)`` of a GGUF file."""
    import gguf

    path = Path(path)
    reader = _open(path)
    fam, config = gguf_config(reader, str(path))
    table = _layer_table(fam, config)
    top = {
        "token_embd.weight": "embed",
        "output_norm.weight": "final_norm",
        "output.weight": "lm_head",
    }
    layers: dict[str, list[np.ndarray | None]] = {}
    weights: Weights = {}
    for tensor in reader.tensors:
        shape = tuple(reversed([int(x) for x in tensor.shape]))
        array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        array = array.reshape(shape)
        parts = tensor.name.split(".")
        if tensor.name in top:
            weights[top[tensor.name]] = _to_ours(fam, config, top[tensor.name], array)
        elif parts[0] == "blk" and len(parts) == 4 and (parts[2], parts[3]) in table:
            ours = table[(parts[2], parts[3])]
            layers.setdefault(ours, [None] * config.num_layers)[int(parts[1])] = _to_ours(
                fam, config, ours, array
            )
        else:
            raise ValueError(f"{path}: unsupported tensor {tensor.name} for {fam.gguf_arch}")
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
