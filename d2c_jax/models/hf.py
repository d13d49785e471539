"""Hugging Face model directories: ``config.json`` + safetensors (+ ``tokenizer.json``).

Reads (and writes, for tests and caches) the Llama / Qwen2 checkpoint layout

    model.embed_tokens.weight, model.norm.weight, lm_head.weight (untied only),
    model.layers.{l}.input_layernorm.weight, model.layers.{l}.post_attention_layernorm.weight,
    model.layers.{l}.self_attn.{q,k,v,o}_proj.weight (+ q/k/v bias),
    model.layers.{l}.mlp.{gate,up,down}_proj.weight

into the stacked layout of `d2c_jax.models.llama` without torch: safetensors are read
with NumPy (bfloat16 through ``ml_dtypes``), sharded checkpoints through their index.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from d2c_jax.models.llama import LORA_MODULES, LlamaConfig, Weights, check_weights

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
    """Write NumPy arrays as one safetensors file (atomically: temp file + rename)."""
    from safetensors.numpy import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _hf_names(layer: int) -> dict[str, str]:
    p = f"model.layers.{layer}."
    names = {
        "attn_norm": p + "input_layernorm.weight",
        "mlp_norm": p + "post_attention_layernorm.weight",
        "q_bias": p + "self_attn.q_proj.bias",
        "k_bias": p + "self_attn.k_proj.bias",
        "v_bias": p + "self_attn.v_proj.bias",
    }
    for m in LORA_MODULES:
        group = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        names[m] = p + f"{group}.{m}.weight"
    return names


def load_hf_weights(path: str | os.PathLike) -> tuple[LlamaConfig, Weights]:
    """Config and float32 NumPy weights (canonical stacked layout) of an HF directory."""
    path = Path(path)
    cfg_dict = json.loads((path / "config.json").read_text())
    config = LlamaConfig.from_hf(cfg_dict)
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

    weights: Weights = {
        "embed": take("model.embed_tokens.weight"),
        "final_norm": take("model.norm.weight"),
    }
    if not config.tie_word_embeddings:
        weights["lm_head"] = take("lm_head.weight")
    wanted = ["attn_norm", "mlp_norm", *LORA_MODULES]
    if config.attention_bias:
        wanted += ["q_bias", "k_bias", "v_bias"]
    weights["layers"] = {
        key: np.stack([take(_hf_names(layer)[key]) for layer in range(config.num_layers)])
        for key in wanted
    }
    check_weights(config, weights, str(path))
    return config, weights


def save_hf_weights(
    path: str | os.PathLike,
    config: LlamaConfig,
    weights: Weights,
    extra_config: dict[str, Any] | None = None,
) -> None:
    """Write ``config.json`` + ``model.safetensors`` loadable by transformers."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {
        "model.embed_tokens.weight": weights["embed"],
        "model.norm.weight": weights["final_norm"],
    }
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = weights["lm_head"]
    for key, stacked in weights["layers"].items():
        for layer in range(config.num_layers):
            tensors[_hf_names(layer)[key]] = np.asarray(stacked[layer], dtype=np.float32)
    tensors = {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}
    write_safetensors(path / "model.safetensors", tensors, metadata={"format": "pt"})
    cfg = config.to_hf()
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
