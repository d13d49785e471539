"""Entry point of the `d2c` command: one subcommand per module in `d2c_jax.commands`.

Each command module exposes `add_parser(subparsers)` (registers its arguments and
sets `func`) so that this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `d2c --help` lists them.
COMMANDS = ("merge", "score", "generate", "train", "cluster", "evaluate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d2c",
        description=(
            "Compress a library of LoRA adapters into K multi-task adapters: "
            "merge, score, generate, train, cluster (random, kmeans, mbc, d2c) and evaluate."
        ),
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"d2c_jax.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"d2c {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
