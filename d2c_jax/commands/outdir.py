"""An output directory as a transaction: one writer at a time, --force replaces only ours.

* `locked(out)`: an advisory lock (``fcntl.flock``) held while a command writes OUT,
  so that two runs never write one OUT. The lock file lives in the user cache
  (``$D2C_JAX_CACHE/locks/``), named by OUT's resolved path, never in or beside OUT
  (a refused run must leave OUT's directory untouched). It records the holder's pid
  for the refusal message. The kernel drops a flock when its process dies, even by
  kill -9, so a lock file whose process is gone is stale and simply taken over.
* `foreign_entries`: what in a previous output its command did not write (a user's
  ``notes.txt``); ``--force`` refuses to replace such an OUT.
* `terminate_as_interrupt`: SIGTERM (what ``timeout`` and batch schedulers send) is
  raised as `Terminated`, a KeyboardInterrupt, so a run undoes its half-written output
  (and puts a replaced one back) as it does on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

from d2c_jax.commands.checks import CommandError


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C."""


def lock_path(out: Path) -> Path:
    """The lock file of OUT (in the user cache, named by OUT's resolved path)."""
    from d2c_jax.commands.evaluate import cache_root

    resolved = str(Path(out).expanduser().resolve())
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:24]
    return cache_root() / "locks" / f"{Path(resolved).name}-{digest}.lock"


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _acquire(path: Path) -> int | None:
    """An fd holding the flock of `path`, or None if a live process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES):
                return None
            raise
        # The holder before us may have unlinked the file after we opened it: then we
        # lock an orphan while a third run locks the new file. Retry on the path.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def locked(out: Path, *, enabled: bool = True) -> Iterator[None]:
    """Hold OUT's lock for the block; CommandError naming the other run's pid if held.

    With ``enabled=False`` (a process that does not write OUT) nothing is locked.
    """
    if not enabled:
        yield
        return
    path = lock_path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path)
    except OSError as err:
        raise CommandError(
            f"--out {out}: cannot lock it ({path}: {err.strerror or err}); "
            "set D2C_JAX_CACHE to a writable directory"
        ) from None
    if fd is None:
        raise CommandError(
            f"--out {out} is being written by another d2c run (pid {_holder(path)}); "
            "wait for it to finish or choose another --out"
        )
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def foreign_entries(out: Path, ours: Callable[[Path], bool]) -> list[str]:
    """Names (relative to `out`) of the entries of `out` that `ours` does not claim."""
    return sorted(str(p.relative_to(out)) for p in out.iterdir() if not ours(p))


def refuse_foreign(out: Path, command: str, ours: Callable[[Path], bool]) -> None:
    """CommandError if --force would delete files `d2c command` did not write."""
    foreign = foreign_entries(out, ours)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise CommandError(
            f"--force: --out {out} holds files that `d2c {command}` did not write "
            f"({shown}); move them out of it or choose another --out"
        )


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Raise `Terminated` on SIGTERM inside the block (main thread only)."""

    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
