"""Export adapters for a device: llama.cpp LoRA adapter GGUF files plus a routing manifest.

A device runs a llama.cpp base model file (GGUF) and, per task, one LoRA adapter
GGUF. `export_clusters` turns a clustering directory (``assignment.json`` +
``cluster_<k>/`` PEFT adapters, `d2c_jax.cluster.output`) into

  DEVICE_DIR/cluster_<k>.gguf   one llama.cpp LoRA adapter per cluster
  DEVICE_DIR/routing.json       task -> adapter file, base model file + sha256, bytes

written as one directory that appears only when complete.

The adapter file follows llama.cpp's ``convert_lora_to_gguf.py`` (read, not copied):

* metadata ``general.type = "adapter"``, ``general.architecture`` = the base's (any
  family with a GGUF architecture, `d2c_jax.models.families`), ``adapter.type =
  "lora"``, ``adapter.lora.alpha`` (float32); llama.cpp scales a pair by ``alpha / r``
  with r read from the tensor shape, so we write ``alpha = scale * r``, which
  reproduces PEFT's ``alpha / r`` and rsLoRA's ``alpha / sqrt(r)`` alike;
* tensors ``blk.{l}.<name>.weight.lora_a`` / ``.lora_b`` with the family's llama.cpp
  names (``attn_q`` ... ``ffn_down``; Phi-3's fused ``attn_qkv`` and ``ffn_up``):
  ``lora_a`` is PEFT's A ``[r, d_in]`` and ``lora_b`` PEFT's B ``[d_out, r]`` as
  row-major arrays (GGUF shapes ``[d_in, r]`` and ``[r, d_out]``; llama.cpp checks
  ``a.ne[0] == W.ne[0]``, ``b.ne[1] == W.ne[1]`` and ``a.ne[1] == b.ne[0]``);
* llama.cpp's converter permutes the output rows of ``attn_q`` / ``attn_k`` of
  *llama* models for its interleaved RoPE (``d2c_jax.models.gguf.unpermute_qk``
  undoes it on load). ``W + s B A`` permuted by rows is ``P W + s (P B) A``, so the
  q (k) adapter's B rows get the same permutation (`permute_qk`, q with the head
  count, k with the KV-head count) and A is unchanged. The family says whether its
  converter permutes (`Family.gguf_permute_qk`: Llama and Granite do, Qwen, Gemma do not).

Factors are stored as ``bf16`` by default: our PEFT adapters are bf16 already, so
this is lossless for them (``f32`` and ``f16`` are the alternatives). Note that
ggml converts the activations to the weight type for a matmul, so the LoRA
branch sees bf16 / f16 activations unless the factors are f32.

Storage is reported as a device sees it: bytes on disk of the K adapter files
against the N single adapters of the library exported the same way (each written
to a temporary directory and measured, then removed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from d2c_jax.io import atomic_directory, write_atomic, write_json_atomic
from d2c_jax.library import PROVENANCE_NAME, AdapterLibrary, LoraParams

EXPORT_FORMATS = ("gguf",)
GGUF_DTYPES = ("bf16", "f16", "f32")
ROUTING_NAME = "routing.json"
ROUTING_FORMAT = 1


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row permutation of q/k (``[n_head * hd, ...]``) for interleaved RoPE.

    The inverse of `d2c_jax.models.gguf.unpermute_qk`: within each head, row
    ``2 i`` takes the original row ``i`` and row ``2 i + 1`` the row ``i + hd/2``.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot permute {rows} rows over {n_head} heads (head dim must be even)")
    half = rows // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclasses.dataclass(frozen=True)
class GGUFBase:
    """What an adapter file needs to know about its llama.cpp base model file."""

    path: Path
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tensor_shapes: Mapping[str, tuple[int, ...]]  # GGUF order (ne0, ne1): [d_in, d_out]
    name: str
    module_names: Mapping[str, str]  # PEFT module -> llama.cpp name (no blk.{l}. / .weight)
    permute_qk: bool  # llama.cpp permutes this architecture's q/k rows (its family says)

    @classmethod
    def read(cls, path: str | os.PathLike) -> GGUFBase:
        """Read the metadata and tensor shapes of a base GGUF (no weights are loaded)."""
        import gguf

        from d2c_jax.models.gguf import gguf_config, gguf_model_name

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: base model GGUF file not found")
        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as err:  # the gguf package raises bare ValueErrors etc.
            raise ValueError(f"{path}: not a readable GGUF file ({err})") from err
        general_type = reader.fields.get("general.type")
        if general_type is not None and general_type.contents() == "adapter":
            raise ValueError(f"{path}: is a LoRA adapter GGUF, not a base model")
        family, config = gguf_config(reader, str(path))
        return cls(
            path=path,
            architecture=str(reader.fields["general.architecture"].contents()),
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            tensor_shapes={t.name: tuple(int(x) for x in t.shape) for t in reader.tensors},
            name=gguf_model_name(reader, path),
            module_names={m: family.gguf_names[m] for m in config.lora_modules},
            permute_qk=family.gguf_permute_qk,
        )

    def check_adapter(self, params: Mapping[str, Mapping[str, Any]], source: str) -> None:
        """Raise ValueError naming `source` unless every factor fits a base tensor."""
        for module, factors in params.items():
            if module not in self.module_names:
                raise ValueError(
                    f"{source}: module {module!r} is not a module of the {self.architecture} "
                    f"base model {self.path} ({', '.join(self.module_names)})"
                )
            a, b = factors["A"], factors["B"]
            if a.shape[0] != self.num_layers:
                raise ValueError(
                    f"{source}: {module} has {a.shape[0]} layers but the base model "
                    f"{self.path} has {self.num_layers}"
                )
            want = (int(a.shape[2]), int(b.shape[1]))
            for layer in range(self.num_layers):
                name = f"blk.{layer}.{self.module_names[module]}.weight"
                got = self.tensor_shapes.get(name)
                if got is None:
                    raise ValueError(f"{source}: base model {self.path} has no tensor {name}")
                if tuple(got[:2]) != want:
                    raise ValueError(
                        f"{source}: {module} is {want[1]} x {want[0]} (out x in) but {name} "
                        f"of {self.path} is {got[1]} x {got[0]}; wrong base model?"
                    )


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def gguf_lora_tensors(
    params: Mapping[str, Mapping[str, Any]], base: GGUFBase
) -> list[tuple[str, np.ndarray]]:
    """``[(name, float32 array)]`` of one adapter in llama.cpp's naming and layout.

    ``params`` is ``{module: {"A": [L, r, d_in], "B": [L, d_out, r]}}``; the arrays
    are row-major ``A [r, d_in]`` (``.lora_a``) and ``B [d_out, r]`` (``.lora_b``),
    with q/k rows of B permuted where the base's converter permuted them.
    """
    heads = {"q_proj": base.num_heads, "k_proj": base.num_kv_heads}
    out = []
    for module in sorted(params, key=list(base.module_names).index):
        a = np.asarray(params[module]["A"], np.float32)
        b = np.asarray(params[module]["B"], np.float32)
        for layer in range(a.shape[0]):
            lb = b[layer]
            if base.permute_qk and module in heads:
                lb = permute_qk(lb, heads[module])
            name = f"blk.{layer}.{base.module_names[module]}.weight"
            out.append((f"{name}.lora_a", np.ascontiguousarray(a[layer])))
            out.append((f"{name}.lora_b", np.ascontiguousarray(lb)))
    return out


def _encode(array: np.ndarray, dtype: str):
    """``(data, raw_dtype)`` for `GGUFWriter.add_tensor`."""
    import gguf

    if dtype == "f32":
        return array.astype(np.float32), None
    if dtype == "f16":
        return array.astype(np.float16), None
    if dtype == "bf16":
        q = gguf.GGMLQuantizationType.BF16
        return gguf.quants.quantize(array.astype(np.float32), q), q
    raise ValueError(f"unknown GGUF dtype {dtype!r}; expected one of {GGUF_DTYPES}")


_FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32}  # gguf.LlamaFileType ALL_F32, MOSTLY_F16, ..._BF16


def write_gguf_adapter(
    path: str | os.PathLike,
    params: LoraParams | Mapping[str, Mapping[str, Any]],
    scale: float,
    base: GGUFBase,
    *,
    dtype: str = "bf16",
    name: str | None = None,
    tasks: Sequence[str] = (),
) -> int:
    """Write one LoRA adapter (``scale * B @ A`` per module) as a llama.cpp adapter GGUF.

    Written to a temporary file beside `path` and renamed, so `path` is the old file
    or the complete new one. Returns the file's size in bytes.
    """
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}; expected one of {GGUF_DTYPES}")
    path = Path(path)
    base.check_adapter(params, str(name or path))
    ranks = {int(f["A"].shape[1]) for f in params.values()}
    if len(ranks) != 1:
        raise ValueError(f"{name or path}: modules have different ranks {sorted(ranks)}")
    rank = ranks.pop()
    alpha = float(scale) * rank
    if not (np.isfinite(alpha) and alpha != 0.0):
        raise ValueError(f"{name or path}: scale {scale} cannot be written as a LoRA alpha")
    tensors = gguf_lora_tensors(params, base)
    for tensor_name, array in tensors:
        if not np.isfinite(array).all():
            raise ValueError(f"{name or path}: {tensor_name} contains NaN or Inf")

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), base.architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        if name:
            writer.add_name(name)
        if tasks:
            writer.add_string(gguf.Keys.Adapter.LORA_TASK_NAME, ",".join(tasks))
        writer.add_file_type(_FILE_TYPES[dtype])
        for tensor_name, array in tensors:
            data, raw_dtype = _encode(array, dtype)
            writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write_atomic(path, write).stat().st_size


def read_gguf_adapter(path: str | os.PathLike, base: GGUFBase) -> tuple[LoraParams, float]:
    """Read an adapter GGUF back as ``({module: {"A", "B"}}, scale)`` in PEFT layout
    (q/k rows un-permuted): the inverse of `write_gguf_adapter` up to the dtype."""
    import gguf

    from d2c_jax.models.gguf import unpermute_qk

    reader = gguf.GGUFReader(str(path))
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    by_name = {v: k for k, v in base.module_names.items()}
    layers: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    for t in reader.tensors:
        _, layer, kind, _, factor = t.name.split(".")
        array = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        array = array.reshape(tuple(reversed([int(x) for x in t.shape])))
        module = by_name[kind]
        if factor == "lora_b" and base.permute_qk and module == "q_proj":
            array = unpermute_qk(array, base.num_heads)
        elif factor == "lora_b" and base.permute_qk and module == "k_proj":
            array = unpermute_qk(array, base.num_kv_heads)
        key = "A" if factor == "lora_a" else "B"
        layers.setdefault(module, {}).setdefault(key, {})[int(layer)] = array
    params = {
        m: {f: np.stack([fs[f][i] for i in sorted(fs[f])]) for f in "AB"}
        for m, fs in layers.items()
    }
    rank = next(iter(params.values()))["A"].shape[1]
    return params, alpha / rank


# ---------------------------------------------------------------- whole clusterings


def adapter_file_name(name: str) -> str:
    return f"{name}.gguf"


def _members(adapter_dir: Path) -> list[str] | None:
    import json

    try:
        data = json.loads((adapter_dir / PROVENANCE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    members = data.get("members") if isinstance(data, dict) else None
    return list(members) if isinstance(members, list) else None


def single_adapter_bytes(library_dir: str | os.PathLike, base: GGUFBase, dtype: str) -> dict:
    """Bytes on disk of each adapter of a library exported like the clusters (measured
    by writing them to a temporary directory)."""
    library = AdapterLibrary.load(library_dir)
    sizes = {}
    with tempfile.TemporaryDirectory(prefix="d2c-export-singles-") as tmp:
        for i, name in enumerate(library.names):
            params, scale = library.adapter(i)
            rank = library.ranks[i]
            # the library zero-pads smaller ranks; export each adapter at its own rank
            params = {
                m: {"A": f["A"][:, :rank], "B": f["B"][:, :, :rank]} for m, f in params.items()
            }
            path = Path(tmp) / adapter_file_name(name)
            sizes[name] = write_gguf_adapter(path, params, scale, base, dtype=dtype, name=name)
    return sizes


def export_clusters(
    clusters_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    base_gguf: str | os.PathLike,
    *,
    library_dir: str | os.PathLike | None = None,
    dtype: str = "bf16",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write every cluster adapter of `clusters_dir` as a llama.cpp LoRA GGUF into
    `out_dir` with a routing manifest; returns the manifest.

    Args:
      clusters_dir: a clustering directory (``assignment.json`` + ``cluster_<k>/``).
      base_gguf: the llama.cpp base model file the device runs (shapes are checked
        against it; its sha256 goes into the manifest).
      library_dir: the library the clusters were made from; when given, its N single
        adapters are exported the same way (to a temporary directory) to report the
        storage they would take on the device.
      overwrite: replace an existing `out_dir` (the old one stays until the new one is
        complete). Inputs are only read.
    """
    from d2c_jax.cluster.output import cluster_dir, load_clusters

    clusters_dir = Path(clusters_dir)
    assignment, merged = load_clusters(clusters_dir)
    base = GGUFBase.read(base_gguf)
    singles = single_adapter_bytes(library_dir, base, dtype) if library_dir is not None else None
    by_cluster: dict[int, list[str]] = {}
    for task, c in assignment.items():
        by_cluster.setdefault(c, []).append(task)
    adapters: dict[str, dict[str, Any]] = {}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for c in sorted(by_cluster):
            name = cluster_dir("", c).name
            params, scale = merged.adapter(merged.index(name))
            file_name = adapter_file_name(name)
            size = write_gguf_adapter(
                tmp / file_name,
                params,
                scale,
                base,
                dtype=dtype,
                name=name,
                tasks=sorted(by_cluster[c]),
            )
            adapters[name] = {
                "file": file_name,
                "bytes": size,
                "sha256": sha256_file(tmp / file_name),
                "rank": merged.rank,
                "alpha": scale * merged.rank,
                "tasks": sorted(by_cluster[c]),
                "members": _members(cluster_dir(clusters_dir, c)),
            }
        merged_bytes = sum(a["bytes"] for a in adapters.values())
        single_total = None if singles is None else sum(singles.values())
        manifest = {
            "format": "llama.cpp-lora-gguf",
            "version": ROUTING_FORMAT,
            "dtype": dtype,
            "base_model": {
                "name": merged.base_model,
                "gguf_name": base.name,
                "file": str(base.path.resolve()),
                "file_name": base.path.name,
                "bytes": base.path.stat().st_size,
                "sha256": sha256_file(base.path),
                "architecture": base.architecture,
            },
            "routes": {
                task: adapters[cluster_dir("", c).name]["file"]
                for task, c in sorted(assignment.items())
            },
            "adapters": adapters,
            "storage": {
                "num_adapters": len(adapters),
                "adapters_bytes": merged_bytes,
                "num_single_adapters": None if singles is None else len(singles),
                "single_adapters_bytes": single_total,
                "fraction": None if not single_total else merged_bytes / single_total,
            },
            "source": {
                "clusters": str(clusters_dir.resolve()),
                "library": None if library_dir is None else str(Path(library_dir).resolve()),
            },
        }
        write_json_atomic(tmp / ROUTING_NAME, manifest)
    return manifest
