"""`d2c train`: train one LoRA adapter per task into a PEFT library directory (resumable)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from d2c_jax.train import TrainConfig


def add_parser(subparsers) -> None:
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
        help="task-suite directory (<task>/train.jsonl); default: the built-in suite",
    )
    parser.add_argument(
        "--only", nargs="+", default=None, metavar="TASK", help="train only these tasks"
    )
    parser.add_argument("--out", type=Path, required=True, help="library directory to write")
    parser.add_argument("--rank", type=int, default=defaults.rank)
    parser.add_argument("--alpha", type=float, default=defaults.alpha)
    parser.add_argument("--target-modules", nargs="+", default=list(defaults.target_modules))
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument(
        "--stop-nll",
        type=float,
        default=defaults.stop_nll,
        help="stop when validation NLL (nats/token) falls below this",
    )
    parser.add_argument("--patience", type=int, default=defaults.patience)
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=defaults.checkpoint_every,
        help="steps between orbax checkpoints of an adapter's training state",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from d2c_jax import tasks as task_suite
    from d2c_jax.models import load_base
    from d2c_jax.train import train_library

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
    root = args.tasks or task_suite.suite_dir()
    available = sorted(p.parent.name for p in Path(root).glob("*/train.jsonl"))
    if not available:
        raise FileNotFoundError(f"--tasks: no <task>/train.jsonl under {root}")
    names = args.only or available
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise ValueError(f"--only: tasks {unknown} have no train split in {root}")
    base = load_base(args.base)
    data = {name: task_suite.load_split(root, name, "train") for name in names}
    records = train_library(base, data, args.out, config, base_model_name=base.name)
    print(f"{len(records)} adapters in {args.out} ({dataclasses.asdict(config)})")
    return 0
