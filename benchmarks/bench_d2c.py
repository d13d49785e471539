"""One D2C iteration on the embedded library: the engine vs two transformers + PEFT peers.

Setting: the embedded adapter library as it is on disk now (it may be partly built:
N is recorded), K clusters (default 5 if N >= 10, else max(2, N // 2)), the task
suite's dev examples (10 per task, 3 with ``--quick``), the engine's default merge
(`d2c_jax.merging.DEFAULT_MERGE`: TIES in delta space, density 0.2), and the K-Means
assignment D2C starts from.

A *candidate* is a move "adapter i -> cluster b"; one iteration of D2C's ``best``
mode scores all N (K-1) of them (fewer when a move would empty a cluster).

* ours: `d2c.move_deltas` through a fresh `CachedObjective` over `DevObjective`:
  the K current clusters are scored first (as in D2C's iteration 0; not part of
  the iteration's time), then every distinct source set ``a - i`` and destination
  set ``b + i`` is merged and scored once, in batched, jitted calls. Two
  objectives: the default one (untruncated merged deltas), timed *cold* (fresh
  process, includes compilation) and *warm* (a fresh cache, so the same sets are
  scored again, but compiled), and the search's *second* iteration (best move
  applied, the first iteration's cache kept: only sets that contain a changed
  cluster are new); and ``score_deployed=True`` (rank-r truncation by SVD
  first: what PEFT's ``ties_svd`` scores), timed cold only.
* naive peer (`benchmarks/peers.py`, key ``peer``): the straightforward PEFT loop: per
  candidate, merge every cluster with
  ``add_weighted_adapter(combination_type="ties_svd")`` and evaluate the whole
  objective (every task's dev examples under its cluster's merge). It is timed on a
  few candidates only (best, median and worst by our deployed score); its
  per-candidate time is the mean over those, and since every candidate costs the peer
  the same work (K merges of N adapters in all, N tasks' examples) it stands for all
  of them. torch threads: the faster of 1 and the default on a probe (one merge and
  one batch).
* smart peer (`peers.move_objective`, key ``smart_peer``): PEFT with our algorithmic
  savings: a fresh cache holding the K current clusters (untimed), then each distinct
  changed member set (``a - i``, ``b + i``) merged and scored once. Timed on all K-1
  moves of ``--smart-peer-adapters`` seeded-random adapters; its iteration estimate
  is its seconds per member set times the member sets our cold iteration scored.

Agreement: each peer's per-task losses of each timed candidate against ours (deployed:
same truncation, so only float32 rounding and SVD-solver differences remain; both keep
a one-member cluster's adapter whole); and ours untruncated against ours deployed on all
candidates (Spearman rank correlation, the best move).

Also, on the same library and K: the dev objective J of random, kmeans and mbc, and
of a full D2C search (kmeans init, ``sweep`` mode, ``--d2c-iters`` iterations at most)
with its wall time and the member sets it scored. With ``--part all``, the wall time
of that whole search estimated for the peers (``whole_run_estimate``): the smart
peer's seconds per member set times the sets the search scored, the naive peer's
seconds per candidate times the moves it considered.

    nice -n 5 python benchmarks/bench_d2c.py --quick   # -> results/bench_d2c_quick.json
    nice -n 5 python benchmarks/bench_d2c.py           # -> results/bench_d2c.json
    # the two parts as two processes, on a pinned set of adapters:
    nice -n 5 python benchmarks/bench_d2c.py --part iteration --adapters A B ...
    nice -n 5 python benchmarks/bench_d2c.py --part clustering --adapters A B ...
    # the whole-run estimate from a committed iteration run of the same setup:
    python benchmarks/bench_d2c.py --part clustering \\
        --iteration-from benchmarks/results/bench_d2c_iteration.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

# LAPACK (jax's svd on CPU goes through scipy's OpenBLAS) with one thread: on a busy
# 2-core machine its default threads spin against each other. Set before numpy loads;
# an explicit setting in the environment wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402

# Agreement of our deployed J with the peer's (nats/token, mean over tasks). Both
# score the same rank-r truncation of the same TIES delta in float32; what remains
# is rounding in two forward implementations (30 layers, different summation orders,
# about 1e-5 relative per example NLL) and two SVD solvers; a difference above this
# bound would mean different semantics, not rounding.
PEER_TOLERANCE = 2e-3
# Largest number of candidates merged and scored per jitted call (the engine's default).
MAX_CANDIDATES_PER_CALL = 8


def balanced_chunk(count: int, limit: int = MAX_CANDIDATES_PER_CALL) -> int:
    """Candidates per call that split `count` sets into as few calls as `limit` allows
    with the least padding (a short last call is padded to full size, wasted work)."""
    return math.ceil(count / math.ceil(count / limit))


def run_iteration(objective, assign: np.ndarray, k: int, cached=None):
    """Score all moves of `assign` through `cached` (default: a fresh cache); returns
    (timings, J of each move ``[N, K]`` (inf where not a candidate), the cache)."""
    from d2c_jax.cluster.base import membership_mask
    from d2c_jax.cluster.d2c import CachedObjective, move_deltas

    n = len(assign)
    cached = CachedObjective(objective) if cached is None else cached
    start = time.perf_counter()
    j0 = cached.cluster_losses(membership_mask(assign, k)).sum() / n
    initial_seconds = time.perf_counter() - start
    tasks_before = int(cached.state()["keys"].sum())
    sets_before = cached.evaluations
    start = time.perf_counter()
    deltas = move_deltas(assign, k, cached, np.arange(n))
    seconds = time.perf_counter() - start
    candidates = int(np.isfinite(deltas).sum())
    timing = {
        "seconds": round(seconds, 3),
        "candidates": candidates,
        "candidates_per_second": round(candidates / seconds, 4),
        "member_sets_scored": cached.evaluations - sets_before,
        "member_tasks_scored": int(cached.state()["keys"].sum()) - tasks_before,
        "initial_clusters_seconds": round(initial_seconds, 3),
        "objective_current": float(j0),
    }
    return timing, j0 + deltas / n, cached


def task_losses(cached, assign: np.ndarray, k: int) -> np.ndarray:
    """``[N]`` dev NLL of each task under its cluster's merge, from the cache (every
    cluster of a scored move is a current, source or destination set)."""
    from d2c_jax.cluster.base import membership_mask

    return sum(cached.cache[cached.key(mask)] for mask in membership_mask(assign, k))


def time_ours(objective, assign, k, warm: bool, second_iteration: bool = False):
    """Cold (first, compiling) iteration; optionally the search's second iteration (best
    move applied, the first's cache kept) and a warm repeat of the first with a fresh
    cache. Returns (timings, move J of the first iteration, its cache)."""
    cold, moves, cached = run_iteration(objective, assign, k)
    print(f"  cold: {cold}", flush=True)
    result = {"cold": cold}
    if second_iteration:
        i, b = np.unravel_index(np.argmin(moves), moves.shape)
        moved = assign.copy()
        moved[i] = b
        result["second_iteration"], _, _ = run_iteration(objective, moved, k, cached=cached)
        print(f"  second iteration (first's cache kept): {result['second_iteration']}")
    if warm:
        result["warm"], again, _ = run_iteration(objective, assign, k)
        result["warm"]["same_scores_as_cold"] = bool(np.array_equal(again, moves))
        print(f"  warm: {result['warm']}", flush=True)
    return result, moves, cached


def pick_moves(moves: np.ndarray, count: int) -> np.ndarray:
    """``[count, 2]`` (adapter, cluster) of the best, median and worst moves (evenly
    spaced in the order of `moves`, the J of each move)."""
    valid = np.argwhere(np.isfinite(moves))
    order = valid[np.argsort(moves[tuple(valid.T)], kind="stable")]
    return order[np.unique(np.linspace(0, len(order) - 1, count).round().astype(int))]


def peer_model(base, library, objective, merge, workdir):
    """The ``PeftModel`` holding the library's adapters (both peers use it) and the torch
    threads picked for it on a probe."""
    from benchmarks import peers
    from d2c_jax.library import embedded_library_dir

    pmodel = peers.peft_model(
        peers.causal_lm(base, workdir / "hf"),
        {name: embedded_library_dir() / name for name in library.names},
    )
    return pmodel, peers.pick_torch_threads(pmodel, list(library.names), objective.bank, merge)


def time_peer(pmodel, threads, names, assignments, k, objective, merge):
    """The naive PEFT peer's whole-objective evaluation of each of `assignments`; returns
    the record and the ``[len(assignments), N]`` per-task NLL."""
    from benchmarks import peers

    records, per_task = [], []
    for assign in assignments:
        start = time.perf_counter()
        timed = peers.dev_objective(
            pmodel, names, assign, k, objective.bank, objective.examples_of, merge
        )
        seconds = time.perf_counter() - start
        per_task.append(timed.value)
        records.append(
            {
                "assign": assign.tolist(),
                "objective": float(timed.value.mean()),
                "seconds": round(seconds, 3),
                "merge_seconds": round(timed.merge_seconds, 3),
                "score_seconds": round(timed.score_seconds, 3),
            }
        )
        print(f"  peer candidate: {records[-1]}", flush=True)
    per_candidate = float(np.mean([r["seconds"] for r in records]))
    return {
        "combination_type": peers.peft_combination(merge),
        "torch_threads": threads,
        "candidates_timed": len(records),
        "seconds_per_candidate": round(per_candidate, 3),
        "candidates_per_second": round(1 / per_candidate, 5),
        "note": f"timed on {len(records)} of the iteration's candidates; every candidate "
        "costs the peer the same work (K merges, all N tasks scored)",
        "candidates": records,
    }, np.array(per_task)


def time_smart_peer(pmodel, names, assign, k, objective, merge, adapters, ours_cold):
    """The smart PEFT peer (`peers.move_objective`) on all moves of `adapters`, with a
    fresh cache holding the K current clusters (scored untimed first), extrapolated to
    the iteration by the member sets ours scored (`ours_cold`). Returns the record, the
    ``[M, 2]`` moves and their ``[M, N]`` per-task NLL."""
    from benchmarks import peers

    moves = np.array([(i, b) for i in adapters for b in range(k) if b != assign[i]])
    cache: dict = {}
    data = (objective.bank, objective.examples_of, merge)
    peers.move_objective(pmodel, names, assign, k, *data, moves[:0], cache)
    start = time.perf_counter()
    timed = peers.move_objective(pmodel, names, assign, k, *data, moves, cache)
    seconds = time.perf_counter() - start
    per_set = seconds / timed.sets_scored
    iteration = per_set * ours_cold["member_sets_scored"]
    record = {
        "adapters": [names[i] for i in adapters],
        "candidates_timed": len(moves),
        "member_sets_timed": timed.sets_scored,
        "seconds": round(seconds, 3),
        "merge_seconds": round(timed.merge_seconds, 3),
        "score_seconds": round(timed.score_seconds, 3),
        "seconds_per_member_set": round(per_set, 4),
        "seconds_per_candidate": round(seconds / len(moves), 4),
        "iteration_member_sets": ours_cold["member_sets_scored"],
        "iteration_candidates": ours_cold["candidates"],
        "iteration_seconds_estimate": round(iteration, 3),
        "candidates_per_second": round(ours_cold["candidates"] / iteration, 5),
        "note": "merges (ties_svd) and scores only each distinct changed member set (source "
        "a - i, destination b + i) once, caching sets it has seen, as ours does; timed on "
        "all moves of the adapters above, its iteration estimate is its seconds per set "
        "times the sets our iteration scored",
    }
    print(f"  smart peer: {record}", flush=True)
    return record, moves, timed.value


def smart_agreement(assign, k, moves, smart_tasks, cached_deployed) -> dict:
    """The smart peer's per-task losses of each timed move against ours deployed."""
    diffs = []
    for (i, b), smart in zip(moves, smart_tasks, strict=True):
        moved = assign.copy()
        moved[i] = b
        diffs.append(float(np.abs(task_losses(cached_deployed, moved, k) - smart).max()))
    worst = max(diffs) if diffs else None
    return {
        "moves": len(diffs),
        "max_abs_task_diff": worst,
        "tolerance": PEER_TOLERANCE,
        "within_tolerance": worst is not None and worst <= PEER_TOLERANCE,
    }


def agreement(library, assign, k, chosen, peer_tasks, cached, cached_deployed, moves, deployed):
    """Our scores against the peer's (per task) and untruncated against deployed (all moves)."""
    from scipy.stats import spearmanr

    rows = []
    for (i, b), peer in zip(chosen, peer_tasks, strict=True):
        moved = assign.copy()
        moved[i] = b
        ours = task_losses(cached_deployed, moved, k)
        rows.append(
            {
                "move": [library.names[i], int(assign[i]), int(b)],
                "objective_peer": float(peer.mean()),
                "objective_ours_deployed": float(ours.mean()),
                "objective_ours_untruncated": float(task_losses(cached, moved, k).mean()),
                "singleton_tasks": [
                    library.names[t]
                    for t in np.flatnonzero(np.bincount(moved, minlength=k)[moved] == 1)
                ],
                "max_abs_task_diff": float(np.abs(ours - peer).max()),
            }
        )
    worst = max(r["max_abs_task_diff"] for r in rows) if rows else None
    valid = np.isfinite(moves)
    best = np.unravel_index(np.argmin(moves), moves.shape)
    best_deployed = np.unravel_index(np.argmin(deployed), moves.shape)
    sorted_deployed = np.sort(deployed[valid])
    return {
        "peer_candidates": rows,
        "max_abs_task_diff": worst,
        "tolerance": PEER_TOLERANCE,
        "within_tolerance": worst is not None and worst <= PEER_TOLERANCE,
        "smallest_gap_between_moves_deployed": float(np.diff(sorted_deployed).min())
        if valid.sum() > 1
        else None,
        "spearman_untruncated_vs_deployed_all_moves": float(
            spearmanr(moves[valid], deployed[valid]).statistic
        ),
        "max_abs_diff_untruncated_vs_deployed": float(np.abs(moves[valid] - deployed[valid]).max()),
        "best_move_untruncated": [library.names[best[0]], int(best[1])],
        "best_move_deployed": [library.names[best_deployed[0]], int(best_deployed[1])],
        "same_best_move": bool(best == best_deployed),
    }


def cluster_objectives(library, k, seed, objective, d2c_iters) -> dict:
    """Dev objective J of random, kmeans, mbc and a D2C search on `objective`."""
    from d2c_jax.cluster import METHODS, D2CClustering, membership_mask
    from d2c_jax.cluster.d2c import CachedObjective

    n = library.num_adapters
    shared = CachedObjective(objective)  # one cache for the data-free methods' J
    out = {}
    for name in ("random", "kmeans", "mbc"):
        start = time.perf_counter()
        result = METHODS[name]().fit(library, k, seed)
        fit_seconds = time.perf_counter() - start
        j = shared.cluster_losses(membership_mask(result.assign, k)).sum() / n
        out[name] = {
            "objective": float(j),
            "assign": result.assign.tolist(),
            "fit_seconds": round(fit_seconds, 3),
        }
        print(f"  {name}: J={j:.4f}", flush=True)
    # The committed results: one exhaustive NLL sweep from K-Means (D2C's earlier default).
    method = D2CClustering(
        init="kmeans", mode="sweep", max_iters=d2c_iters, task_loss="nll", destinations=0
    )
    start = time.perf_counter()
    result = method.fit(library, k, seed, objective=objective, progress=False)
    wall = time.perf_counter() - start
    out["d2c"] = {
        "objective": float(result.objective),
        "initial_objective": float(result.info["initial_objective"]),
        "assign": result.assign.tolist(),
        "settings": {"init": method.init, "mode": method.mode, "max_iters": method.max_iters},
        "iterations": result.info["iterations"],
        "converged": result.info["converged"],
        "wall_seconds": round(wall, 2),
        "member_sets_scored": result.info["candidates_scored"],
        "moves_considered": sum(entry["candidates_considered"] for entry in result.log[1:]),
        "log": [
            {key: entry[key] for key in ("iteration", "objective", "candidates_scored", "seconds")}
            | {"moves": len(entry["moves"])}
            for entry in result.log
        ],
    }
    print(f"  d2c: {out['d2c']}", flush=True)
    return out


def iteration_part(base, library, examples, assign, k, peer_count, smart_count, seed) -> dict:
    """Ours (untruncated and deployed) and both peers on one iteration; ratios, agreement.

    `smart_count` adapters (seeded choice among those whose move empties no cluster)
    have all their moves timed on the smart peer."""
    from d2c_jax import merging
    from d2c_jax.cluster.objective import DevObjective, ObjectiveConfig

    merge = merging.DEFAULT_MERGE
    # An iteration scores at most N sources and N (K-1) destinations.
    per_call = balanced_chunk(library.num_adapters * k)

    def objective(**config):
        return DevObjective(
            base, library, examples, merge, ObjectiveConfig(candidates_per_call=per_call, **config)
        )

    print("ours, untruncated (default):", flush=True)
    ours_default, moves, cached = time_ours(
        objective(), assign, k, warm=True, second_iteration=True
    )
    # Deployed scoring is timed cold only (it includes compiling the SVD kernels).
    print("ours, deployed (rank-r truncated):", flush=True)
    deployed = objective(score_deployed=True)
    ours_deployed, moves_deployed, cached_deployed = time_ours(deployed, assign, k, warm=False)

    names = list(library.names)
    tmp = tempfile.TemporaryDirectory(prefix="bench_d2c_")
    pmodel, threads = peer_model(base, library, deployed, merge, Path(tmp.name))
    print("naive peer (transformers + PEFT):", flush=True)
    chosen = pick_moves(moves_deployed, peer_count)
    assignments = []
    for i, b in chosen:
        assignments.append(assign.copy())
        assignments[-1][i] = b
    peer, peer_tasks = time_peer(pmodel, threads, names, assignments, k, deployed, merge)
    print("smart peer (transformers + PEFT, changed member sets only):", flush=True)
    movable = np.flatnonzero(np.bincount(assign, minlength=k)[assign] > 1)
    adapters = np.sort(
        np.random.default_rng(seed).choice(movable, min(smart_count, len(movable)), replace=False)
    )
    smart, smart_moves, smart_tasks = time_smart_peer(
        pmodel, names, assign, k, deployed, merge, adapters, ours_default["cold"]
    )
    tmp.cleanup()

    def ratio(timing):
        return round(peer["seconds_per_candidate"] * timing["candidates_per_second"], 2)

    def ratio_smart(timing):  # both over the iteration's candidates
        seconds = smart["iteration_seconds_estimate"] / smart["iteration_candidates"]
        return round(seconds * timing["candidates_per_second"], 2)

    ratios = {
        "untruncated_warm_over_peer": ratio(ours_default["warm"]),
        "untruncated_second_iteration_over_peer": ratio(ours_default["second_iteration"]),
        "untruncated_cold_over_peer": ratio(ours_default["cold"]),
        "deployed_cold_over_peer": ratio(ours_deployed["cold"]),
        "untruncated_warm_over_smart_peer": ratio_smart(ours_default["warm"]),
        "untruncated_cold_over_smart_peer": ratio_smart(ours_default["cold"]),
        "deployed_cold_over_smart_peer": ratio_smart(ours_deployed["cold"]),
    }
    print(f"ratios: {ratios}", flush=True)
    agree = agreement(
        library, assign, k, chosen, peer_tasks, cached, cached_deployed, moves, moves_deployed
    )
    agree["smart_peer"] = smart_agreement(assign, k, smart_moves, smart_tasks, cached_deployed)
    print(f"agreement: {agree}", flush=True)
    return {
        "candidates_per_call": per_call,
        "ours": {"untruncated": ours_default, "deployed": ours_deployed},
        "peer": peer,
        "smart_peer": smart,
        "ratios_candidates_per_second": ratios,
        "agreement": agree,
    }


# Setup fields that must agree for an iteration run's peer timings to apply here.
SHARED_SETUP = ("adapters", "k", "examples_per_task", "merge", "initial_assignment", "model")


def iteration_from(path: Path, setup: dict) -> dict:
    """The ``iteration`` part of the bench_d2c result `path`, checked to share this
    run's `SHARED_SETUP`."""
    try:
        stored = json.loads(path.read_text())
        iteration, other = stored["iteration"], stored["setup"]
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(
            f"--iteration-from {path}: not a bench_d2c iteration result ({err})"
        ) from err
    differ = [key for key in SHARED_SETUP if other.get(key) != setup[key]]
    if differ:
        raise SystemExit(f"--iteration-from {path}: its setup differs in {', '.join(differ)}")
    return iteration


def whole_run_estimate(iteration: dict, d2c: dict) -> dict:
    """Wall seconds of a whole D2C search to its final assignment: ours measured
    (`cluster_objectives`), the peers' from their timed iteration work."""
    sets, moves = d2c["member_sets_scored"], d2c["moves_considered"]
    smart = iteration["smart_peer"]["seconds_per_member_set"] * sets
    naive = iteration["peer"]["seconds_per_candidate"] * moves
    return {
        "ours_seconds": d2c["wall_seconds"],
        "member_sets_scored": sets,
        "moves_considered": moves,
        "smart_peer_seconds_estimate": round(smart, 1),
        "naive_peer_seconds_estimate": round(naive, 1),
        "smart_peer_over_ours": round(smart / d2c["wall_seconds"], 2),
        "naive_peer_over_ours": round(naive / d2c["wall_seconds"], 2),
        "note": "smart peer: its seconds per member set x the sets our search scored; naive "
        "peer: its seconds per candidate x the moves our search considered",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer examples and peer candidates")
    parser.add_argument("--k", type=int, help="clusters (default: 5 if N >= 10 else max(2, N//2))")
    parser.add_argument(
        "--adapters",
        nargs="+",
        metavar="NAME",
        help="adapters of the embedded library to use (default: all on disk now; name them "
        "to pin a library that is still being built)",
    )
    parser.add_argument(
        "--part",
        choices=("all", "iteration", "clustering"),
        default="all",
        help="run only the iteration comparison or only the clustering methods (e.g. as two "
        "processes); the result file gets the part's name as a suffix",
    )
    parser.add_argument("--examples-per-task", type=int, help="dev examples per task")
    parser.add_argument("--peer-candidates", type=int, help="candidates the peer is timed on")
    parser.add_argument(
        "--smart-peer-adapters",
        type=int,
        metavar="M",
        help="adapters whose moves the smart peer is timed on (default 2, --quick 1)",
    )
    parser.add_argument("--d2c-iters", type=int, help="max iterations of the D2C search")
    parser.add_argument(
        "--iteration-from",
        type=Path,
        metavar="JSON",
        help="with --part clustering: the result file of a --part iteration run on the same "
        "setup, whose peer timings give the whole-run estimate",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.iteration_from is not None and args.part != "clustering":
        parser.error("--iteration-from goes with --part clustering")
    quick = args.quick
    e = args.examples_per_task or (3 if quick else 10)
    peer_count = args.peer_candidates or (1 if quick else 3)
    smart_count = args.smart_peer_adapters or (1 if quick else 2)
    d2c_iters = args.d2c_iters or (1 if quick else 2)
    wall = time.perf_counter()

    from d2c_jax import merging
    from d2c_jax.cluster import D2CClustering
    from d2c_jax.cluster.objective import DevObjective, ObjectiveConfig
    from d2c_jax.library import AdapterLibrary, embedded_library_dir
    from d2c_jax.models import load_base
    from d2c_jax.tasks import load_split

    root = embedded_library_dir()
    library = AdapterLibrary.load([root / a for a in args.adapters] if args.adapters else root)
    n = library.num_adapters
    k = args.k or (5 if n >= 10 else max(2, n // 2))
    print(f"library: N={n} {list(library.names)}, K={k}, {e} dev examples per task", flush=True)
    examples = {name: load_split(None, name, "dev")[:e] for name in library.names}
    base = load_base("default")
    # The committed results start from K-Means (a fixed data-free start the peer shares).
    assign = D2CClustering(init="kmeans").initial_assignment(library, k, args.seed).assign
    payload = {
        "quick": quick,
        "part": args.part,
        "niceness": os.nice(0),
        "setup": {
            "library": str(root),
            "num_adapters": n,
            "adapters": list(library.names),
            "k": k,
            "rank": library.rank,
            "target_modules": list(library.target_modules),
            "examples_per_task": e,
            "examples_split": "dev (built-in task suite)",
            "merge": merging.DEFAULT_MERGE.to_dict(),
            "initial_assignment": assign.tolist(),
            "model": base.name,
            "dtype": "float32",
        },
    }
    iteration = None
    if args.iteration_from is not None:  # checked before the long run
        iteration = iteration_from(args.iteration_from, payload["setup"])
        payload["iteration_from"] = str(args.iteration_from)
    if args.part in ("all", "iteration"):
        payload["iteration"] = iteration = iteration_part(
            base, library, examples, assign, k, peer_count, smart_count, args.seed
        )
    if args.part in ("all", "clustering"):
        print(f"clustering methods (K={k}, sweep-mode d2c, <= {d2c_iters} iterations):")
        # K member sets per call: the K clusters of an assignment, or the K sets
        # (source + K-1 destinations) of one adapter's moves in a sweep.
        objective = DevObjective(
            base,
            library,
            examples,
            merging.DEFAULT_MERGE,
            ObjectiveConfig(candidates_per_call=k),
        )
        payload["clustering_dev_objective"] = cluster_objectives(
            library, k, args.seed, objective, d2c_iters
        )
    if iteration is not None and "clustering_dev_objective" in payload:
        payload["whole_run_estimate"] = whole_run_estimate(
            iteration, payload["clustering_dev_objective"]["d2c"]
        )
        print(f"whole D2C run: {payload['whole_run_estimate']}", flush=True)
    payload["wall_seconds"] = round(time.perf_counter() - wall, 1)
    suffix = ("" if args.part == "all" else f"_{args.part}") + ("_quick" if quick else "")
    path = write_result(f"bench_d2c{suffix}", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
