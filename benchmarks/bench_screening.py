"""First-order screening in D2C against the exact search, on the embedded library, over seeds.

    nice -n 5 python benchmarks/bench_screening.py          # -> results/bench_screening.json
    nice -n 5 python benchmarks/bench_screening.py --quick  # 1 seed, 2 iterations

For each seed, two D2C searches (``best`` mode, K-Means initialisation, the same
seed, the task suite's dev examples, the engine's default merge): *exact* (every
move of every iteration scored) and *screened* (``screen_top`` M: only the M
best-estimated moves plus a random sample of ``screen_sample`` are scored
exactly, with the fallback of `d2c_jax.cluster.d2c`). Each search gets a fresh
score cache, so wall times and member sets scored are comparable. Recorded per
search: final and initial dev objective J, iterations, wall seconds, member sets
scored, the fraction of moves scored exactly and the fallbacks; then the test
score of its clustering (each task's *test* split, first ``--test-per-task``
examples, under its cluster's merged adapter), which the search never sees.

Summary: mean and standard deviation over seeds of each variant, and per seed the
speed-up (exact wall / screened wall) and the differences in J and test score.
Every finished search is saved under ``--work`` and skipped on restart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402

VARIANTS = ("exact", "screened")


def run_search(context: dict[str, Any], variant: str, seed: int, args) -> dict[str, Any]:
    """One D2C search and the test score of its clustering (see module docstring)."""
    from d2c_jax.cluster import D2CClustering
    from d2c_jax.cluster.d2c import CachedObjective
    from d2c_jax.evaluate import average_metrics, evaluate_adapters, merged_task_adapters
    from d2c_jax.merging import DEFAULT_MERGE

    library, k = context["library"], context["k"]
    screen = dict(screen_top=args.screen_top, screen_sample=args.screen_sample)
    search = D2CClustering(
        init="kmeans",
        mode="best",
        max_iters=args.max_iters,
        task_loss="nll",
        destinations=0,
        **(screen if variant == "screened" else {}),
    )
    cached = CachedObjective(context["objective"])
    start = time.perf_counter()
    result = search.fit(library, k, seed, cached, progress=False)
    wall = time.perf_counter() - start
    screening = [entry["screening"] for entry in result.log if "screening" in entry]
    scores = evaluate_adapters(
        context["base"],
        merged_task_adapters(library, result.assign, DEFAULT_MERGE),
        None,
        "test",
        limit=args.test_per_task,
        progress=False,
    )
    return {
        "variant": variant,
        "seed": seed,
        "objective": float(result.objective),
        "initial_objective": float(result.info["initial_objective"]),
        "iterations": result.info["iterations"],
        "converged": result.info["converged"],
        "wall_seconds": round(wall, 2),
        "member_sets_scored": result.info["candidates_scored"],
        "moves_considered": sum(entry["candidates_considered"] for entry in result.log[1:]),
        "moves_scored_exactly_fraction": (
            sum(s["scored_exactly"] for s in screening) / sum(s["candidates"] for s in screening)
            if screening
            else 1.0
        ),
        "fallbacks": [s["fallback"] for s in screening if s["fallback"]],
        "rank_correlations": [round(s["rank_corr"], 3) for s in screening],
        "test_score": average_metrics(scores)["score"],
        "assignment": result.assign.tolist(),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def spread(values: list[float]) -> dict[str, float]:
        return {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        }

    by = {
        v: sorted((r for r in runs if r["variant"] == v), key=lambda r: r["seed"]) for v in VARIANTS
    }
    out: dict[str, Any] = {
        v: {
            key: spread([r[key] for r in rows])
            for key in ("objective", "test_score", "wall_seconds", "member_sets_scored")
        }
        for v, rows in by.items()
    }
    pairs = list(zip(by["exact"], by["screened"], strict=True))
    out["per_seed"] = [
        {
            "seed": e["seed"],
            "speedup": round(e["wall_seconds"] / s["wall_seconds"], 3),
            "objective_screened_minus_exact": s["objective"] - e["objective"],
            "test_score_screened_minus_exact": s["test_score"] - e["test_score"],
            "same_assignment": e["assignment"] == s["assignment"],
        }
        for e, s in pairs
    ]
    test_gap = abs(out["screened"]["test_score"]["mean"] - out["exact"]["test_score"]["mean"])
    # One seed has no spread to compare with.
    out["test_score_gap_within_exact_seed_spread"] = (
        test_gap <= out["exact"]["test_score"]["std"] if len(pairs) > 1 else None
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 iterations")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--k", type=int, help="clusters (default: 5 if N >= 10 else N // 2)")
    parser.add_argument("--max-iters", type=int, default=6)
    parser.add_argument("--screen-top", type=int, help="default: N (K-1) / 5, at least 4")
    parser.add_argument("--screen-sample", type=int, default=8)
    parser.add_argument("--test-per-task", type=int, default=25)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_screening"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.max_iters = 1, 2

    from d2c_jax.cluster.objective import DevObjective
    from d2c_jax.io import write_json_atomic
    from d2c_jax.library import AdapterLibrary, embedded_library_dir
    from d2c_jax.merging import DEFAULT_MERGE
    from d2c_jax.models import load_base
    from d2c_jax.tasks import load_split

    library = AdapterLibrary.load(embedded_library_dir())
    n = library.num_adapters
    k = args.k or (5 if n >= 10 else max(2, n // 2))
    args.screen_top = args.screen_top or max(4, n * (k - 1) // 5)
    base = load_base("default")
    dev = {name: load_split(None, name, "dev") for name in library.names}
    context = {
        "library": library,
        "k": k,
        "base": base,
        "objective": DevObjective(base, library, dev, DEFAULT_MERGE),
    }
    print(f"N={n} K={k} screen_top={args.screen_top} sample={args.screen_sample}", flush=True)
    settings = f"n{n}_k{k}_it{args.max_iters}_top{args.screen_top}_test{args.test_per_task}"
    runs = []
    for seed in range(args.seeds):
        for variant in VARIANTS:
            path = args.work / f"{settings}_{variant}_{seed}.json"
            if path.is_file():
                run = json.loads(path.read_text())
            else:
                run = run_search(context, variant, seed, args)
                write_json_atomic(path, run)
            shown = {key: run[key] for key in list(run)[:9]}
            print(f"  {variant} seed {seed}: {shown}", flush=True)
            runs.append(run)
    payload = {
        "setup": {
            "num_adapters": n,
            "adapters": list(library.names),
            "k": k,
            "seeds": args.seeds,
            "max_iters": args.max_iters,
            "screen_top": args.screen_top,
            "screen_sample": args.screen_sample,
            "dev_examples_per_task": len(next(iter(dev.values()))),
            "test_examples_per_task": args.test_per_task,
            "merge": DEFAULT_MERGE.to_dict(),
        },
        "runs": runs,
        "summary": summarise(runs),
    }
    path = write_result("bench_screening" + ("_quick" if args.quick else ""), payload)
    print(payload["summary"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
