"""Checks every `d2c` command runs on its arguments before doing any work.

* argparse ``type=`` functions for numbers with a range (``positive_int``,
  ``fraction``, ...) and for a clustering ``budget``: a bad value exits with
  argparse's usage line and ``argument --flag: ...`` before anything is loaded;
* `check_out`: ``--out`` may not be, be inside, or contain any input path, its
  parent must be a writable directory, and it must be of the right kind (a file
  for file outputs, a directory for directory outputs);
* `replaceable`: an existing output is only replaced if it is a previous output of
  the same command, recognised by its manifest (``is_output``);
* `check_base`: a ``--base`` the engine cannot run (an unsupported ``model_type`` or
  GGUF architecture) is refused from its config alone, before any other input is read;
  `base_num_layers` gives its depth the same cheap way, so a library whose adapters
  all skip the last layers (``layers_to_transform``) is stacked to the base's depth.

Errors are `CommandError` (a ValueError): the CLI prints them as one line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


class CommandError(ValueError):
    """A command's arguments or inputs are unusable; the message names which."""


# ----------------------------------------------------------------- argparse types


def _number(kind: type, text: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """A finite float (no nan, inf)."""
    return _number(float, text)


def positive_float(text: str) -> float:
    """A finite float > 0."""
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite float >= 0."""
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A float in (0, 1]."""
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def correlation(text: str) -> float:
    """A float in [-1, 1]."""
    value = _number(float, text)
    if not -1 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [-1, 1], got {text!r}")
    return value


def budget(text: str) -> str:
    """A clustering budget's syntax: K (an integer >= 1), a percentage of the library
    (``12.5%``) or bytes (``4MB``), > 0; returned as given (K is resolved against the
    library later, `d2c_jax.cluster.resolve_budget`)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(%|[kmg]i?b|b)?", text.strip().lower().replace(" ", ""))
    if match is None:
        raise argparse.ArgumentTypeError(
            f"expected K (e.g. 5), a percentage of the library (e.g. 12.5%) or bytes "
            f"(e.g. 4MB), got {text!r}"
        )
    if match[2] is None and "." in match[1]:
        raise argparse.ArgumentTypeError(f"K must be an integer, got {text!r}")
    if float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text!r}")
    return text


# ------------------------------------------------------------------ output paths


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_out(
    out: str | os.PathLike,
    *,
    kind: str,
    inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
    flag: str = "--out",
) -> Path:
    """Validate an output path before any work; returns it as a Path.

    Args:
      kind: ``"file"`` or ``"dir"``: what the command writes at `out`.
      inputs: ``(flag, path)`` pairs of everything the command reads (``None`` paths
        are skipped); `out` may not equal, be inside or contain any of them.
    """
    out = Path(out)
    target = _resolved(out)
    for label, path in inputs:
        if path is None:
            continue
        source = _resolved(path)
        if target == source:
            relation = "is"
        elif source in target.parents:
            relation = "is inside"
        elif target in source.parents:
            relation = "contains"
        else:
            continue
        raise CommandError(
            f"{flag} {out} {relation} the input {label} {path}; "
            "refusing to write there (choose another path)"
        )
    if out.exists() or out.is_symlink():
        if kind == "file" and out.is_dir():
            raise CommandError(f"{flag} {out} is a directory; give a file path")
        if kind == "dir" and not out.is_dir():
            raise CommandError(f"{flag} {out} is an existing file; give a directory path")
    ancestor = _nearest_existing(target.parent)
    if not ancestor.is_dir():
        raise CommandError(f"{flag} {out}: {ancestor} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".d2c-write-test.", dir=ancestor)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise CommandError(f"{flag} {out}: cannot write in {ancestor} ({reason})") from None
    os.close(fd)
    os.unlink(probe)
    return out


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None if it is missing or not a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def replaceable(
    out: Path, *, command: str, is_output: Callable[[Path], bool], force: bool | None
) -> bool:
    """Whether an existing `out` may be replaced; raise CommandError if it may not.

    Returns whether `out` exists (an empty directory is replaced without asking).
    With ``force=None`` the command has no --force flag and replaces its own
    previous output silently (file outputs such as scores).
    """
    if not out.exists():
        return False
    if out.is_dir() and not any(out.iterdir()):
        return True
    if not is_output(out):
        raise CommandError(
            f"--out {out} exists and is not a previous output of `d2c {command}`; "
            "refusing to replace it (remove it or choose another path)"
        )
    if force is False:
        raise CommandError(f"--out {out} already exists; pass --force to replace it")
    return True


def json_dumps_strict(data: Any, **kwargs) -> str:
    """``json.dumps`` that writes NaN and Infinity as null (valid JSON)."""
    from d2c_jax.io import finite_json

    return json.dumps(finite_json(data), allow_nan=False, **kwargs)


def check_jsonl(path: str | os.PathLike, flag: str) -> None:
    """Raise CommandError naming ``path:line`` unless every non-blank line of a file is
    UTF-8 JSON (the examples' own fields are checked where they are read)."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise CommandError(f"{flag} {path} is a directory; expected a file")
        raise CommandError(f"{flag} {path}: no such file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark is not JSON
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CommandError(
                    f"{path}:{lineno}: not valid UTF-8 (byte {raw[err.start]:#04x} at "
                    f"column {err.start + 1}); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                json.loads(line)
            except ValueError as err:
                msg = getattr(err, "msg", str(err))
                raise CommandError(f"{path}:{lineno}: malformed JSON ({msg})") from None


def clustering_base(clusters: Path) -> tuple[str | None, str | None]:
    """``(--base spec, weights fingerprint)`` a `d2c cluster` output records in its
    manifest (either may be None: older outputs and data-free runs lack the latter)."""
    manifest = read_json_object(clusters / "manifest.json") or {}
    settings = manifest.get("settings")
    spec = settings.get("base") if isinstance(settings, dict) else None
    fingerprint = manifest.get("base_fingerprint")
    return (
        spec if isinstance(spec, str) and spec not in ("", "None") else None,
        fingerprint if isinstance(fingerprint, str) else None,
    )


def check_base(spec: str | os.PathLike | None) -> None:
    """Refuse a base model the engine cannot run before any work (`models.base_config`:
    config.json or GGUF metadata only); its one-line message names the file and the
    supported families. A missing path is left to `load_base`, whose message says what
    it expects."""
    if spec is not None:
        from d2c_jax.models import base_config

        base_config(spec)


def base_num_layers(spec: str | os.PathLike) -> int | None:
    """The decoder depth of a ``--base`` (no weights read); None when the path is not a
    model (`load_base` reports it later)."""
    from d2c_jax.models import base_config

    config = base_config(spec)
    return None if config is None else config.num_layers
