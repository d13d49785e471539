"""``python -m d2c_jax.tasks --out DIR``: regenerate the built-in task suite."""

from __future__ import annotations

import argparse

from d2c_jax.tasks import DEFAULT_SEED, generate_suite, list_tasks, suite_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m d2c_jax.tasks", description=__doc__)
    parser.add_argument(
        "--out", default=None, help=f"output directory (default: the shipped suite, {suite_dir()})"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="suite seed (the shipped suite uses %(default)s)",
    )
    args = parser.parse_args(argv)
    out = generate_suite(suite_dir() if args.out is None else args.out, seed=args.seed)
    print(f"wrote {len(list_tasks())} tasks to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
