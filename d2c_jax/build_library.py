"""Build the embedded adapter library: train, evaluate, and write its manifest (`make library`).

    python -m d2c_jax.build_library [--base default|gemma3-270m] [--out DIR] [--only TASK ...]

1. Train one LoRA adapter per task of the built-in suite on an embedded base (SmolLM2
   by default; ``--base gemma3-270m`` writes ``d2c_jax/data/library-gemma3-270m``)
   (`d2c_jax.train.train_library`; resumable per adapter and within one).
2. Evaluate on each task's *test* split (its first `TEST_EXAMPLES_PER_TASK`
   examples; greedy generation, `d2c_jax.evaluate`): the base model (raw prompt, and
   the prompt as a chat turn, which is how a user would ask an instruct model; only
   where the tokenizer has a chat template), the task's own adapter, and reference
   merges: all adapters merged into one, and the groupings by language (K = number of
   languages) and by problem type (K = number of types), each merged with the engine's
   default merge. Results are saved per evaluation as they finish, so an interrupted
   build resumes where it stopped.
3. Write ``<out>/manifest.json``: training config, seed, per-task steps, wall time,
   stop reason, and every score above.

Everything is deterministic given the seed; the shipped adapters are bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from d2c_jax import tasks as task_suite
from d2c_jax.io import write_json_atomic
from d2c_jax.library import AdapterLibrary, embedded_library_dir
from d2c_jax.train import TrainConfig, train_library

EVAL_DIR_NAME = ".eval"
MANIFEST_NAME = "manifest.json"
MAX_NEW_TOKENS = 32
# Test examples per task that the library's reference scores (and `make paper`) use:
# the first 50 of each task's 100. Generation is the costly part of the paper sweep
# (about 0.1 s per answer here), and 50 per task over 40 tasks puts the standard
# error of an average score near one point.
TEST_EXAMPLES_PER_TASK = 50


def reference_groupings(names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Assignments of the reference merges: all-in-one, by language, by problem type."""
    types = [task_suite.task_meta(n)[0] for n in names]
    langs = [task_suite.task_meta(n)[1] for n in names]
    by = lambda keys: np.unique(np.asarray(keys), return_inverse=True)[1].astype(np.int32)
    return {
        "one_merged": np.zeros(len(names), np.int32),
        "by_language": by(langs),
        "by_type": by(types),
    }


SETTINGS = ("base_raw", "base_chat", "single", "one_merged", "by_language", "by_type")


def evaluate_setting(
    base,
    library: AdapterLibrary,
    setting: str,
    root: Path | None,
    split: str,
    cache: Path,
    merge_config,
    limit: int | None = None,
) -> dict[str, dict[str, float]]:
    """Per-task metrics of one of `SETTINGS`; cached in ``cache/<setting>.json``.

    ``limit`` evaluates the first examples of each task only, cached in its own file
    ``cache/<setting>_first<limit>.json`` so that it never replaces the full results.
    """
    from d2c_jax.evaluate import evaluate_cached, merged_task_adapters

    identity = None
    if setting.startswith("base"):
        adapters = dict.fromkeys(library.names)
    elif setting == "single":
        adapters = {name: library.adapter(i) for i, name in enumerate(library.names)}
    else:
        assign = reference_groupings(library.names)[setting]
        adapters = merged_task_adapters(library, assign, merge_config)
        # A merge depends on all its members: a grown library invalidates the cache.
        identity = {"members": list(library.names), "merge": merge_config.to_dict()}
    return evaluate_cached(
        base,
        adapters,
        root,
        split,
        cache / (f"{setting}.json" if limit is None else f"{setting}_first{limit}.json"),
        identity=identity,
        chat_template=setting == "base_chat",
        max_new_tokens=MAX_NEW_TOKENS,
        limit=limit,
    )


def tasks_root_label(root: Path, library_dir: Path) -> str:
    """How the manifest names the task suite: ``"built-in"`` for the package's own suite,
    otherwise its path relative to the library directory (machine-independent)."""
    root = Path(root).resolve()
    if root == Path(task_suite.suite_dir()).resolve():
        return "built-in"
    return os.path.relpath(root, Path(library_dir).resolve())


def main(argv: list[str] | None = None) -> int:
    from d2c_jax.evaluate import average_metrics, relative_score
    from d2c_jax.merging import DEFAULT_MERGE
    from d2c_jax.models import load_base

    parser = argparse.ArgumentParser(prog="python -m d2c_jax.build_library", description=__doc__)
    parser.add_argument("--base", default="default", help="embedded base (default, gemma3-270m)")
    parser.add_argument("--out", type=Path, default=None, help="default: the base's library")
    parser.add_argument("--tasks", type=Path, default=None, help="suite dir (default: built-in)")
    parser.add_argument("--max-steps", type=int, default=TrainConfig.max_steps)
    parser.add_argument("--only", nargs="+", default=None, help="train only these tasks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-eval", action="store_true", help="train only")
    args = parser.parse_args(argv)

    root = Path(args.tasks or task_suite.suite_dir())
    config = TrainConfig(max_steps=args.max_steps, seed=args.seed)
    base = load_base(args.base)
    args.out = args.out or embedded_library_dir(args.base)
    # Language-major order, so that a partly built library covers every problem type.
    names = sorted(
        task_suite.list_tasks(),
        key=lambda n: (
            task_suite.LANGUAGES.index(task_suite.task_meta(n)[1]),
            task_suite.TASK_TYPES.index(task_suite.task_meta(n)[0]),
        ),
    )
    names = [n for n in names if args.only is None or n in args.only]
    data = {name: task_suite.load_split(root, name, "train") for name in names}
    start = time.perf_counter()
    records = train_library(base, data, args.out, config, base_model_name=base.name)
    manifest: dict[str, Any] = {
        "base_model": base.name,
        # No absolute path of the build machine in a committed manifest: the built-in
        # suite is named as such, another suite relative to the library.
        "tasks_root": tasks_root_label(root, args.out),
        "train_config": config.__dict__ | {"target_modules": list(config.target_modules)},
        "training": {
            name: {k: records[name][k] for k in ("steps", "stop_reason", "best_val_nll", "seconds")}
            for name in names
        },
        "training_seconds_total": sum(r["seconds"] for r in records.values()),
    }
    write_json_atomic(args.out / MANIFEST_NAME, manifest)
    if args.skip_eval:
        return 0

    library = AdapterLibrary.load(args.out)
    merge_config = DEFAULT_MERGE
    cache = args.out / EVAL_DIR_NAME
    settings = [s for s in SETTINGS if s != "base_chat" or base.tokenizer.chat_template]
    scores = {
        s: evaluate_setting(
            base, library, s, root, "test", cache, merge_config, limit=TEST_EXAMPLES_PER_TASK
        )
        for s in settings
    }
    manifest["evaluation"] = {
        "split": "test",
        "examples_per_task": TEST_EXAMPLES_PER_TASK,
        "merge": merge_config.to_dict(),
        "max_new_tokens": MAX_NEW_TOKENS,
        "average": {s: average_metrics(scores[s]) for s in settings},
        "relative_to_single": {
            s: relative_score(scores[s], scores["single"]) for s in settings if s != "single"
        },
        "per_task": scores,
    }
    manifest["build_seconds_this_run"] = time.perf_counter() - start
    write_json_atomic(args.out / MANIFEST_NAME, manifest)
    print(json.dumps(manifest["evaluation"]["average"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
