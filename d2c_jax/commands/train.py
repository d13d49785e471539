"""`d2c train`: train one LoRA adapter per task into a PEFT library directory (resumable)."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

from d2c_jax.commands.checks import (
    CommandError,
    check_base,
    check_jsonl,
    check_out,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    read_json_object,
)
from d2c_jax.commands.outdir import locked
from d2c_jax.train import TrainConfig


def add_parser(subparsers) -> None:
    from d2c_jax.library import SUPPORTED_MODULES

    defaults = TrainConfig()
    parser = subparsers.add_parser(
        "train",
        help="train one LoRA adapter per task (builds an adapter library)",
        description=(
            "Train one LoRA adapter per task on a frozen base model and write each as a PEFT "
            "directory <out>/<task>/. Interrupted runs resume: finished tasks are skipped and "
            "the task in progress continues from its last orbax checkpoint."
        ),
    )
    parser.add_argument(
        "--base",
        default="default",
        help="'default' (embedded SmolLM2-135M-Instruct), an HF model dir or a .gguf file",
    )
    parser.add_argument(
        "--tasks",
        type=Path,
        default=None,
        help="task-suite directory with <task>/train.jsonl (default: the built-in suite)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="TASK",
        help="train only these tasks (default: all)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="library directory to write (an existing one is resumed: finished tasks are kept)",
    )
    parser.add_argument("--rank", type=positive_int, default=defaults.rank, help="LoRA rank r")
    parser.add_argument(
        "--alpha", type=positive_float, default=defaults.alpha, help="LoRA alpha (scale alpha/r)"
    )
    parser.add_argument(
        "--target-modules",
        nargs="+",
        choices=SUPPORTED_MODULES,
        default=list(defaults.target_modules),
        metavar="MODULE",
        help=f"modules to adapt in every layer, of {', '.join(SUPPORTED_MODULES)}",
    )
    parser.add_argument(
        "--learning-rate",
        type=positive_float,
        default=defaults.learning_rate,
        help="peak AdamW learning rate (> 0)",
    )
    parser.add_argument(
        "--warmup-steps",
        type=nonnegative_int,
        default=defaults.warmup_steps,
        help="linear warm-up steps before the cosine decay",
    )
    parser.add_argument(
        "--max-steps",
        type=positive_int,
        default=defaults.max_steps,
        help="upper bound on optimizer steps per adapter (>= 1)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=defaults.batch_size, help="examples per step"
    )
    parser.add_argument(
        "--eval-every",
        type=positive_int,
        default=defaults.eval_every,
        help="steps between validation evaluations (and early-stopping checks)",
    )
    parser.add_argument(
        "--stop-nll",
        type=nonnegative_float,
        default=defaults.stop_nll,
        help="stop when validation NLL (nats/token) falls below this",
    )
    parser.add_argument(
        "--patience",
        type=positive_int,
        default=defaults.patience,
        help="stop after this many evaluations without improvement",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=defaults.checkpoint_every,
        help="steps between orbax checkpoints of an adapter's training state",
    )
    parser.add_argument(
        "--seed",
        type=nonnegative_int,
        default=defaults.seed,
        help="seeds initialisation and batch order",
    )
    parser.set_defaults(func=run)


def _is_ours(adapter_dir: Path) -> bool:
    """Whether an existing <out>/<task> directory is a (possibly unfinished) train output."""
    from d2c_jax.library import PROVENANCE_NAME
    from d2c_jax.train import TRAIN_RECORD_NAME

    record = read_json_object(adapter_dir / PROVENANCE_NAME)
    return (adapter_dir / TRAIN_RECORD_NAME).is_file() or (
        record is not None and "train_record" in record
    )


def run(args: argparse.Namespace) -> int:
    check_base(args.base)  # an unsupported model fails before OUT is locked or a task read
    with locked(Path(args.out)):  # one writer of OUT at a time
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """`run` with OUT's lock held."""
    from d2c_jax import tasks as task_suite
    from d2c_jax.models import load_base
    from d2c_jax.train import TRAIN_RECORD_NAME, train_library

    config = TrainConfig(
        rank=args.rank,
        alpha=args.alpha,
        target_modules=tuple(args.target_modules),
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        stop_nll=args.stop_nll,
        patience=args.patience,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    root = Path(args.tasks or task_suite.suite_dir())
    if args.tasks is not None and not root.is_dir():
        raise CommandError(f"--tasks {root}: no such directory")
    base_path = None if args.base == "default" else args.base
    out = check_out(args.out, kind="dir", inputs=[("--tasks", root), ("--base", base_path)])
    available = sorted(p.parent.name for p in root.glob("*/train.jsonl"))
    if not available:
        raise FileNotFoundError(f"--tasks: no <task>/train.jsonl under {root}")
    names = args.only or available
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise ValueError(f"--only: tasks {unknown} have no train split in {root}")
    for name in names:
        adapter_dir = out / name
        if adapter_dir.exists() and not _is_ours(adapter_dir):
            raise CommandError(
                f"--out {out}: {adapter_dir} exists and is not a `d2c train` output; "
                "refusing to replace it (choose another --out)"
            )
    data = {}
    for name in names:
        if (out / name / TRAIN_RECORD_NAME).is_file():
            continue  # finished earlier; train_library reads its record
        path = root / name / "train.jsonl"
        check_jsonl(path, "--tasks")
        data[name] = task_suite.load_split(root, name, "train")
        needed = config.val_examples + config.batch_size
        if len(data[name]) <= needed:
            raise CommandError(
                f"{path}: {len(data[name])} examples are too few for a validation slice of "
                f"{config.val_examples} plus one --batch-size {config.batch_size} batch"
            )
    base = load_base(args.base)
    created = not out.exists()
    try:
        records = train_library(
            base,
            {name: data.get(name, []) for name in names},
            out,
            config,
            base_model_name=base.name,
        )
    except BaseException:
        # A run that made OUT and finished nothing leaves nothing behind (checkpoints
        # of a partly trained adapter are kept for the rerun only if there are some).
        if created and out.is_dir() and not any(out.glob(f"*/{TRAIN_RECORD_NAME}")):
            checkpoints = [p for p in out.rglob("*") if p.is_file()]
            if not checkpoints:
                shutil.rmtree(out, ignore_errors=True)
        raise
    print(f"{len(records)} adapters in {out} ({dataclasses.asdict(config)})")
    return 0
