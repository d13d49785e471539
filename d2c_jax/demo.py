"""`make demo`: the main job on the embedded default, end to end, in about 15 minutes.

Clusters the embedded library (40 LoRA adapters on SmolLM2-135M-Instruct, one per
task of the built-in suite) into K = 12.5% of its size with random, K-Means, MBC,
K-Merge and D2C (its defaults, as `d2c cluster` and `make paper` run it), merges each
cluster (the engine's default merge), evaluates every task's merged adapter on
held-out *test* examples next to the single adapters, and exports D2C's adapters for
the device (llama.cpp LoRA GGUFs, `d2c export`). Prints a table and writes to the
output directory:

  report.json              every number of the table, settings, versions, timings
  plot.png                 test score and dev objective per method
  <method>/cluster_<k>/    the merged PEFT adapters
  <method>/assignment.json task -> cluster
  device/                  D2C's adapters as llama.cpp LoRA GGUFs + routing.json

The demo differs from the full sweep (`make paper`) only in size, and says so in
its output: one seed, a subset of the dev examples per task for D2C's objective,
and a subset of each task's test split.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from d2c_jax.commands import checks
from d2c_jax.io import versions, write_atomic, write_json_atomic

# Sized for 15 minutes on a 2-core CPU with the 40-adapter library, install included.
# Measured on a quiet machine with the earlier D2C (a full sweep from K-Means, 40
# visits of ~5 member sets of ~8 tasks on 2 dev examples each, ~10.5 s per visit):
# 12 min 29 s after a 63 s `make install` (peak RSS 8.1 GB), of which the sweep took
# 428 s and the test answers (8 per task, single adapters and three clusterings) about
# 3 minutes. Today's D2C scores 2 member sets per visit (plus the K merges on every
# task once): measured on a quiet machine with the venv installed, the whole demo (five
# methods, the device export) took 4 min 22 s, D2C 75 s, peak RSS 8.1 GB; table:
# random 14.7, kmeans 38.4, mbc 43.0, kmerge 39.9, d2c 45.3, single adapters 95.8.
DEMO_DEFAULTS = {
    "budget": "12.5%",
    "dev_per_task": 2,
    "test_per_task": 8,
    "seed": 0,
}
METHODS = ("random", "kmeans", "mbc", "kmerge", "d2c")
PROG = "python -m d2c_jax.demo"

# Each setting's argparse type: a bad value is an ``argument --flag: ...`` error.
ARG_TYPES = {
    "budget": checks.budget,
    "dev_per_task": checks.positive_int,
    "test_per_task": checks.positive_int,
    "seed": checks.nonnegative_int,
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
    # The temporary name ends in .tmp, so the format is named, not inferred.
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--library", type=Path, default=None, help="default: embedded library")
    parser.add_argument(
        "--base",
        default="default",
        help="'default' (embedded SmolLM2), 'gemma3-270m' (with its library), an HF dir or a .gguf",
    )
    parser.add_argument(
        "--tasks",
        type=Path,
        default=None,
        help="task-suite directory with <task>/{dev,test}.jsonl (default: the built-in suite)",
    )
    for key, value in DEMO_DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=ARG_TYPES[key], default=value)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Inputs exist and ``--out`` is a directory path outside every input, before any
    work (`d2c_jax.commands.checks`); raises CommandError naming the argument."""
    from d2c_jax.library import embedded_library_dir
    from d2c_jax.models.loading import EMBEDDED_SPECS
    from d2c_jax.tasks import suite_dir

    for flag, path in (("--library", args.library), ("--tasks", args.tasks)):
        if path is not None and not path.is_dir():
            kind = "is not a directory" if path.exists() else "no such directory"
            raise checks.CommandError(f"{flag} {path}: {kind}")
    embedded = args.base in EMBEDDED_SPECS
    if not embedded and not Path(args.base).exists():
        raise checks.CommandError(f"--base {args.base}: no such file or directory")
    library = args.library or embedded_library_dir(args.base if embedded else "default")
    if not library.is_dir():
        raise checks.CommandError(
            f"no library for --base {args.base} yet ({library}): train it with "
            f"`make library BASE={args.base}` or give --library"
        )
    checks.check_out(
        args.out,
        kind="dir",
        inputs=[
            ("--library", library),
            ("--tasks", args.tasks or suite_dir()),
            ("--base", None if embedded else args.base),
        ],
    )


def demo_jobs(args: argparse.Namespace) -> dict[str, Any]:
    """The demo's clustering jobs (`d2c_jax.pipeline.ClusterJob`), one per method."""
    from d2c_jax.merging import DEFAULT_MERGE
    from d2c_jax.pipeline import ClusterJob

    common = ClusterJob(
        budget=args.budget,
        library=args.library,
        tasks=args.tasks,
        examples_per_task=args.dev_per_task,
        merge=DEFAULT_MERGE,
        seed=args.seed,
        base=args.base,
        report_dev_objective=True,
    )
    return {name: dataclasses.replace(common, method=name) for name in METHODS}


def method_row(name: str, record, scores: dict, single: dict) -> dict[str, Any]:
    from d2c_jax.evaluate import average_metrics, relative_score

    return {
        "method": name,
        "dev_objective": record.dev_objective,
        "test_score": average_metrics(scores)["score"],
        "test_exact_match": average_metrics(scores)["exact_match"],
        "relative_score": relative_score(scores, single),
        "cluster_seconds": record.seconds,
        "candidates_scored": record.info.get("candidates_scored"),
        "search_objective": record.search_objective,
        "search_start": record.info.get("start"),
        "search_initial_objective": record.info.get("initial_objective"),
        "per_task": scores,
    }


def run_methods(args, jobs, library, base, k: int, out: Path) -> list[dict[str, Any]]:
    """Cluster with every job (one shared dev objective), save each clustering and
    evaluate its saved adapters; rows of the table, single adapters last."""
    from d2c_jax import pipeline
    from d2c_jax.cluster.output import save_clusters
    from d2c_jax.evaluate import average_metrics, evaluate_adapters

    objective = pipeline.build_objective(jobs["d2c"], library, base=base)
    single = evaluate_adapters(
        base,
        {name: library.adapter(i) for i, name in enumerate(library.names)},
        args.tasks,
        "test",
        limit=args.test_per_task,
    )
    rows = []
    for name, job in jobs.items():
        record = pipeline.fit(job, library, k, objective)
        save_clusters(out / name, library, record.assign, job.merge)
        # Evaluate the adapters as saved (bfloat16 PEFT files), i.e. as deployed.
        scores = pipeline.evaluate_assignment(
            base,
            library,
            record.assign,
            job.merge,
            args.tasks,
            "test",
            saved=out / name,
            limit=args.test_per_task,
        )
        rows.append(method_row(name, record, scores, single))
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
    return rows


def print_table(report: dict[str, Any], library, out: Path) -> None:
    k, rows = report["k"], report["rows"]
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


def main(argv: list[str] | None = None) -> int:
    """Run the demo; a bad argument or input is one ``error:`` line on stderr and exit
    status 2 (``D2C_DEBUG=1`` shows the traceback), and a failed run removes the
    output directory if it created it."""
    import shutil
    import sys

    from d2c_jax.cli import _one_line

    args = parse_args(argv)
    created = not args.out.exists()
    try:
        return run(args)
    except (ValueError, OSError, KeyboardInterrupt) as err:
        if created and args.out.is_dir():
            shutil.rmtree(args.out, ignore_errors=True)
        if os.environ.get("D2C_DEBUG", "") not in ("", "0"):
            raise
        if isinstance(err, KeyboardInterrupt):
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    check_args(args)

    from d2c_jax import pipeline
    from d2c_jax.cluster import resolve_budget
    from d2c_jax.models import load_base

    start_all = time.perf_counter()
    out: Path = args.out
    jobs = demo_jobs(args)
    library_dir = pipeline.library_dir(jobs["d2c"])
    library = pipeline.load_library(jobs["d2c"])
    k = resolve_budget(args.budget, library)
    base = load_base(args.base)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"d2c-jax demo: clustering the {library.num_adapters} adapters of {library_dir} "
        f"into K={k} merged adapters (budget {args.budget})"
    )
    rows = run_methods(args, jobs, library, base, k, out)
    report = {
        "k": k,
        "n": library.num_adapters,
        "budget": args.budget,
        "storage_bytes": {
            "merged": k * library.adapter_bytes(),
            "library": library.storage_bytes(),
        },
        "merge": jobs["d2c"].merge.to_dict(),
        "demo_settings": vars(args)
        | {"out": str(out), "library": str(library_dir), "tasks": str(args.tasks or "built-in")},
        "differs_from_full_sweep": (
            f"1 seed (make paper: 5); {args.dev_per_task} of 10 dev examples per task for "
            f"D2C's objective; {args.test_per_task} of 100 test examples per task (make "
            "paper: 50)"
        ),
        "rows": rows,
        "versions": versions(),
        "seconds": time.perf_counter() - start_all,
    }
    write_json_atomic(out / "report.json", report)
    plot(report, out / "plot.png")
    print_table(report, library, out)
    export_for_device(args, out, library_dir)
    return 0


def export_for_device(args: argparse.Namespace, out: Path, library_dir: Path) -> None:
    """D2C's clusters as llama.cpp LoRA GGUFs in ``out/device`` (`d2c export`), when the
    base is a GGUF (the embedded default is)."""
    from d2c_jax.export import export_clusters
    from d2c_jax.models import default_gguf_path

    base_file = default_gguf_path() if args.base == "default" else Path(args.base)
    if base_file.suffix.lower() != ".gguf":
        print("Device export skipped: the base model is not a GGUF file.")
        return
    device = export_clusters(
        out / "d2c", out / "device", base_file, library_dir=library_dir, overwrite=True
    )
    s = device["storage"]
    print(
        f"For the device (llama.cpp LoRA GGUF, {device['dtype']}): {(out / 'device').resolve()}\n"
        f"  {s['num_adapters']} adapter files, {s['adapters_bytes'] / 1e6:.2f} MB vs "
        f"{s['single_adapters_bytes'] / 1e6:.2f} MB for the {s['num_single_adapters']} single "
        f"adapters ({s['fraction']:.1%}); base {device['base_model']['file_name']} "
        f"({device['base_model']['bytes'] / 1e6:.0f} MB); task -> file in routing.json"
    )


if __name__ == "__main__":
    raise SystemExit(main())
