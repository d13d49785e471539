"""Base-model identity: whether an adapter recorded for one base model is for another.

The rule every command uses (`check_same_base`): the base an adapter records
(PEFT's ``base_model_name_or_path``) is compared with the loaded base by *weights
fingerprint* (`d2c_jax.models.loading.weights_fingerprint`) whenever the recorded
base can be read:

* a fingerprint recorded in an output we wrote (``manifest.json`` of `d2c cluster`);
* the name of a known base (`KNOWN_BASES`, e.g. the embedded default);
* a path that exists and is a loadable base model (``"default"``, a Hugging Face
  directory or a ``.gguf`` file).

Equal fingerprints are the same base whatever the names; different ones are refused
with both names and both fingerprints. Only when the recorded base cannot be read
does its name decide, and then a mismatch is a warning, not an error (a name says
too little to refuse on: hub ids, renamed directories and copies all differ).

Reading a recorded path just to fingerprint it costs a model load, so fingerprints
are cached under the weight cache (``$D2C_CACHE``, `loading.cache_dir`) keyed by the
path and the size and mtime of its files, and every base this process loads is
recorded under its own path for free.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

_FINGERPRINT_CACHE_FORMAT = 1
# In-process memo: {cache key: fingerprint}.
_MEMO: dict[str, str] = {}


class BaseModelWarning(UserWarning):
    """A recorded base model could not be read, and its name differs from the base's."""


def known_bases() -> dict[str, str]:
    """``{weights fingerprint: name}`` of base models known by name."""
    from d2c_jax.models import loading

    return loading.KNOWN_BASES


def fingerprint_of_base(base) -> str | None:
    """The weights fingerprint of a loaded `BaseModel` (computed for in-memory ones)."""
    if getattr(base, "fingerprint", None):
        return base.fingerprint
    from d2c_jax.models import loading

    try:
        weights = base.model.weights()
    except AttributeError:
        return None
    return loading.weights_fingerprint(base.config, weights)


def normalized_name(name: str) -> str:
    """A base name compared by last path component, case-insensitive, without .gguf."""
    return Path(str(name).rstrip("/")).name.lower().removesuffix(".gguf")


# ----------------------------------------------------------------- the fingerprint cache


def _model_path(spec: str) -> Path | None:
    """The loadable model file or directory `spec` names, or None."""
    from d2c_jax.models import loading

    if spec == "default":
        try:
            return loading.default_gguf_path()
        except FileNotFoundError:
            return None
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    return None


def _cache_key(path: Path) -> str:
    """The resolved path plus size and mtime of every file that holds its weights."""
    files = (
        [path] if path.is_file() else [path / "config.json", *sorted(path.glob("*.safetensors"))]
    )
    stamps = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return json.dumps([_FINGERPRINT_CACHE_FORMAT, str(path.resolve()), stamps])


def _cache_file(key: str) -> Path | None:
    from d2c_jax.models import loading

    root = loading.cache_dir()
    if root is None:
        return None
    return root / "fingerprints" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _cached(key: str) -> str | None:
    if key in _MEMO:
        return _MEMO[key]
    entry = _cache_file(key)
    try:
        record = json.loads(entry.read_text()) if entry else None
    except (OSError, ValueError):  # missing or broken: recomputed, never fatal
        return None
    if isinstance(record, dict) and record.get("key") == key:
        _MEMO[key] = record.get("fingerprint")
        return _MEMO[key]
    return None


def _store(key: str, fingerprint: str) -> None:
    _MEMO[key] = fingerprint
    entry = _cache_file(key)
    if entry is None:
        return
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "fingerprint": fingerprint}))
        os.replace(tmp, entry)
    except OSError:
        pass  # a read-only or full cache only makes the next check slower


def remember(base) -> None:
    """Record a loaded base's fingerprint under its source path (no extra work)."""
    fingerprint = getattr(base, "fingerprint", None)
    path = _model_path(str(base.source)) if base.source else None
    if fingerprint and path is not None:
        try:
            _store(_cache_key(path), fingerprint)
        except OSError:
            pass


def fingerprint_of(spec: str | None) -> str | None:
    """The weights fingerprint of the base model `spec` names, or None if unreadable.

    `spec` is a known base name, ``"default"``, a model directory or a GGUF path.
    """
    if not spec:
        return None
    from d2c_jax.models import loading

    if spec == "default":
        spec = loading.DEFAULT_MODEL_NAME
    by_name = {name: fp for fp, name in known_bases().items()}
    if spec in by_name:
        return by_name[spec]
    path = _model_path(spec)
    if path is None:
        return None
    try:
        key = _cache_key(path)
    except OSError:
        return None
    cached = _cached(key)
    if cached is not None:
        return cached
    try:
        fingerprint = loading.load_base(str(path)).fingerprint
    except Exception:  # present but not a loadable model: it cannot be read
        return None
    if fingerprint:
        _store(key, fingerprint)
    return fingerprint


# ----------------------------------------------------------------- the rule


def check_same_base(
    base,
    recorded: str | None,
    *,
    recorded_fingerprint: str | None = None,
    what: str = "the adapter",
) -> bool:
    """Raise ValueError if `recorded` (an adapter's base) is another model than `base`
    (a loaded `BaseModel`); see the module docstring for the rule. A name mismatch
    that no fingerprint can settle is a `BaseModelWarning`. Returns whether weights
    decided (False: nothing recorded, or names only)."""
    remember(base)
    return check_same_model(
        (base.name, str(base.source), fingerprint_of_base(base)),
        recorded,
        recorded_fingerprint=recorded_fingerprint,
        what=what,
    )


def check_same_model(
    ours: tuple[str | None, str, str | None],
    recorded: str | None,
    *,
    recorded_fingerprint: str | None = None,
    what: str = "the adapter",
) -> bool:
    """`check_same_base` for a base given as ``(name, source, fingerprint or None)``
    (e.g. a GGUF file that is not loaded: its fingerprint comes from `fingerprint_of`)."""
    name, source, fingerprint = ours
    if not recorded and not recorded_fingerprint:
        return False
    theirs = recorded_fingerprint or fingerprint_of(recorded)
    if theirs and fingerprint:
        if theirs != fingerprint:
            raise ValueError(
                f"{what} was made for base model {recorded!r} (weights fingerprint {theirs}), "
                f"but --base {source} is {name!r} (weights fingerprint {fingerprint}): "
                "a different model"
            )
        return True
    names = {name, source, known_bases().get(fingerprint)}
    if recorded and normalized_name(recorded) not in {normalized_name(n) for n in names if n}:
        warnings.warn(
            f"{what} records base model {recorded!r}, which cannot be read to compare "
            f"weights, and --base {source} is named {name!r}; going on (a name alone "
            "does not decide)",
            BaseModelWarning,
            stacklevel=3,
        )
    return False
