"""One whole D2C sweep on a large library with the real model, timed end to end.

`bench_scale.py` estimates a sweep at N = 1000 from a few timed visits; this runs one:
a synthetic library of SmolLM2-135M's adapter shape (`bench_scale.random_factors`:
rank 8, q_proj and v_proj of 30 layers), adapter j standing for suite task ``j mod 40``
with 10 real dev examples (`bench_scale.real_model_objective`), K = N / 8, scored
with the embedded SmolLM2-135M. The search is what ARCHITECTURE.md recommends at this
scale: one sweep (`max_iters` 1) with one destination per visit ranked by parameter
similarity (``--destination-proxy similarity``) and ``--visit-fraction`` of the
adapters visited. The start is a seeded random assignment (``init="random"``: K-Means
on unstructured random adapters puts most of them in one cluster, which no real
library does, and a visit costs what its clusters cost).

Reported: wall time of the search (start objective, the Gram matrix of the similarity
proxy, the sweep), its split per iteration, member sets scored, moves, J before and
after, peak RSS, load average before and after, and bench_scale's estimate of the
same sweep for comparison. The search checkpoints into ``--checkpoint`` (removed
after a finished run): a killed run resumes when rerun, and the record then says
``resumed`` (its wall time covers only the last process).

Usage: ``python benchmarks/bench_sweep.py [--n 1000] [--visit-fraction 0.75]``;
writes ``benchmarks/results/bench_sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_scale import (  # noqa: E402
    LAYERS,
    MODULE_SHAPES,
    RANK,
    RssSampler,
    make_library,
    random_factors,
    real_model_objective,
)
from benchmarks.common import RESULTS_DIR, write_result  # noqa: E402


def committed_estimate(n: int, fraction: float) -> float | None:
    """bench_scale's estimate of this sweep (seconds), if its committed run has size n."""
    path = RESULTS_DIR / "bench_scale.json"
    if not path.is_file():
        return None
    for size in json.loads(path.read_text()).get("sizes", []):
        visits = size.get("d2c_visits_real_model", {})
        if size.get("n") == n:
            return visits.get("iteration_seconds_estimate_by_visit_fraction", {}).get(str(fraction))
    return None


def run(n: int, fraction: float, seed: int, checkpoint: Path) -> dict:
    from d2c_jax.cluster import D2CClustering

    k = max(2, round(n / 8))
    names = [f"task{i:04d}" for i in range(n)]
    library = make_library(random_factors(n, MODULE_SHAPES, LAYERS, RANK, seed=n), names)
    _, objective = real_model_objective(library)
    search = D2CClustering(
        init="random",
        mode="sweep",
        max_iters=1,
        destinations=1,
        destination_proxy="similarity",
        visit_fraction=fraction,
    )
    resumed = checkpoint.exists()
    sampler = RssSampler()
    start = time.perf_counter()
    with sampler.stage("search"):
        result = search.fit(library, k, seed, objective, checkpoint_dir=checkpoint)
    seconds = time.perf_counter() - start
    first, last = result.log[0], result.log[-1]
    return {
        "n": n,
        "k": k,
        "visit_fraction": fraction,
        "visits": math.ceil(fraction * n),
        "seed": seed,
        "resumed": resumed,
        "search": {
            "init": search.init,
            "mode": search.mode,
            "max_iters": search.max_iters,
            "destinations": search.sweep_destinations,
            "destination_proxy": search.destination_proxy,
            "task_loss": search.task_loss,
        },
        "seconds": round(seconds, 1),
        "iteration_seconds": [round(entry["seconds"], 1) for entry in result.log],
        "member_sets_scored": result.info["candidates_scored"],
        "moves": sum(len(entry["moves"]) for entry in result.log),
        "objective_start": first["objective"],
        "objective_end": last["objective"],
        "bench_scale_estimate_seconds": committed_estimate(n, fraction),
        **sampler.stages["search"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="adapters (K = N / 8)")
    parser.add_argument("--visit-fraction", type=float, default=0.75)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=RESULTS_DIR / "bench_sweep_ckpt",
        help="search checkpoint (resumed if present, removed when the run finishes)",
    )
    parser.add_argument("--out", default="bench_sweep", help="result name under results/")
    args = parser.parse_args(argv)
    load_before = list(os.getloadavg())  # the machine record holds the one after
    record = run(args.n, args.visit_fraction, args.seed, args.checkpoint.absolute())
    path = write_result(args.out, {"load_average_before": load_before, **record})
    shutil.rmtree(args.checkpoint, ignore_errors=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
