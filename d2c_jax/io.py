"""Writing outputs so that a killed or concurrent run never leaves a half-written one,
and the package versions a result records.

Every file the engine writes (adapters, manifests, reports, GGUFs, the task suite,
weight caches) goes through `write_atomic`: the content is written to a temporary
file with a unique name in the target's directory and renamed over the target, so a
reader sees the old file or the new one, never part of one, and two writers of the
same target never share a temporary file. Temporary names are ``.<name>.<random>.tmp``
(hidden, and recognisable by the commands that clean up their own leftovers); the
finished file gets the mode a plain ``open`` would give it (``0o666`` minus the
umask), not `tempfile`'s private ``0o600``. `atomic_directory` does the same for a
whole output directory. Which files a command writes, and the run-directory
transaction of ``d2c cluster``, are the commands' business (`d2c_jax.commands`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

# The packages whose versions a run's manifest or report records.
RUN_PACKAGES = ("d2c-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint")


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Create or replace the file `path` with what ``write(tmp)`` writes to `tmp`, a
    new empty file in the same directory; returns `path` as a ``Path``.

    If `write` (or anything before the rename) fails, the temporary file is removed
    and `path` is left as it was. Parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        tmp.chmod(0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """`write_atomic` of `data`."""
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """`write_atomic` of UTF-8 `text`."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def finite_json(data: Any) -> Any:
    """`data` with every NaN or infinite float replaced by None (JSON has neither)."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, Mapping):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [finite_json(v) for v in data]
    return data


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """`write_atomic` of `data` as indented UTF-8 JSON (NaN and Infinity as null)."""
    text = json.dumps(finite_json(data), indent=2, ensure_ascii=False, allow_nan=False)
    return write_text_atomic(path, text + "\n")


def versions(
    packages: Iterable[str] = RUN_PACKAGES, missing: str | None = "not installed"
) -> dict[str, str | None]:
    """Installed versions of `packages`, `missing` for those not installed."""
    found = {}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = missing
    return found


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
        self.tmp.chmod(0o777 & ~umask())
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
