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

Every LoRA layout PEFT writes for a decoder's layers is read exactly; the tensors
in ``adapter_model.safetensors`` decide which (layer, module) pairs an adapter has,
and the config decides what they compute:

* ``target_modules`` as names or as a regex (PEFT's ``re.fullmatch`` on the module's
  full name), ``exclude_modules``, ``layers_to_transform`` / ``layers_pattern``: a
  tensor for a module the config could not have targeted is refused, and so is a
  module the config targets in a layer where the adapter has none of its tensors.
* ``rank_pattern`` / ``alpha_pattern`` (PEFT's ``get_pattern_key``): the library keeps
  one scale per adapter (from the config's ``r`` and ``lora_alpha``), so a module
  whose own ``alpha_m / r_m`` (or ``alpha_m / sqrt(r_m)``, rsLoRA) differs has the
  ratio folded into its B. Smaller ranks are zero-padded to the library's rank:
  padding rows of A and columns of B with zeros leaves ``B @ A`` unchanged.
* A (layer, module) pair an adapter lacks (a layer subset, or another module set
  than the rest of the library) is stored as zero A and zero B: its delta is 0.
  The library's modules are the union over its adapters.
* Keys under ``base_model.model.model.`` (Llama-family CausalLMs) or
  ``base_model.model.model.language_model.`` (Gemma 3 and other multimodal
  checkpoints); the library records which (``key_prefix``) so adapters written back
  load in PEFT for the same model. Module names are free (``qkv_proj`` and
  ``gate_up_proj`` of Phi-3 too); whether they fit a base model is checked there.

Still refused, naming the offending file: DoRA, lora_bias, bias training,
modules_to_save, fan_in_fan_out and the other variants that change the math,
non-finite weights, inconsistent shapes, mixed key prefixes, and any directory
entry that is not a readable adapter (never skipped silently). Adapters recording
different base model names only warn (`LibraryWarning`): a name says too little,
and the base-model check compares shapes and weights.

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
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# write_json_atomic is re-exported for d2c_jax.commands.cluster, which imports it from here.
from d2c_jax.io import atomic_directory, umask, write_json_atomic  # noqa: F401

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# How an adapter was made (task, merge settings, members) sits beside the PEFT files,
# not inside adapter_config.json, whose unknown keys make PEFT warn about its version.
PROVENANCE_NAME = "d2c_jax.json"
LIBRARY_META_NAME = "library.json"
ARRAYS_DIR_NAME = "arrays"

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
# The modules of a Llama-family decoder layer (what `d2c train` can adapt). Reading
# accepts any module name; the base-model check decides whether it fits.
SUPPORTED_MODULES = ATTENTION_MODULES + MLP_MODULES
# Modules PEFT finds under a layer's ``mlp`` (Phi-3 fuses gate and up); every other
# module is under ``self_attn``. Keys name the submodule, so writing back needs this.
_MLP_GROUP = frozenset((*MLP_MODULES, "gate_up_proj"))

# What PEFT puts before a base model's own module names in its safetensors keys.
PEFT_ROOT = "base_model.model."
DEFAULT_KEY_PREFIX = "base_model.model.model."
# Where a decoder's layers live: a CausalLM (``model.layers``) or the language tower
# of a multimodal model (Gemma 3: ``model.language_model.layers``).
KEY_PREFIXES = (DEFAULT_KEY_PREFIX, "base_model.model.model.language_model.")

# A PEFT LoRA key of a decoder layer, e.g.
# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
_KEY_PATTERN = re.compile(
    r"^(?P<prefix>base_model\.model\.model\.(?:language_model\.)?)layers\.(?P<layer>\d+)\."
    r"(?P<group>self_attn|mlp)\.(?P<module>\w+)\.lora_(?P<factor>[AB])\.weight$"
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
    "layer_replication",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "target_parameters",
)

LoraParams = dict[str, dict[str, jax.Array]]


def embedded_library_dir(base: str = "default") -> Path:
    """The library shipped for an embedded base: ``data/library`` (40 adapters for the
    default SmolLM2), ``data/library-<base>`` for another (``gemma3-270m``)."""
    root = Path(__file__).parent / "data"
    return root / "library" if base == "default" else root / f"library-{base}"


class AdapterError(ValueError):
    """An adapter file or directory is missing, malformed or unsupported."""


class LibraryWarning(UserWarning):
    """The adapters of a library record different base model names (shapes decide)."""


def module_group(module: str) -> str:
    """The submodule of a decoder layer that holds `module` (``self_attn`` or ``mlp``)."""
    return "mlp" if module in _MLP_GROUP else "self_attn"


def module_name(key_prefix: str, layer: int, module: str) -> str:
    """The base model's own name of `module` in `layer`, as PEFT matches its config
    against it, e.g. ``model.layers.3.self_attn.q_proj``."""
    return f"{key_prefix.removeprefix(PEFT_ROOT)}layers.{layer}.{module_group(module)}.{module}"


def peft_key(layer: int, module: str, factor: str, key_prefix: str = DEFAULT_KEY_PREFIX) -> str:
    """The safetensors key PEFT uses for `factor` ("A" or "B") of `module` in `layer`."""
    return f"{PEFT_ROOT}{module_name(key_prefix, layer, module)}.lora_{factor}.weight"


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _normalized_name(name: str) -> str:
    """A base model name as spelled by a path or a hub id: its last component."""
    return Path(str(name).rstrip("/")).name.lower().removesuffix(".gguf")


# ------------------------------------------------------------- PEFT's matching rules


def _matches_names(names: str | tuple[str, ...], name: str) -> bool:
    """PEFT's rule for a name list or regex (``target_modules``, ``exclude_modules``):
    a regex must ``re.fullmatch`` the full name; a listed name must equal it or be its
    last dotted components."""
    if isinstance(names, str):
        return re.fullmatch(names, name) is not None
    return name in names or any(name.endswith(f".{n}") for n in names)


def _layer_index(name: str, layers_pattern: tuple[str, ...]) -> int | None:
    """The layer index PEFT reads from `name` for ``layers_to_transform``: the first
    numbered component (after one of `layers_pattern` when given)."""
    match = None
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    for pattern in layers_pattern:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
        if match is not None:
            break
    return None if match is None else int(match["idx"])


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the value of the first key ``k`` (a regex) with
    ``re.match(rf"(.*\\.)?({k})$", name)``, else `default`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """What one adapter directory declares, after validation (PEFT's LoraConfig)."""

    path: Path
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: str | tuple[str, ...]  # a regex, or names
    base_model: str | None
    exclude_modules: str | tuple[str, ...] = ()
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] = ()
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)

    @property
    def scale(self) -> float:
        """The adapter's scale from ``r`` and ``lora_alpha`` (the library's ``scale[n]``)."""
        return lora_scale(self.alpha, self.rank, self.use_rslora)

    def targets(self, name: str) -> bool:
        """PEFT's ``check_target_module_exists`` for a module's full name."""
        if self.exclude_modules and _matches_names(self.exclude_modules, name):
            return False
        if isinstance(self.target_modules, str):
            # "all-linear" is PEFT's shorthand (expanded when it builds the model).
            return self.target_modules.lower() == "all-linear" or _matches_names(
                self.target_modules, name
            )
        if name in self.target_modules:
            return True  # a full name is taken as it is, whatever the layer subset
        if not _matches_names(self.target_modules, name):
            return False
        if self.layers_to_transform is None:
            return True
        return _layer_index(name, self.layers_pattern) in self.layers_to_transform

    def module_scale(self, name: str) -> tuple[int, float]:
        """PEFT's rank and scaling of module `name` (``rank_pattern``, ``alpha_pattern``)."""
        rank = _pattern_value(self.rank_pattern, name, self.rank)
        alpha = _pattern_value(self.alpha_pattern, name, self.alpha)
        return rank, lora_scale(alpha, rank, self.use_rslora)

    def describe_targets(self) -> str:
        """The config fields that decide which modules the adapter has."""
        fields = {
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
        }
        return ", ".join(f"{k}={v!r}" for k, v in fields.items() if v)


# ---------------------------------------------------------------- reading configs


def _check_adapter_dir(path: Path) -> None:
    """Raise naming `path` unless it is a readable directory with an adapter config."""
    if path.is_symlink() and not path.exists():
        raise FileNotFoundError(f"{path}: dangling symlink (to {os.readlink(path)}), no adapter")
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {path}")
    try:
        entries = os.listdir(path)
    except PermissionError as err:
        raise AdapterError(
            f"{path}: cannot read the adapter directory (permission denied)"
        ) from err
    if CONFIG_NAME not in entries:
        raise FileNotFoundError(
            f"{path}: not a PEFT adapter directory (no {CONFIG_NAME}); "
            f"a library directory holds one <task>/{CONFIG_NAME} per adapter"
        )


def _read_json_config(config_path: Path) -> dict[str, Any]:
    try:
        config = json.loads(config_path.read_text())
    except PermissionError as err:
        raise AdapterError(f"{config_path}: cannot read (permission denied)") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{config_path}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: expected a JSON object")
    return config


def _check_plain_lora(config: Mapping[str, Any], config_path: Path) -> None:
    """Refuse the PEFT types and LoRA variants whose math we do not implement."""
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


def _check_regex(pattern: str, field: str, config_path: Path) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise AdapterError(f"{config_path}: {field} {pattern!r} is not a regex ({err})") from err


def _names(config: Mapping[str, Any], field: str, config_path: Path) -> str | tuple[str, ...]:
    """A PEFT name field (``target_modules``, ``exclude_modules``): a regex or names."""
    value = config.get(field) or ()
    if isinstance(value, str):
        _check_regex(value, field, config_path)
        return value
    if not isinstance(value, list | tuple) or not all(isinstance(m, str) for m in value):
        raise AdapterError(f"{config_path}: {field} must be a regex or a list of names")
    return tuple(value)


def _layers(config: Mapping[str, Any], config_path: Path) -> tuple[int, ...] | None:
    """``layers_to_transform`` as a tuple (None: every layer, as PEFT reads [] too)."""
    value = config.get("layers_to_transform")
    values = [value] if isinstance(value, int) else value
    if values is None or values == []:
        return None
    if not isinstance(values, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
    ):
        raise AdapterError(
            f"{config_path}: layers_to_transform must be a layer index or a list of them, "
            f"got {value!r}"
        )
    return tuple(values)


def _pattern(config: Mapping[str, Any], field: str, config_path: Path) -> dict[str, Any]:
    """``rank_pattern`` / ``alpha_pattern``: {regex: positive number}, in file order."""
    value = config.get(field) or {}
    kind = int if field == "rank_pattern" else int | float
    if not isinstance(value, dict) or not all(
        isinstance(v, kind) and not isinstance(v, bool) and v > 0 for v in value.values()
    ):
        what = "integers" if field == "rank_pattern" else "numbers"
        raise AdapterError(f"{config_path}: {field} must map names to positive {what}")
    for key in value:
        _check_regex(key, field, config_path)
    return dict(value)


def _read_config(adapter_dir: Path) -> AdapterSpec:
    _check_adapter_dir(adapter_dir)
    config_path = adapter_dir / CONFIG_NAME
    config = _read_json_config(config_path)
    _check_plain_lora(config, config_path)
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank <= 0:
        raise AdapterError(f"{config_path}: r must be a positive integer, got {rank!r}")
    if not isinstance(alpha, int | float) or alpha <= 0:
        raise AdapterError(f"{config_path}: lora_alpha must be a positive number, got {alpha!r}")
    targets = _names(config, "target_modules", config_path)
    if not targets:
        raise AdapterError(f"{config_path}: target_modules must be a regex or a list of names")
    layers = _layers(config, config_path)
    layers_pattern = config.get("layers_pattern") or ()
    layers_pattern = (layers_pattern,) if isinstance(layers_pattern, str) else tuple(layers_pattern)
    # PEFT's LoraConfig refuses these combinations when it reads the file.
    if isinstance(targets, str) and (layers is not None or layers_pattern):
        raise AdapterError(
            f"{config_path}: layers_to_transform / layers_pattern cannot be used with "
            "target_modules as a regex (PEFT refuses this config)"
        )
    if layers_pattern and layers is None:
        raise AdapterError(f"{config_path}: layers_pattern needs layers_to_transform")
    return AdapterSpec(
        path=adapter_dir,
        rank=rank,
        alpha=float(alpha),
        use_rslora=bool(config.get("use_rslora", False)),
        target_modules=targets,
        base_model=config.get("base_model_name_or_path"),
        exclude_modules=_names(config, "exclude_modules", config_path),
        layers_to_transform=layers,
        layers_pattern=layers_pattern,
        rank_pattern=_pattern(config, "rank_pattern", config_path),
        alpha_pattern=_pattern(config, "alpha_pattern", config_path),
    )


# ---------------------------------------------------------------- reading weights


@dataclasses.dataclass(frozen=True)
class _AdapterWeights:
    """One adapter's factors as read: ``{(module, layer): (A [r_m, d_in], B [d_out, r_m])}``
    with B already scaled by the module's own scale over the adapter's (exact deltas)."""

    spec: AdapterSpec
    key_prefix: str
    factors: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]

    @property
    def num_layers(self) -> int:
        return 1 + max(layer for _, layer in self.factors)

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.factors.values())

    @property
    def entries(self) -> int:
        """Factor entries the adapter's own file holds (at its own ranks)."""
        return sum(a.size + b.size for a, b in self.factors.values())


def _load_tensors(weights_path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a finite float32 2-D array."""
    from safetensors import SafetensorError
    from safetensors.flax import load_file

    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{weights_path}: cannot read safetensors ({err})") from err
    arrays = {}
    for key, value in tensors.items():
        array = np.asarray(value.astype(jnp.float32))
        if array.ndim != 2:
            raise AdapterError(
                f"{weights_path}: tensor {key!r} has shape {array.shape}, expected 2-D"
            )
        if not np.isfinite(array).all():
            raise AdapterError(f"{weights_path}: tensor {key!r} contains NaN or Inf")
        arrays[key] = array
    return arrays


def _pair_factors(
    weights_path: Path, tensors: Mapping[str, np.ndarray]
) -> tuple[str, dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]]:
    """The file's key prefix and ``{(module, layer): (A, B)}``, every pair complete."""
    prefixes: dict[str, str] = {}
    found: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for key, array in tensors.items():
        match = _KEY_PATTERN.match(key)
        if match is None:
            raise AdapterError(
                f"{weights_path}: tensor {key!r} is not a LoRA factor of a decoder layer "
                f"(expected <prefix>layers.<l>.<self_attn|mlp>.<module>.lora_<A|B>.weight with "
                f"prefix {' or '.join(KEY_PREFIXES)})"
            )
        module, group = match["module"], match["group"]
        if group != module_group(module):
            raise AdapterError(
                f"{weights_path}: tensor {key!r} puts {module!r} under {group!r}; PEFT keys "
                f"of Llama-family models have it under {module_group(module)!r}"
            )
        prefixes.setdefault(match["prefix"], key)
        found.setdefault((module, int(match["layer"])), {})[match["factor"]] = array
    if len(prefixes) > 1:
        raise AdapterError(f"{weights_path}: keys mix prefixes: {sorted(prefixes.values())[:2]}")
    if not found:
        raise AdapterError(f"{weights_path}: no LoRA tensors")
    pairs = {}
    for (module, layer), factor in sorted(found.items()):
        if len(factor) != 2:
            have, lack = ("lora_A", "lora_B") if "A" in factor else ("lora_B", "lora_A")
            raise AdapterError(
                f"{weights_path}: {module!r} of layer {layer} has {have} but no {lack}; "
                "every layer a module adapts needs both factors"
            )
        a, b = factor["A"], factor["B"]
        if a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{weights_path}: {module!r} of layer {layer} has lora_A {a.shape} and lora_B "
                f"{b.shape}, expected [r, d_in] and [d_out, r] with one r"
            )
        pairs[(module, layer)] = (a, b)
    return next(iter(prefixes)), pairs


def _check_targets(
    spec: AdapterSpec,
    weights_path: Path,
    key_prefix: str,
    pairs: Mapping[tuple[str, int], tuple[np.ndarray, np.ndarray]],
) -> None:
    """Every (module, layer) with tensors is one the config targets, with its rank, and
    every layer the config targets for a module the file has is there."""
    num_layers = 1 + max(layer for _, layer in pairs)
    for module in sorted({m for m, _ in pairs}):
        for layer in range(num_layers):
            name = module_name(key_prefix, layer, module)
            present, targeted = (module, layer) in pairs, spec.targets(name)
            if present and not targeted:
                raise AdapterError(
                    f"{weights_path}: has LoRA tensors for {name}, which {CONFIG_NAME} could "
                    f"not have targeted ({spec.describe_targets()})"
                )
            if targeted and not present:
                raise AdapterError(
                    f"{weights_path}: no lora_A/lora_B for {name}, which {CONFIG_NAME} targets "
                    f"({spec.describe_targets()}); every layer a module adapts needs both factors"
                )
            if not present:
                continue
            rank, want = pairs[(module, layer)][0].shape[0], spec.module_scale(name)[0]
            if rank != want:
                raise AdapterError(
                    f"{weights_path}: {name} has rank {rank}, but {CONFIG_NAME} gives r={want} "
                    "for it (from r and rank_pattern)"
                )


def _read_weights(spec: AdapterSpec) -> _AdapterWeights:
    """Read and check one adapter's factors, folding per-module scales into B."""
    weights_path = spec.path / WEIGHTS_NAME
    if not weights_path.is_file():
        if (spec.path / "adapter_model.bin").is_file():
            raise AdapterError(
                f"{spec.path}: only adapter_model.safetensors is supported, found adapter_model.bin"
            )
        raise FileNotFoundError(f"{weights_path}: missing adapter weights")
    key_prefix, pairs = _pair_factors(weights_path, _load_tensors(weights_path))
    _check_targets(spec, weights_path, key_prefix, pairs)
    factors = {}
    for (module, layer), (a, b) in pairs.items():
        ratio = spec.module_scale(module_name(key_prefix, layer, module))[1] / spec.scale
        if ratio != 1.0:  # rank_pattern / alpha_pattern: exact up to float32 rounding
            b = (b.astype(np.float64) * ratio).astype(np.float32)
        factors[(module, layer)] = (a, b)
    return _AdapterWeights(spec, key_prefix, factors)


# ------------------------------------------------------------ stacking a library


def _adapter_dirs(source: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Adapter directories from a library directory or an explicit list of adapter dirs.

    Every entry of a library directory that is a directory or a dangling symlink is an
    adapter (its checks name it); only hidden entries (our atomic writes' temporary
    directories) and plain files (manifests, notes) are not."""
    if not isinstance(source, str | os.PathLike):
        dirs = [Path(p) for p in source]
        if not dirs:
            raise AdapterError("no adapter directories given")
        return dirs
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"library directory not found: {root}")
    try:
        if (root / CONFIG_NAME).is_file():
            return [root]
        entries = sorted(root.iterdir())
    except PermissionError as err:
        raise AdapterError(
            f"{root}: cannot read the library directory (permission denied)"
        ) from err
    dirs = [
        p
        for p in entries
        if not p.name.startswith(".") and (p.is_dir() or (p.is_symlink() and not p.exists()))
    ]
    if not dirs:
        raise AdapterError(f"{root}: no adapter directories (expected <task>/{CONFIG_NAME})")
    return dirs


def _check_unique_names(dirs: list[Path]) -> None:
    seen: dict[str, Path] = {}
    for d in dirs:
        if d.name in seen:
            raise AdapterError(
                f"two adapters named {d.name!r}: {seen[d.name]} and {d}; an adapter's name "
                "(its directory name) must be unique in a library"
            )
        seen[d.name] = d


def _shared_base_model(specs: list[AdapterSpec]) -> str | None:
    """The first recorded base model name; other names only warn (spellings of one
    model: a trailing '/', a local path vs a hub id, are the same name)."""
    recorded = [s for s in specs if s.base_model]
    if not recorded:
        return None
    first = recorded[0]
    others = [
        s for s in recorded if _normalized_name(s.base_model) != _normalized_name(first.base_model)
    ]
    if others:
        listed = "; ".join(f"{s.path / CONFIG_NAME}: {s.base_model!r}" for s in others[:3])
        warnings.warn(
            f"{len(others)} adapter(s) record another base_model_name_or_path than "
            f"{first.base_model!r} ({first.path / CONFIG_NAME}): {listed}"
            f"{'; ...' if len(others) > 3 else ''}; using {first.base_model!r} (the base "
            "model check compares shapes and weights)",
            LibraryWarning,
            stacklevel=3,
        )
    return first.base_model


def _shared_key_prefix(adapters: list[_AdapterWeights]) -> str:
    first = adapters[0]
    for adapter in adapters[1:]:
        if adapter.key_prefix != first.key_prefix:
            raise AdapterError(
                f"{adapter.spec.path / WEIGHTS_NAME}: keys start with {adapter.key_prefix!r} but "
                f"{first.spec.path / WEIGHTS_NAME} has {first.key_prefix!r}; a library holds "
                "adapters of one model layout"
            )
    return first.key_prefix


def _module_shapes(adapters: list[_AdapterWeights]) -> dict[str, tuple[int, int]]:
    """``{module: (d_out, d_in)}`` over the union of the adapters' modules, which must
    agree on every layer of every adapter."""
    shapes: dict[str, tuple[tuple[int, int], Path, int]] = {}
    for adapter in adapters:
        path = adapter.spec.path / WEIGHTS_NAME
        for (module, layer), (a, b) in adapter.factors.items():
            shape = (b.shape[0], a.shape[1])
            ref, ref_path, ref_layer = shapes.setdefault(module, (shape, path, layer))
            if shape != ref:
                raise AdapterError(
                    f"{path}: {module!r} of layer {layer} has d_in={shape[1]}, d_out={shape[0]} "
                    f"but {ref_path} has d_in={ref[1]}, d_out={ref[0]} in layer {ref_layer}"
                )
    return {module: shape for module, (shape, _, _) in sorted(shapes.items())}


def _stack(
    adapters: list[_AdapterWeights], shapes: Mapping[str, tuple[int, int]], depth: int, rank: int
) -> LoraParams:
    """``{module: {"A": [N, L, r, d_in], "B": [N, L, d_out, r]}}``; what an adapter lacks
    (a layer, a module, rank beyond its own) stays exactly zero."""
    n = len(adapters)
    stacked = {
        module: {
            "A": np.zeros((n, depth, rank, d_in), np.float32),
            "B": np.zeros((n, depth, d_out, rank), np.float32),
        }
        for module, (d_out, d_in) in shapes.items()
    }
    for i, adapter in enumerate(adapters):
        for (module, layer), (a, b) in adapter.factors.items():
            stacked[module]["A"][i, layer, : a.shape[0]] = a
            stacked[module]["B"][i, layer, :, : b.shape[1]] = b
    return {m: {f: jnp.asarray(x) for f, x in fs.items()} for m, fs in stacked.items()}


@dataclasses.dataclass(frozen=True)
class AdapterLibrary:
    """N LoRA adapters for one base model, stacked along a leading axis.

    Attributes:
      names: task name of each adapter (its directory name), length N.
      params: ``{module: {"A": [N, L, r, d_in], "B": [N, L, d_out, r]}}`` float32; the
        union of the adapters' modules, zeros where an adapter has no factors.
      scale: ``[N]`` float32, each adapter's own alpha/r (or alpha/sqrt(r), rsLoRA) from
        its config's ``r`` and ``lora_alpha``; modules with another rank or alpha
        (``rank_pattern`` / ``alpha_pattern``) have the ratio folded into B.
      rank: r of the stacked factors (the largest rank; smaller ones are zero-padded).
      ranks: each adapter's own (largest) rank, length N: ``[..., :ranks[n], :]`` of A
        and ``[..., :ranks[n]]`` of B hold all of adapter n.
      target_modules: sorted module names, the keys of `params`.
      base_model: the first recorded ``base_model_name_or_path`` (may be None).
      key_prefix: where the decoder's layers are in PEFT keys (`KEY_PREFIXES`), used
        when the library's adapters are written back.
      stored_entries: factor entries each adapter's own PEFT file holds (its modules and
        layers at its own ranks), length N; None for a library built in memory, which
        counts as N rank-r adapters over all modules.
    """

    names: tuple[str, ...]
    params: LoraParams
    scale: jax.Array
    rank: int
    ranks: tuple[int, ...]
    target_modules: tuple[str, ...]
    base_model: str | None
    key_prefix: str = DEFAULT_KEY_PREFIX
    stored_entries: tuple[int, ...] | None = None

    def __post_init__(self):
        n = len(self.names)
        if len(set(self.names)) != n:
            raise AdapterError(f"adapter names must be unique, got {list(self.names)}")
        if self.scale.shape != (n,):
            raise AdapterError(f"scale has shape {self.scale.shape}, expected ({n},)")
        if self.key_prefix not in KEY_PREFIXES:
            raise AdapterError(f"key_prefix {self.key_prefix!r} is not one of {KEY_PREFIXES}")
        if self.stored_entries is not None and len(self.stored_entries) != n:
            raise AdapterError(f"stored_entries has {len(self.stored_entries)} values for N={n}")
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
    def load(
        cls,
        source: str | os.PathLike | Iterable[str | os.PathLike],
        num_layers: int | None = None,
    ) -> AdapterLibrary:
        """Load a library directory (one PEFT adapter per subdirectory) or a list of dirs.

        Args:
          num_layers: the base model's L. Without it L is one past the deepest layer any
            adapter has, short of the base when every adapter skips its last layers
            (``layers_to_transform``).
        """
        dirs = _adapter_dirs(source)
        _check_unique_names(dirs)
        specs = [_read_config(d) for d in dirs]
        base_model = _shared_base_model(specs)
        adapters = [_read_weights(spec) for spec in specs]
        key_prefix = _shared_key_prefix(adapters)
        shapes = _module_shapes(adapters)
        depth = max(a.num_layers for a in adapters)
        if num_layers is not None and depth > num_layers:
            deepest = max(adapters, key=lambda a: a.num_layers)
            raise AdapterError(
                f"{deepest.spec.path / WEIGHTS_NAME}: has layer {depth - 1}, but the base model "
                f"has {num_layers} layers"
            )
        rank = max(a.rank for a in adapters)
        return cls(
            names=tuple(d.name for d in dirs),
            params=_stack(adapters, shapes, num_layers or depth, rank),
            scale=jnp.asarray([spec.scale for spec in specs], dtype=jnp.float32),
            rank=rank,
            ranks=tuple(a.rank for a in adapters),
            target_modules=tuple(shapes),
            base_model=base_model,
            key_prefix=key_prefix,
            stored_entries=tuple(a.entries for a in adapters),
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
        """Bytes in `dtype` of one rank-r adapter over every module and layer of the
        library: what a merged adapter costs (`save_peft_adapter` writes all of it)."""
        itemsize = jnp.dtype(dtype).itemsize
        return sum((f["A"][0].size + f["B"][0].size) * itemsize for f in self.params.values())

    def storage_bytes(self, dtype=jnp.bfloat16) -> int:
        """Bytes in `dtype` of the N adapters as stored: each adapter's own factors (its
        modules and layers at its own ranks, what its PEFT file holds), not the zeros
        the stacked arrays pad with. A library built in memory (no `stored_entries`)
        counts N times `adapter_bytes`."""
        if self.stored_entries is None:
            return self.num_adapters * self.adapter_bytes(dtype)
        return sum(self.stored_entries) * jnp.dtype(dtype).itemsize

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
            stored_entries=None
            if self.stored_entries is None
            else tuple(self.stored_entries[i] for i in idx),
        )

    # ------------------------------------------------------------ orbax save/restore

    def save(self, path: str | os.PathLike) -> None:
        """Save the stacked library with orbax (arrays) plus a JSON of metadata, atomically."""
        import orbax.checkpoint as ocp

        with atomic_directory(path) as tmp:
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
                "key_prefix": self.key_prefix,
                "stored_entries": self.stored_entries,
            }
            (tmp / LIBRARY_META_NAME).write_text(json.dumps(meta, indent=2))

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
            key_prefix=meta.get("key_prefix", DEFAULT_KEY_PREFIX),
            stored_entries=None
            if meta.get("stored_entries") is None
            else tuple(meta["stored_entries"]),
        )


# ------------------------------------------------------------------- PEFT writing


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
    key_prefix: str = DEFAULT_KEY_PREFIX,
) -> None:
    """Write adapter_config.json + adapter_model.safetensors into an existing directory.

    Args:
      params: ``{module: {"A": [L, r, d_in], "B": [L, d_out, r]}}``.
      provenance: JSON-serialisable record of how the adapter was made (e.g. a merge's
        settings and members), written to ``PROVENANCE_NAME`` beside the PEFT files.
      key_prefix: where the model's decoder layers are (`AdapterLibrary.key_prefix`).
    """
    from safetensors.flax import save_file

    if key_prefix not in KEY_PREFIXES:
        raise AdapterError(f"key_prefix {key_prefix!r} is not one of {KEY_PREFIXES}")
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
            tensors[peft_key(layer, module, "A", key_prefix)] = a[layer].astype(dtype)
            tensors[peft_key(layer, module, "B", key_prefix)] = b[layer].astype(dtype)
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
    (directory / WEIGHTS_NAME).chmod(0o666 & ~umask())
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
    key_prefix: str = DEFAULT_KEY_PREFIX,
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
            key_prefix=key_prefix,
        )
    return Path(out_dir)
