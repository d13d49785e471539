"""`make demo`: the main job on the embedded default, end to end, in about 15 minutes.

Clusters the embedded library (40 LoRA adapters on SmolLM2-135M-Instruct, one per
task of the built-in suite) into K = 12.5% of its size with random, K-Means and
D2C, merges each cluster (the engine's default merge), and evaluates every
task's merged adapter on held-out *test* examples, next to the single adapters.
Prints a table and writes to the output directory:

  report.json              every number of the table, settings, versions, timings
  plot.png                 test score and dev objective per method
  <method>/cluster_<k>/    the merged PEFT adapters
  <method>/assignment.json task -> cluster

The demo differs from the full sweep (`make paper`) only in size, and says so in
its output: one seed, a subset of the dev examples per task for D2C's objective,
a cap on D2C iterations, and a subset of each task's test split.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from d2c_jax.library import write_json_atomic

# Sized for 15 minutes on a 2-core CPU with the 40-adapter library, install included.
# Measured on a quiet machine: 12 min 29 s after a 63 s `make install` (peak RSS
# 8.1 GB), of which the D2C sweep (40 visits of ~5 member sets of ~8 tasks on 2 dev
# examples each, ~10.5 s per visit) took 428 s and the test answers (8 per task for
# the single adapters and three clusterings) about 3 minutes. With 3 dev examples per
# task the demo took 14 min 53 s (same D2C test score), with 4 it overran.
DEMO_DEFAULTS = {
    "budget": "12.5%",
    "dev_per_task": 2,
    "test_per_task": 8,
    "mode": "sweep",
    "max_iters": 1,
    "seed": 0,
}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = [r["method"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(names, [r["test_score"] for r in rows], color="tab:blue")
    left.set_ylabel("average test score (0-100)")
    left.set_title(f"held-out test score, K={report['k']} of N={report['n']}")
    dev_rows = [r for r in rows if r["dev_objective"] is not None]
    right.bar(
        [r["method"] for r in dev_rows], [r["dev_objective"] for r in dev_rows], color="tab:orange"
    )
    right.set_ylabel("dev objective J (nats/token)")
    right.set_title("what the clustering optimises (dev)")
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m d2c_jax.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--library", type=Path, default=None, help="default: embedded library")
    parser.add_argument(
        "--base", default="default", help="'default' (embedded SmolLM2), an HF dir or a .gguf"
    )
    parser.add_argument(
        "--tasks", type=Path, default=None, help="task-suite dir (default: built-in)"
    )
    for key, value in DEMO_DEFAULTS.items():
        choices = ("best", "sweep") if key == "mode" else None
        parser.add_argument(
            f"--{key.replace('_', '-')}", type=type(value), default=value, choices=choices
        )
    args = parser.parse_args(argv)

    from d2c_jax import cluster as clustering
    from d2c_jax import tasks as task_suite
    from d2c_jax.cluster.objective import DevObjective
    from d2c_jax.cluster.output import load_clusters, save_clusters, task_adapters
    from d2c_jax.commands.cluster import versions
    from d2c_jax.evaluate import (
        average_metrics,
        evaluate_adapters,
        relative_score,
    )
    from d2c_jax.library import AdapterLibrary, embedded_library_dir
    from d2c_jax.merging import DEFAULT_MERGE
    from d2c_jax.models import load_base

    start_all = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    library_dir = args.library or embedded_library_dir()
    library = AdapterLibrary.load(library_dir)
    base = load_base(args.base)
    k = clustering.resolve_budget(args.budget, library)
    print(
        f"d2c-jax demo: clustering the {library.num_adapters} adapters of {library_dir} "
        f"into K={k} merged adapters (budget {args.budget})"
    )
    dev = {
        name: task_suite.load_split(args.tasks, name, "dev")[: args.dev_per_task]
        for name in library.names
    }
    objective = DevObjective(base, library, dev, DEFAULT_MERGE)

    methods = {
        "random": clustering.RandomClustering(),
        "kmeans": clustering.KMeansClustering(),
        "d2c": clustering.D2CClustering(init="kmeans", mode=args.mode, max_iters=args.max_iters),
    }
    rows = []
    single = evaluate_adapters(
        base,
        {name: library.adapter(i) for i, name in enumerate(library.names)},
        args.tasks,
        "test",
        limit=args.test_per_task,
    )
    for name, method in methods.items():
        start = time.perf_counter()
        if name == "d2c":
            result = method.fit(library, k, args.seed, objective)
        else:
            result = method.fit(library, k, args.seed)
        seconds = time.perf_counter() - start
        masks = clustering.membership_mask(result.assign, k)
        dev_j = result.objective
        if dev_j is None:
            dev_j = float(objective.task_losses(masks).sum() / library.num_adapters)
        save_clusters(out / name, library, result.assign, DEFAULT_MERGE)
        # Evaluate the adapters as saved (bfloat16 PEFT files), i.e. as deployed.
        scores = evaluate_adapters(
            base,
            task_adapters(*load_clusters(out / name)),
            args.tasks,
            "test",
            limit=args.test_per_task,
        )
        rows.append(
            {
                "method": name,
                "dev_objective": dev_j,
                "test_score": average_metrics(scores)["score"],
                "test_exact_match": average_metrics(scores)["exact_match"],
                "relative_score": relative_score(scores, single),
                "cluster_seconds": seconds,
                "candidates_scored": result.info.get("candidates_scored"),
                "per_task": scores,
            }
        )
    rows.append(
        {
            "method": "single adapters",
            "dev_objective": None,
            "test_score": average_metrics(single)["score"],
            "test_exact_match": average_metrics(single)["exact_match"],
            "relative_score": 1.0,
            "cluster_seconds": 0.0,
            "candidates_scored": None,
            "per_task": single,
        }
    )
    report = {
        "k": k,
        "n": library.num_adapters,
        "budget": args.budget,
        "storage_bytes": {
            "merged": k * library.adapter_bytes(),
            "library": library.storage_bytes(),
        },
        "merge": DEFAULT_MERGE.to_dict(),
        "demo_settings": vars(args)
        | {"out": str(out), "library": str(library_dir), "tasks": str(args.tasks or "built-in")},
        "differs_from_full_sweep": (
            f"1 seed (make paper: 3); {args.dev_per_task} of 10 dev examples per task; D2C "
            f"in {args.mode} mode, at most {args.max_iters} iteration(s) (make paper: 1 "
            f"sweep); {args.test_per_task} of 100 test examples per task (make paper: 50)"
        ),
        "rows": rows,
        "versions": versions(),
        "seconds": time.perf_counter() - start_all,
    }
    write_json_atomic(out / "report.json", report)
    plot(report, out / "plot.png")

    print()
    print(
        f"K={k} merged adapters of N={library.num_adapters} "
        f"({k * library.adapter_bytes() / 1e6:.1f} MB of {library.storage_bytes() / 1e6:.1f} MB)"
    )
    print(
        f"{'method':<16} {'dev J':>8} {'test score':>11} {'exact':>7} {'relative':>9} "
        f"{'seconds':>8}"
    )
    for r in rows:
        dev_j = "" if r["dev_objective"] is None else f"{r['dev_objective']:.4f}"
        print(
            f"{r['method']:<16} {dev_j:>8} {r['test_score']:>11.1f} "
            f"{100 * r['test_exact_match']:>6.1f}% {r['relative_score']:>9.3f} "
            f"{r['cluster_seconds']:>8.1f}"
        )
    print(f"\nDemo settings differ from the full sweep: {report['differs_from_full_sweep']}.")
    print(f"Report, plot and merged adapters: {out.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
