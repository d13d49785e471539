"""The adapter library: N PEFT LoRA adapters for one base model as one stacked pytree.

A library on disk is a directory holding one PEFT adapter directory per task
(``<library>/<task>/adapter_config.json`` + ``adapter_model.safetensors``); the
directory name is the task name. In memory it is

    params = {module: {"A": [N, L, r, d_in], "B": [N, L, d_out, r]}}   float32
    scale  = [N]                                                     float32

with PEFT orientation (A is ``r x d_in``, B is ``d_out x r``) and ``scale`` =
``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA), so adapter n adds
``scale[n] * B[n, l] @ A[n, l]`` to the weight of ``module`` in layer l. The layer
axis L is second so a model can ``lax.scan`` over layers and the merge kernels can
batch over N.

Validation is strict and names the offending file: every adapter must be a plain
LoRA (no DoRA, lora_bias, bias training, modules_to_save, rank/alpha patterns,
layer subsets, fan_in_fan_out), for the same base model and the same target
modules, with finite weights of consistent shapes covering every layer.
Adapters of *different ranks* are supported by zero-padding to the largest rank:
padding rows of A and columns of B with zeros leaves ``B @ A`` unchanged, and each
adapter keeps its own ``scale`` (computed from its own r), so deltas are exact.

This module also writes adapters back in PEFT format (``save_peft_adapter``,
loadable by ``peft.PeftModel.from_pretrained``) and saves or restores a whole
stacked library with orbax (``save`` / ``restore``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# How an adapter was made (task, merge settings, members) sits beside the PEFT files,
# not inside adapter_config.json, whose unknown keys make PEFT warn about its version.
PROVENANCE_NAME = "d2c_jax.json"
LIBRARY_META_NAME = "library.json"
ARRAYS_DIR_NAME = "arrays"

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
SUPPORTED_MODULES = ATTENTION_MODULES + MLP_MODULES

# A PEFT LoRA key for a Llama-family decoder, e.g.
# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
_KEY_PATTERN = re.compile(
    r"^base_model\.model\.model\.layers\.(?P<layer>\d+)\.(?P<group>self_attn|mlp)\."
    r"(?P<module>\w+)\.lora_(?P<factor>[AB])\.weight$"
)

# Config fields that change what an adapter computes and that we do not implement.
# Each maps to the value that means "feature off".
_UNSUPPORTED_WHEN_SET: dict[str, Any] = {
    "use_dora": False,
    "lora_bias": False,
    "fan_in_fan_out": False,
    "use_qalora": False,
}
_UNSUPPORTED_WHEN_NONEMPTY = (
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layer_replication",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "target_parameters",
)

LoraParams = dict[str, dict[str, jax.Array]]


def embedded_library_dir() -> Path:
    """The library of 40 adapters for the embedded SmolLM2 shipped with the package."""
    return Path(__file__).parent / "data" / "library"


class AdapterError(ValueError):
    """An adapter file or directory is missing, malformed or unsupported."""


def module_group(module: str) -> str:
    """The submodule of a decoder layer that holds `module` (``self_attn`` or ``mlp``)."""
    if module in ATTENTION_MODULES:
        return "self_attn"
    if module in MLP_MODULES:
        return "mlp"
    raise AdapterError(
        f"unsupported target module {module!r}; supported: {', '.join(SUPPORTED_MODULES)}"
    )


def peft_key(layer: int, module: str, factor: str) -> str:
    """The safetensors key PEFT uses for `factor` ("A" or "B") of `module` in `layer`."""
    group = module_group(module)
    return f"base_model.model.model.layers.{layer}.{group}.{module}.lora_{factor}.weight"


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """What one adapter directory declares, after validation."""

    path: Path
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    base_model: str | None

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.use_rslora)


def _read_config(adapter_dir: Path) -> AdapterSpec:
    config_path = adapter_dir / CONFIG_NAME
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {adapter_dir}")
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing PEFT adapter config")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{config_path}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: expected a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"{config_path}: peft_type is {peft_type!r}; only LORA is supported")
    for field, off in _UNSUPPORTED_WHEN_SET.items():
        if config.get(field, off) not in (off, None):
            raise AdapterError(f"{config_path}: {field}={config[field]!r} is not supported")
    for field in _UNSUPPORTED_WHEN_NONEMPTY:
        if config.get(field):
            raise AdapterError(f"{config_path}: {field}={config[field]!r} is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{config_path}: bias={config['bias']!r} is not supported (only 'none')")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank <= 0:
        raise AdapterError(f"{config_path}: r must be a positive integer, got {rank!r}")
    if not isinstance(alpha, int | float) or alpha <= 0:
        raise AdapterError(f"{config_path}: lora_alpha must be a positive number, got {alpha!r}")
    modules = config.get("target_modules")
    if isinstance(modules, str):
        raise AdapterError(
            f"{config_path}: target_modules as a regex ({modules!r}) is not supported; "
            "give a list of module names"
        )
    if not modules or not all(isinstance(m, str) for m in modules):
        raise AdapterError(f"{config_path}: target_modules must be a non-empty list of names")
    for module in modules:
        if module not in SUPPORTED_MODULES:
            raise AdapterError(
                f"{config_path}: target module {module!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODULES)}"
            )
    return AdapterSpec(
        path=adapter_dir,
        rank=rank,
        alpha=float(alpha),
        use_rslora=bool(config.get("use_rslora", False)),
        target_modules=tuple(sorted(modules)),
        base_model=config.get("base_model_name_or_path"),
    )


def _read_weights(spec: AdapterSpec) -> dict[str, dict[str, np.ndarray]]:
    """Read one adapter's factors as ``{module: {"A": [L, r, d_in], "B": [L, d_out, r]}}``."""
    from safetensors import SafetensorError
    from safetensors.flax import load_file

    weights_path = spec.path / WEIGHTS_NAME
    if not weights_path.is_file():
        if (spec.path / "adapter_model.bin").is_file():
            raise AdapterError(
                f"{spec.path}: only adapter_model.safetensors is supported, found adapter_model.bin"
            )
        raise FileNotFoundError(f"{weights_path}: missing adapter weights")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{weights_path}: cannot read safetensors ({err})") from err

    found: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    for key, value in tensors.items():
        match = _KEY_PATTERN.match(key)
        if match is None:
            raise AdapterError(
                f"{weights_path}: unexpected tensor {key!r} (not a plain LoRA factor)"
            )
        module = match["module"]
        if module not in spec.target_modules:
            raise AdapterError(
                f"{weights_path}: tensor {key!r} is for module {module!r}, "
                f"which is not in target_modules {list(spec.target_modules)}"
            )
        if match["group"] != module_group(module):
            raise AdapterError(f"{weights_path}: tensor {key!r} is under the wrong submodule")
        array = np.asarray(value.astype(jnp.float32))
        if array.ndim != 2:
            raise AdapterError(
                f"{weights_path}: tensor {key!r} has shape {array.shape}, expected 2-D"
            )
        if not np.isfinite(array).all():
            raise AdapterError(f"{weights_path}: tensor {key!r} contains NaN or Inf")
        found.setdefault(module, {}).setdefault(match["factor"], {})[int(match["layer"])] = array

    result: dict[str, dict[str, np.ndarray]] = {}
    for module in spec.target_modules:
        factors = found.get(module, {})
        layers_a, layers_b = sorted(factors.get("A", {})), sorted(factors.get("B", {}))
        if not layers_a:
            raise AdapterError(f"{weights_path}: no LoRA tensors for target module {module!r}")
        if layers_a != layers_b or layers_a != list(range(len(layers_a))):
            raise AdapterError(
                f"{weights_path}: module {module!r} must have lora_A and lora_B for every layer "
                f"0..L-1; found A for layers {layers_a}, B for layers {layers_b}"
            )
        stacked = {}
        for factor in "AB":
            shapes = {factors[factor][layer].shape for layer in layers_a}
            if len(shapes) != 1:
                raise AdapterError(
                    f"{weights_path}: lora_{factor} of {module!r} has different shapes across "
                    f"layers: {sorted(shapes)}"
                )
            stacked[factor] = np.stack([factors[factor][layer] for layer in layers_a])
        a, b = stacked["A"], stacked["B"]
        if a.shape[1] != spec.rank or b.shape[2] != spec.rank:
            raise AdapterError(
                f"{weights_path}: {module!r} has lora_A {a.shape[1:]} and lora_B {b.shape[1:]}, "
                f"expected [r, d_in] and [d_out, r] with r={spec.rank} from {CONFIG_NAME}"
            )
        result[module] = {"A": a, "B": b}
    layer_counts = {m: f["A"].shape[0] for m, f in result.items()}
    if len(set(layer_counts.values())) != 1:
        raise AdapterError(
            f"{weights_path}: modules cover different numbers of layers: {layer_counts}"
        )
    return result


def _pad_rank(factors: dict[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """Zero-pad A [L, r, d_in] and B [L, d_out, r] to `rank`; B @ A is unchanged."""
    a, b = factors["A"], factors["B"]
    extra = rank - a.shape[1]
    if extra == 0:
        return factors
    return {
        "A": np.pad(a, ((0, 0), (0, extra), (0, 0))),
        "B": np.pad(b, ((0, 0), (0, 0), (0, extra))),
    }


def _adapter_dirs(source: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Adapter directories from a library directory or an explicit list of adapter dirs."""
    if isinstance(source, str | os.PathLike):
        root = Path(source)
        if not root.is_dir():
            raise FileNotFoundError(f"library directory not found: {root}")
        if (root / CONFIG_NAME).is_file():
            return [root]
        dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not dirs:
            raise AdapterError(f"{root}: no adapter directories (expected <task>/{CONFIG_NAME})")
        return dirs
    dirs = [Path(p) for p in source]
    if not dirs:
        raise AdapterError("no adapter directories given")
    return dirs


@dataclasses.dataclass(frozen=True)
class AdapterLibrary:
    """N LoRA adapters for one base model, stacked along a leading axis.

    Attributes:
      names: task name of each adapter (its directory name), length N.
      params: ``{module: {"A": [N, L, r, d_in], "B": [N, L, d_out, r]}}`` float32.
      scale: ``[N]`` float32, each adapter's own alpha/r (or alpha/sqrt(r), rsLoRA).
      rank: r of the stacked factors (the largest rank; smaller ones are zero-padded).
      ranks: each adapter's own rank, length N.
      target_modules: sorted module names, the keys of `params`.
      base_model: the shared ``base_model_name_or_path`` (may be None).
    """

    names: tuple[str, ...]
    params: LoraParams
    scale: jax.Array
    rank: int
    ranks: tuple[int, ...]
    target_modules: tuple[str, ...]
    base_model: str | None

    def __post_init__(self):
        n = len(self.names)
        if len(set(self.names)) != n:
            raise AdapterError(f"adapter names must be unique, got {list(self.names)}")
        if self.scale.shape != (n,):
            raise AdapterError(f"scale has shape {self.scale.shape}, expected ({n},)")
        for module, factors in self.params.items():
            a, b = factors["A"], factors["B"]
            if a.ndim != 4 or b.ndim != 4 or a.shape[0] != n or b.shape[0] != n:
                raise AdapterError(
                    f"{module}: expected A [N, L, r, d_in] and B [N, L, d_out, r] with N={n}, "
                    f"got {a.shape} and {b.shape}"
                )
            if a.shape[1] != b.shape[1] or a.shape[2] != self.rank or b.shape[3] != self.rank:
                raise AdapterError(
                    f"{module}: A {a.shape} and B {b.shape} disagree on L or on r={self.rank}"
                )

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, source: str | os.PathLike | Iterable[str | os.PathLike]) -> AdapterLibrary:
        """Load a library directory (one PEFT adapter per subdirectory) or a list of dirs."""
        dirs = _adapter_dirs(source)
        specs = [_read_config(d) for d in dirs]
        first = specs[0]
        for spec in specs[1:]:
            if spec.base_model != first.base_model:
                raise AdapterError(
                    f"{spec.path / CONFIG_NAME}: base_model_name_or_path {spec.base_model!r} "
                    f"differs from {first.base_model!r} in {first.path / CONFIG_NAME}; "
                    "a library holds adapters of one base model"
                )
            if spec.target_modules != first.target_modules:
                raise AdapterError(
                    f"{spec.path / CONFIG_NAME}: target_modules {list(spec.target_modules)} differ "
                    f"from {list(first.target_modules)} in {first.path / CONFIG_NAME}"
                )
        weights = [_read_weights(spec) for spec in specs]
        rank = max(spec.rank for spec in specs)
        params: LoraParams = {}
        for module in first.target_modules:
            ref_a, ref_b = weights[0][module]["A"], weights[0][module]["B"]
            for spec, w in zip(specs, weights, strict=True):
                a, b = w[module]["A"], w[module]["B"]
                if (a.shape[0], a.shape[2], b.shape[1]) != (
                    ref_a.shape[0],
                    ref_a.shape[2],
                    ref_b.shape[1],
                ):
                    raise AdapterError(
                        f"{spec.path / WEIGHTS_NAME}: {module!r} has L={a.shape[0]}, "
                        f"d_in={a.shape[2]}, d_out={b.shape[1]} but {first.path / WEIGHTS_NAME} "
                        f"has L={ref_a.shape[0]}, d_in={ref_a.shape[2]}, d_out={ref_b.shape[1]}"
                    )
            padded = [_pad_rank(w[module], rank) for w in weights]
            params[module] = {
                factor: jnp.asarray(np.stack([p[factor] for p in padded])) for factor in "AB"
            }
        return cls(
            names=tuple(d.name for d in dirs),
            params=params,
            scale=jnp.asarray([spec.scale for spec in specs], dtype=jnp.float32),
            rank=rank,
            ranks=tuple(spec.rank for spec in specs),
            target_modules=first.target_modules,
            base_model=first.base_model,
        )

    # --------------------------------------------------------------- properties

    @property
    def num_adapters(self) -> int:
        return len(self.names)

    @property
    def num_layers(self) -> int:
        return next(iter(self.params.values()))["A"].shape[1]

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """``{module: (d_out, d_in)}``."""
        return {m: (f["B"].shape[2], f["A"].shape[3]) for m, f in self.params.items()}

    def adapter_bytes(self, dtype=jnp.bfloat16) -> int:
        """Bytes of one rank-r adapter's factors stored in `dtype` (what a merged adapter costs)."""
        itemsize = jnp.dtype(dtype).itemsize
        return sum((f["A"][0].size + f["B"][0].size) * itemsize for f in self.params.values())

    def storage_bytes(self, dtype=jnp.bfloat16) -> int:
        """Bytes of the whole library's factors in `dtype`."""
        return self.num_adapters * self.adapter_bytes(dtype)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no adapter named {name!r} in the library") from None

    def adapter(self, i: int) -> tuple[LoraParams, float]:
        """Adapter i as ``({module: {"A": [L, r, d_in], "B": [L, d_out, r]}}, scale)``."""
        return jax.tree.map(lambda x: x[i], self.params), float(self.scale[i])

    def subset(self, indices: Iterable[int]) -> AdapterLibrary:
        """The adapters at `indices`, in that order."""
        idx = list(indices)
        return dataclasses.replace(
            self,
            names=tuple(self.names[i] for i in idx),
            params=jax.tree.map(lambda x: x[jnp.asarray(idx)], self.params),
            scale=self.scale[jnp.asarray(idx)],
            ranks=tuple(self.ranks[i] for i in idx),
        )

    # ------------------------------------------------------------ orbax save/restore

    def save(self, path: str | os.PathLike) -> None:
        """Save the stacked library with orbax (arrays) plus a JSON of metadata, atomically."""
        import orbax.checkpoint as ocp

        path = Path(path).absolute()
        if path.exists():
            raise FileExistsError(f"{path} already exists")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            with ocp.StandardCheckpointer() as checkpointer:
                checkpointer.save(
                    tmp / ARRAYS_DIR_NAME, {"params": self.params, "scale": self.scale}
                )
            meta = {
                "names": list(self.names),
                "rank": self.rank,
                "ranks": list(self.ranks),
                "target_modules": list(self.target_modules),
                "base_model": self.base_model,
            }
            (tmp / LIBRARY_META_NAME).write_text(json.dumps(meta, indent=2))
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def restore(cls, path: str | os.PathLike) -> AdapterLibrary:
        """Restore a library written by `save`."""
        import orbax.checkpoint as ocp

        path = Path(path).absolute()
        meta_path = path / LIBRARY_META_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: missing (not a saved AdapterLibrary)")
        meta = json.loads(meta_path.read_text())
        with ocp.StandardCheckpointer() as checkpointer:
            arrays = checkpointer.restore(path / ARRAYS_DIR_NAME)
        return cls(
            names=tuple(meta["names"]),
            params={
                m: {f: jnp.asarray(x) for f, x in fs.items()} for m, fs in arrays["params"].items()
            },
            scale=jnp.asarray(arrays["scale"]),
            rank=int(meta["rank"]),
            ranks=tuple(meta["ranks"]),
            target_modules=tuple(meta["target_modules"]),
            base_model=meta["base_model"],
        )


# ------------------------------------------------------------------- PEFT writing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text`; a killed run leaves the old file or none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def finite_json(data: Any) -> Any:
    """`data` with every NaN or infinite float replaced by None (JSON has neither)."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, Mapping):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [finite_json(v) for v in data]
    return data


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented UTF-8 JSON (NaN and Infinity as null); a killed run
    leaves the old file or none."""
    text = json.dumps(finite_json(data), indent=2, ensure_ascii=False, allow_nan=False)
    write_text_atomic(path, text + "\n")


def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False):
    """Context manager yielding a temp dir that replaces `out_dir` only on success.

    A run killed inside the block leaves `out_dir` untouched (at worst a hidden
    ``.<name>.*`` temp directory next to it).
    """
    return _AtomicDirectory(Path(out_dir), overwrite)


class _AtomicDirectory:
    def __init__(self, out_dir: Path, overwrite: bool):
        self.out_dir = out_dir.absolute()
        self.overwrite = overwrite
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        if self.out_dir.exists() and not self.overwrite:
            raise FileExistsError(f"{self.out_dir} already exists (refusing to overwrite)")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", dir=self.out_dir.parent))
        # mkdtemp makes the directory private (0700); give it the usual permissions.
        self.tmp.chmod(0o777 & ~_umask())
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.out_dir.exists() or self.out_dir.is_symlink():
            old = Path(
                tempfile.mkdtemp(prefix=f".{self.out_dir.name}.old.", dir=self.out_dir.parent)
            )
            os.replace(self.out_dir, old / "old")
            try:
                os.replace(self.tmp, self.out_dir)
            except BaseException:
                os.replace(old / "old", self.out_dir)
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out_dir)
        return False


def write_peft_files(
    directory: Path,
    params: Mapping[str, Mapping[str, Any]],
    *,
    rank: int,
    alpha: float,
    base_model: str | None,
    dtype=jnp.bfloat16,
    use_rslora: bool = False,
    provenance: Mapping[str, Any] | None = None,
) -> None:
    """Write adapter_config.json + adapter_model.safetensors into an existing directory.

    Args:
      params: ``{module: {"A": [L, r, d_in], "B": [L, d_out, r]}}``.
      provenance: JSON-serialisable record of how the adapter was made (e.g. a merge's
        settings and members), written to ``PROVENANCE_NAME`` beside the PEFT files.
    """
    from safetensors.flax import save_file

    tensors = {}
    for module, factors in params.items():
        a, b = jnp.asarray(factors["A"]), jnp.asarray(factors["B"])
        if a.ndim != 3 or b.ndim != 3 or a.shape[1] != rank or b.shape[2] != rank:
            raise AdapterError(
                f"{module}: expected A [L, r, d_in] and B [L, d_out, r] with r={rank}, "
                f"got {a.shape} and {b.shape}"
            )
        if not (bool(jnp.isfinite(a).all()) and bool(jnp.isfinite(b).all())):
            raise AdapterError(f"{module}: refusing to write NaN or Inf")
        for layer in range(a.shape[0]):
            tensors[peft_key(layer, module, "A")] = a[layer].astype(dtype)
            tensors[peft_key(layer, module, "B")] = b[layer].astype(dtype)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": int(rank),
        "lora_alpha": float(alpha),
        "use_rslora": bool(use_rslora),
        "target_modules": sorted(params),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "inference_mode": True,
    }
    if provenance:
        (directory / PROVENANCE_NAME).write_text(json.dumps(dict(provenance), indent=2) + "\n")
    save_file(tensors, str(directory / WEIGHTS_NAME))
    # safetensors may create the file private (0600); give it the umask's mode (0644)
    # like every other output.
    (directory / WEIGHTS_NAME).chmod(0o666 & ~_umask())
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_peft_adapter(
    out_dir: str | os.PathLike,
    params: Mapping[str, Mapping[str, Any]],
    *,
    rank: int,
    alpha: float,
    base_model: str | None,
    dtype=jnp.bfloat16,
    use_rslora: bool = False,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write one adapter as a PEFT directory, atomically. Returns the directory.

    The adapter computes ``lora_scale(alpha, rank, use_rslora) * B @ A``; merged
    adapters whose scale is folded into the factors are written with ``alpha = rank``.
    """
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_peft_files(
            tmp,
            params,
            rank=rank,
            alpha=alpha,
            base_model=base_model,
            dtype=dtype,
            use_rslora=use_rslora,
            provenance=provenance,
        )
    return Path(out_dir)
