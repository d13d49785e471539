"""Entry point of the `d2c` command: one subcommand per module in `d2c_jax.commands`.

Each command module exposes `add_parser(subparsers)` (registers its arguments and
sets `func`) so that this file only wires them together.

Errors in the user's input (the project's own `ValueError` subclasses, other
``ValueError`` and ``OSError``) and machine faults (`MACHINE_FAULTS`: disk full,
permission denied, read-only file system, also inside a library's own I/O error) are
printed as one line ``d2c CMD: error: ...`` naming the path and the cause, with exit
status 2; ``--debug`` (or ``D2C_DEBUG=1``) shows the traceback instead. Any
other exception is a bug and keeps its traceback. Ctrl-C and SIGTERM interrupt a
command the same way (it undoes its half-written output), with exit status 130 or
143. Warnings about the inputs (`d2c_jax.models.identity.BaseModelWarning`,
`d2c_jax.library.LibraryWarning`, `d2c_jax.checkpoints.CheckpointWarning`) print as
one line ``d2c CMD: warning: ...``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
import warnings

# Subcommand modules, in the order `d2c --help` lists them.
COMMANDS = ("merge", "score", "generate", "train", "cluster", "evaluate", "export")


class HelpFormatter(argparse.HelpFormatter):
    """Keeps multi-line descriptions as written (wraps one-line ones) and appends
    ``(default: X)`` to every option's help that has a default and does not state it."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and default is not None
            and default is not False
            and default is not argparse.SUPPRESS
            and "%(default)" not in text
            and "default" not in text.lower()
        ):
            if isinstance(default, list | tuple):
                default = " ".join(map(str, default))
                return f"{text} (default: {default})".strip()
            return f"{text} (default: %(default)s)".strip()
        return text


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("d2c-jax")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d2c",
        description=(
            "Compress a library of LoRA adapters into K multi-task adapters: merge, score, "
            "generate, train, cluster (random, kmeans, mbc, kmerge, d2c), evaluate and export."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"d2c-jax {version()}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the Python traceback of an error (also: environment D2C_DEBUG=1)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"d2c_jax.commands.{name}").add_parser(subparsers)
    for sub in subparsers.choices.values():
        sub.formatter_class = HelpFormatter
    return parser


# Causes of a failed write that are the machine's, not the code's (errno text as the
# OS and libraries word it; safetensors and tensorstore report them in their own errors).
MACHINE_FAULTS = (
    "No space left on device",
    "Disk quota exceeded",
    "File too large",
    "Read-only file system",
    "Permission denied",
    "Operation not permitted",
    "Input/output error",
)
FAULT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EIO,
}


def machine_fault(err: BaseException) -> str | None:
    """The machine fault behind `err` (an OSError or a library's I/O error), or None."""
    if isinstance(err, OSError):
        return err.strerror if err.errno in FAULT_ERRNOS else None
    text = str(err)
    return next((cause for cause in MACHINE_FAULTS if cause in text), None)


def _one_line(err: BaseException, out: str | None = None) -> str:
    cause = machine_fault(err)
    if cause is not None and not isinstance(err, OSError | ValueError):
        # A library's I/O error (safetensors, tensorstore) names neither path nor errno.
        return f"writing --out {out}: {cause}" if out else cause
    text = str(err)
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    elif isinstance(err, OSError) and err.filename is None and cause and out:
        text = f"writing --out {out}: {text}"
    if isinstance(err, UnicodeDecodeError):
        text = f"not valid UTF-8 ({err.reason} at byte {err.start})"
    return " ".join(text.split()) or type(err).__name__


def _one_line_warning(command: str):
    """A `warnings.showwarning` that prints our own warnings as ``d2c CMD: warning: ...``
    (no file and line: they are about the user's inputs, not the code)."""
    from d2c_jax.checkpoints import CheckpointWarning
    from d2c_jax.library import LibraryWarning
    from d2c_jax.models.identity import BaseModelWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, BaseModelWarning | LibraryWarning | CheckpointWarning):
            print(f"d2c {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    from d2c_jax.commands.outdir import Terminated, terminate_as_interrupt

    # transformers warns at import that PyTorch is missing, which d2c never needs.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("D2C_DEBUG", "") not in ("", "0")
    try:
        with warnings.catch_warnings(), terminate_as_interrupt():
            warnings.showwarning = _one_line_warning(args.command)
            return int(args.func(args) or 0)
    except Exception as err:
        if debug or not (isinstance(err, ValueError | OSError) or machine_fault(err)):
            raise
        out = getattr(args, "out", None)
        print(f"d2c {args.command}: error: {_one_line(err, out)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        if debug:
            raise
        if isinstance(err, Terminated):
            print(f"d2c {args.command}: terminated (SIGTERM)", file=sys.stderr)
            return 128 + signal.SIGTERM
        print(f"d2c {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
