"""Orbax checkpoints that survive crashes: a corrupt or half-written step is skipped.

The D2C search (`d2c_jax.cluster.d2c`) and the LoRA trainer (`d2c_jax.train`) both
checkpoint through `Checkpoints`. A kill -9 during a save leaves
``<step>.orbax-checkpoint-tmp/`` (orbax renames it to ``<step>/`` only once complete,
after writing ``commit_success.txt`` into it); a copy or a disk fault can leave a
step directory without that marker, or with data files overwritten. Orbax restores
such a step with tensorstore errors (``OUT_OF_RANGE: Error opening "zarr" driver``)
and tracebacks from tensorstore's event loop, or, for a damaged data chunk, with
wrong numbers and no error at all. So each save also records the SHA-256 of every
file orbax wrote (``d2c_checksums.json``, written after orbax finished), and
`Checkpoints.restore_latest` checks a step before orbax reads it:

* the newest good step is restored; newer bad steps and half-written directories
  are removed (a later save must not find them) and one `CheckpointWarning` says
  which were skipped;
* when no good step is left but a finished one is bad, `CheckpointError` (one line:
  the checkpoint directory, the bad steps and the ways out) and nothing is touched;
* a step written before checksums were recorded is checked by restoring it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHECKSUMS_NAME = "d2c_checksums.json"
COMMIT_MARKER = "commit_success.txt"  # orbax writes it into a step just before renaming it
TMP_SUFFIX = ".orbax-checkpoint-tmp"
_TMP_STEP = re.compile(r"(\d+)" + re.escape(TMP_SUFFIX))
# Faults of the machine, not of the checkpoint: reported as they are, nothing deleted.
_MACHINE_FAULTS = ("PERMISSION_DENIED", "Permission denied", "Operation not permitted")


class CheckpointWarning(UserWarning):
    """A corrupt or half-written checkpoint step was skipped (resumed from an older one)."""


class CheckpointError(ValueError):
    """No checkpoint step is usable, and at least one finished step is corrupt."""


def _file_digests(step_dir: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(step_dir.rglob("*")):
        if path.is_file() and path.name != CHECKSUMS_NAME:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            digests[str(path.relative_to(step_dir))] = h.hexdigest()
    return digests


def _checksum_problem(step_dir: Path) -> str | None:
    """Why the step's files are not the ones its save wrote, or None (also None when
    it records no checksums: then only a restore can tell)."""
    if not (step_dir / COMMIT_MARKER).is_file():
        return f"half-written: no {COMMIT_MARKER}"
    try:
        recorded = json.loads((step_dir / CHECKSUMS_NAME).read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return f"{CHECKSUMS_NAME} is not valid JSON"
    actual = _file_digests(step_dir)
    for name, digest in recorded.items():
        if name not in actual:
            return f"{name} is missing"
        if actual[name] != digest:
            return f"{name} does not match its checksum"
    return None


def _short(err: BaseException) -> str:
    """A tensorstore error's status (``OUT_OF_RANGE``), else the exception's type."""
    status = re.match(r"([A-Z_]{4,}):", str(err))
    return f"unreadable ({status.group(1) if status else type(err).__name__})"


class Checkpoints:
    """An orbax `CheckpointManager` over `directory` that checks steps (module docstring).

    ``ways_out`` ends the refusal when no step is usable: what the user can do
    besides deleting the bad steps (``"start over with --force"``), or None.
    """

    def __init__(self, directory: str | Path, max_to_keep: int, ways_out: str | None = None):
        import orbax.checkpoint as ocp

        self.directory = Path(directory).absolute()
        self.ways_out = ways_out
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        """Save `state` (a pytree of arrays) as `step` and wait until it is on disk."""
        import orbax.checkpoint as ocp

        self.manager.save(step, args=ocp.args.StandardSave(state))
        self.manager.wait_until_finished()
        step_dir = self.directory / str(step)
        if step_dir.is_dir():  # orbax skips a step that is not newer than its latest
            tmp = step_dir / f".{CHECKSUMS_NAME}.tmp"
            tmp.write_text(json.dumps(_file_digests(step_dir), indent=1) + "\n")
            os.replace(tmp, step_dir / CHECKSUMS_NAME)

    def restore_latest(
        self, template: Any = None, decode: Callable[[Any], Any] = lambda state: state
    ) -> tuple[int, Any] | None:
        """``(step, decode(state))`` of the newest usable step, or None if there is none
        (nothing saved yet, or only half-written saves). `template`: the pytree to
        restore into (None: as saved). A `decode` error makes the step corrupt too."""
        import orbax.checkpoint as ocp

        steps = sorted(
            (int(p.name) for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit()),
            reverse=True,
        )
        partial = sorted(p for p in self.directory.iterdir() if p.is_dir() and TMP_SUFFIX in p.name)
        skipped: list[tuple[int, str]] = []
        for step in steps:
            problem = _checksum_problem(self.directory / str(step))
            if problem is None:
                try:
                    restored = self.manager.restore(step, args=ocp.args.StandardRestore(template))
                    return self._resumed(step, skipped, partial), decode(restored)
                except Exception as err:  # noqa: BLE001 (any failure to read is a bad step)
                    if isinstance(err, OSError) or any(f in str(err) for f in _MACHINE_FAULTS):
                        raise
                    problem = _short(err)
            skipped.append((step, problem))
        corrupt = [step for step, problem in skipped if not problem.startswith("half-written")]
        if corrupt:
            names = ", ".join(str(step) for step in sorted(corrupt))
            ways = f"{self.ways_out}, or delete" if self.ways_out else "delete"
            raise CheckpointError(
                f"{self.directory}: no usable checkpoint ({_describe(skipped)}); {ways} "
                f"the step directories {names} there to start from the beginning"
            )
        if skipped or partial:
            self._resumed(None, skipped, partial)
        return None

    def _resumed(self, step: int | None, skipped, partial: list[Path]) -> int | None:
        """Remove the bad steps newer than `step` and the half-written saves, and say so."""
        if not skipped and not partial:
            return step
        for bad, _ in skipped:
            shutil.rmtree(self.directory / str(bad))
        for path in partial:
            shutil.rmtree(path)
        self.manager.reload()  # forget the removed steps: the next save numbers after `step`
        what = [*skipped, *((_tmp_step(p), "half-written: killed during a save") for p in partial)]
        where = f"resuming from step {step}" if step is not None else "starting from the beginning"
        warnings.warn(
            f"{self.directory}: skipped checkpoint {_describe(what)}; {where}",
            CheckpointWarning,
            stacklevel=3,
        )
        return step

    def close(self) -> None:
        self.manager.close()  # joins orbax's background threads


def _tmp_step(path: Path) -> int | str:
    match = _TMP_STEP.match(path.name)
    return int(match.group(1)) if match else path.name


def _describe(skipped) -> str:
    return ", ".join(f"step {step} ({problem})" for step, problem in skipped)
