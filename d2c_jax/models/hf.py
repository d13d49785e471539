"""Hugging Face model directories: ``config.json`` + safetensors (+ ``tokenizer.json``).

Reads (and writes, for the families that say how: tests and caches) checkpoints of any
registered family (`d2c_jax.models.families`): ``model_type`` picks the family, whose
`from_hf` reads the config and whose name table maps

    model.embed_tokens.weight, model.norm.weight, lm_head.weight (untied only),
    model.layers.{l}.<family name>  (e.g. self_attn.q_proj.weight, input_layernorm.weight)

(``model.language_model.`` instead of ``model.`` for multimodal checkpoints) into the
stacked layout of `d2c_jax.models.decoder`, without torch: safetensors are read with
NumPy (bfloat16 through ``ml_dtypes``); every ``*.safetensors`` file of the directory
is read (sharded checkpoints).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from d2c_jax.io import write_atomic
from d2c_jax.models.decoder import DecoderConfig, Weights, check_weights, weight_shapes
from d2c_jax.models.families import Family, family, to_hf

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as (memory-mapped) NumPy arrays."""
    path = Path(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    blob = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        out[name] = blob[start:end].view(dtype).reshape(info["shape"])
    return out


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Write NumPy arrays as one safetensors file (atomically: `d2c_jax.io.write_atomic`)."""
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(arrays, str(tmp), metadata=metadata))


def _prefix(fam: Family) -> str:
    return fam.text_prefix or "model."


def hf_config(path: str | os.PathLike) -> tuple[Family, DecoderConfig]:
    """The family and config of an HF directory, from ``config.json`` alone (cheap: used
    to refuse an unsupported model before any work)."""
    source = Path(path) / "config.json"
    try:
        cfg = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{source}: not readable as JSON ({err})") from None
    fam = family(cfg.get("model_type", "llama"), str(source))
    try:
        return fam, fam.from_hf(cfg)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None


def load_hf_weights(path: str | os.PathLike) -> tuple[DecoderConfig, Weights]:
    """Config and float32 NumPy weights (canonical stacked layout) of an HF directory."""
    path = Path(path)
    fam, config = hf_config(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (pytorch .bin is not supported)")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(read_safetensors(f))

    def take(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"{path}: checkpoint has no tensor {name}")
        return np.asarray(tensors[name], dtype=np.float32)

    prefix = _prefix(fam)
    weights: Weights = {
        "embed": take(prefix + "embed_tokens.weight"),
        "final_norm": take(prefix + "norm.weight"),
    }
    if not config.tie_word_embeddings:
        weights["lm_head"] = take("lm_head.weight")
    layer = lambda i, key: take(f"{prefix}layers.{i}.{fam.hf_names[key]}")
    weights["layers"] = {
        key: np.stack([layer(i, key) for i in range(config.num_layers)])
        for key in weight_shapes(config)["layers"]
    }
    check_weights(config, weights, str(path))
    return config, weights


def save_hf_weights(
    path: str | os.PathLike,
    config: DecoderConfig,
    weights: Weights,
    extra_config: dict[str, Any] | None = None,
) -> None:
    """Write ``config.json`` + ``model.safetensors`` loadable by transformers."""
    fam = family(config.model_type)
    cfg = to_hf(config)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    prefix = _prefix(fam)
    tensors = {
        prefix + "embed_tokens.weight": weights["embed"],
        prefix + "norm.weight": weights["final_norm"],
    }
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = weights["lm_head"]
    for key, stacked in weights["layers"].items():
        for i in range(config.num_layers):
            tensors[f"{prefix}layers.{i}.{fam.hf_names[key]}"] = stacked[i]
    tensors = {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}
    write_safetensors(path / "model.safetensors", tensors, metadata={"format": "pt"})
    cfg["torch_dtype"] = "float32"
    cfg.update(extra_config or {})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def load_hf_tokenizer(path: str | os.PathLike):
    """The fast tokenizer of an HF directory (``tokenizer.json``), offline."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (a fast tokenizer is required)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
