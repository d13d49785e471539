"""How the engine scales with the library size N: time and peak memory per stage.

Libraries are synthetic (seeded random factors) of the realistic shape of a
SmolLM2-135M library: rank 8 on q_proj and v_proj of 30 layers, d = 576, q out 576,
v out 192 (1.84 MB of float32 factors per adapter), N = 40, 160, 640, 1000 (``--quick``:
40 and 160). K = N / 8 (a 12.5% storage budget). Stages, each timed after a warm-up
call (so compilation is excluded; the warm-up time is reported too):

* ``load_arrays``: `AdapterLibrary` from stacked NumPy factors (host -> device copy).
* ``load_files``: `AdapterLibrary.load` of N PEFT directories (float32 safetensors,
  written just before, so the page cache is warm: this measures parsing and stacking).
* ``kmeans``: `KMeansClustering` (k-means++, 10 restarts, 100 iterations) on the exact
  Gram matrix of the dense deltas.
* ``mbc``: `MBCClustering` (K-Means on SVD features of the LoRAs).
* ``merge_factor``: one batched TIES merge (density 0.2) of all K clusters in factor
  space (`merging.merge`).
* ``prepare_delta``: `merging.prepare` in delta space: every adapter's per-matrix trim
  threshold, found from its dense delta a few adapters at a time (the prepared
  library keeps only factors and thresholds, never N dense deltas).
* ``merge_delta``: `merging.merged_deltas` of all K clusters, ``MERGE_CHUNK`` clusters
  per call, each call's ``[C, L, d_out, d_in]`` result dropped once computed (a
  consumer would truncate or write it). The engine gathers each cluster's members,
  recomputes their deltas from the factors layer by layer and trims them by the
  stored thresholds. Truncating the K merged adapters back to rank 8 costs K times
  ``truncate_seconds_per_adapter`` (60 eigendecompositions of 576-wide Gram matrices,
  measured once in the roofline child) and is reported as ``truncate_seconds_estimate``
  (``randomized_truncate_seconds_estimate``: the randomized range finder,
  `kernels.lowrank.randomized_delta_to_factors`).
* ``merge_set``: one call merging ``MERGE_CHUNK`` member sets of ``SET_SIZE`` seeded
  random adapters each; ``seconds_per_set`` should not grow with N (a merge costs
  what its cluster costs).
* ``d2c_scoring``: one D2C iteration's candidate scoring (`d2c.move_deltas` for every
  adapter: the K clusters, N source sets and N (K-1) destination sets) with a *tiny
  model*: the test suite's random 2-layer Llama (hidden 64, 4 heads, vocab 259,
  ``tests/conftest.py``) and a library of the same N with rank-8 q,v adapters of its
  shape, 3 dev examples per task, TIES delta space density 0.2, 64 candidates per
  call. When an iteration has more than ``--max-sets`` member sets, a seeded random
  subset of the adapters is moved and the time is extrapolated linearly per set
  (``extrapolated: true``).

Peak memory is the process's resident set size (RSS), which, unlike tracemalloc,
includes XLA's CPU buffers: a sampler thread reads ``/proc/self/statm`` every 5 ms
during each stage (``rss_peak_gb``, absolute, and ``rss_growth_gb`` over the RSS at
the stage's start), and each N runs in its own subprocess whose
``ru_maxrss`` is reported as ``process_peak_rss_gb``.

Roofline (same run): NumPy float32 matmul peak (2048^3) and copy bandwidth
(`benchmarks.common.memory_bandwidth`) are measured; the scoring kernel is timed on
a random-weight model of SmolLM2-135M's shape (2 candidates, 2 packed rows of 128
tokens each, dense q,v deltas) against its executed FLOP count (a dense delta is
folded into its weight, `kernels.lora.lora_linear`: d_out * d_in adds per matrix and
candidate, no second GEMM), and the delta-space merge
against the bytes it must move at least: read the N adapters' factors and write the K
merged deltas. Each stage's growth with N is fitted as ``seconds ~ N^b`` (least squares
on log-log, ``exponents`` in the JSON).

Usage: ``python benchmarks/bench_scale.py [--quick] [--sizes 40 160 ...]``; writes
``benchmarks/results/bench_scale[_quick].json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS_DIR, memory_bandwidth, time_calls, write_result  # noqa: E402

LAYERS, RANK, HIDDEN = 30, 8, 576
MODULE_SHAPES = {"q_proj": (576, 576), "v_proj": (192, 576)}  # (d_out, d_in)
DENSITY = 0.2
FULL_SIZES = (40, 160, 640, 1000)
QUICK_SIZES = (40, 160)
PAGE = os.sysconf("SC_PAGE_SIZE")
# Sweep-visit fractions whose real-model iteration time is estimated (the ablation of
# docs/RESULTS.md measures their quality at N = 40).
VISIT_FRACTIONS = (1.0, 0.75, 0.5)
REAL_EXAMPLES = 10  # dev examples per task in the real-model stages


# ---------------------------------------------------------------------- memory


class RssSampler:
    """Peak RSS during `stage(name)` blocks, sampled by a daemon thread."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self.stages: dict[str, dict[str, float]] = {}  # GiB (2^30 bytes)
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def _run(self):
        while True:  # daemon thread: ends with the process
            time.sleep(self.interval)
            self.peak = max(self.peak, self.rss())

    @contextlib.contextmanager
    def stage(self, name: str):
        start = self.rss()
        self.peak = start
        yield
        self.peak = max(self.peak, self.rss())
        self.stages[name] = {
            "rss_peak_gb": round(self.peak / 2**30, 3),
            "rss_growth_gb": round((self.peak - start) / 2**30, 3),
        }


# ---------------------------------------------------------------------- libraries


def random_factors(n: int, shapes: dict, layers: int, rank: int, seed: int) -> dict:
    """``{module: {"A": [n, L, r, d_in], "B": [n, L, d_out, r]}}`` float32, PEFT-like init."""
    rng = np.random.default_rng(seed)
    out = {}
    for module, (d_out, d_in) in shapes.items():
        bound = 1 / np.sqrt(d_in)
        a = rng.uniform(-bound, bound, (n, layers, rank, d_in)).astype(np.float32)
        b = (0.01 * rng.standard_normal((n, layers, d_out, rank))).astype(np.float32)
        out[module] = {"A": a, "B": b}
    return out


def make_library(factors: dict, names, scale: float = 2.0, base_model: str | None = None):
    import jax
    import jax.numpy as jnp

    from d2c_jax.library import AdapterLibrary

    n = len(names)
    params = {m: {f: jnp.asarray(x) for f, x in fs.items()} for m, fs in factors.items()}
    jax.block_until_ready(params)
    return AdapterLibrary(
        names=tuple(names),
        params=params,
        scale=jnp.full((n,), scale, jnp.float32),
        rank=RANK,
        ranks=(RANK,) * n,
        target_modules=tuple(sorted(factors)),
        base_model=base_model,
    )


def factor_bytes(shapes: dict) -> int:
    return 4 * LAYERS * RANK * sum(o + i for o, i in shapes.values())


def dense_bytes(shapes: dict) -> int:
    return 4 * LAYERS * sum(o * i for o, i in shapes.values())


# ---------------------------------------------------------------------- merges


# Clusters merged per call in ``merge_delta`` / ``merge_set``, and the member count of
# ``merge_set``'s sets (about N / K at a 12.5% budget).
MERGE_CHUNK, SET_SIZE = 8, 8


def chunked_merge(prepared, membership) -> None:
    """Merge every row of ``membership [K, N]``, `MERGE_CHUNK` rows per call."""
    from d2c_jax import merging

    for start in range(0, len(membership), MERGE_CHUNK):
        block(merging.merged_deltas(prepared, membership[start : start + MERGE_CHUNK]))


@functools.cache
def truncate_fn(truncation: str = "exact"):
    import jax

    from d2c_jax import merging

    return jax.jit(lambda delta: merging.TRUNCATIONS[truncation](delta, RANK))


def truncate_all(deltas: dict, truncation: str):
    """Rank-r factors of every ``[L, d_out, d_in]`` merged delta in `deltas`."""
    fn = truncate_fn(truncation)
    return block({m: fn(d) for m, d in deltas.items()})


# ---------------------------------------------------------------------- one size


def block(tree):
    import jax

    return jax.block_until_ready(tree)


def timed(sampler: RssSampler, name: str, fn, repeat: int) -> dict:
    """Warm-up call (timed separately), then `repeat` timed calls inside an RSS stage."""
    with sampler.stage(name):
        start = time.perf_counter()
        fn()
        warmup = time.perf_counter() - start
        timing = time_calls(fn, repeat=repeat, warmup=0)
    return {
        "seconds": round(timing["min"], 4),
        "runs": [round(r, 4) for r in timing["runs"]],
        "warmup_seconds": round(warmup, 4),
        **sampler.stages[name],
    }


def load_stages(factors: dict, names: list[str], sampler: RssSampler, repeat: int):
    """Time loading from arrays and from PEFT files; returns (timings, library)."""
    import jax.numpy as jnp

    from d2c_jax.library import AdapterLibrary, save_peft_adapter

    out = {
        "load_arrays": timed(sampler, "load_arrays", lambda: make_library(factors, names), repeat)
    }
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        for i, name in enumerate(names):
            save_peft_adapter(
                Path(tmp) / name,
                {m: {f: x[i] for f, x in fs.items()} for m, fs in factors.items()},
                rank=RANK,
                alpha=2 * RANK,
                base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                dtype=jnp.float32,
            )
        out["load_files"] = timed(
            sampler, "load_files", lambda: block(AdapterLibrary.load(tmp).params), 1
        )
    return out, make_library(factors, names)


def parameter_stages(library, k: int, sampler: RssSampler, repeat: int) -> dict:
    """Time K-Means, MBC and the batched merges of all K clusters."""
    from d2c_jax import merging
    from d2c_jax.cluster import KMeansClustering, MBCClustering, membership_mask
    from kernels.merge import MergeConfig

    n = library.num_adapters
    kmeans = KMeansClustering()
    out = {"kmeans": timed(sampler, "kmeans", lambda: kmeans.fit(library, k, seed=0), 1)}
    out["mbc"] = timed(sampler, "mbc", lambda: MBCClustering().fit(library, k, seed=0), 1)
    assign = kmeans.fit(library, k, seed=0).assign
    membership = membership_mask(assign, k)
    factor_config = MergeConfig("ties", space="factor", density=DENSITY)
    out["merge_factor"] = timed(
        sampler,
        "merge_factor",
        lambda: block(
            merging.merge(
                library.params, library.scale, membership, factor_config, names=library.names
            ).params
        ),
        repeat,
    )
    delta_config = MergeConfig("ties", space="delta", density=DENSITY)

    def prepare():
        return block(
            merging.prepare(library.params, library.scale, delta_config, names=library.names)
        )

    out["prepare_delta"] = timed(sampler, "prepare_delta", prepare, 1)
    prepared = prepare()
    out["merge_delta"] = timed(
        sampler, "merge_delta", lambda: chunked_merge(prepared, membership), repeat
    )
    out["merge_delta"]["largest_cluster"] = int(membership.sum(axis=1).max())
    out["merge_delta"]["min_bytes_moved"] = n * factor_bytes(MODULE_SHAPES) + k * dense_bytes(
        MODULE_SHAPES
    )
    rng = np.random.default_rng(n)
    sets = np.zeros((MERGE_CHUNK, n), bool)
    for row in sets:
        row[rng.choice(n, SET_SIZE, replace=False)] = True
    out["merge_set"] = timed(
        sampler, "merge_set", lambda: block(merging.merged_deltas(prepared, sets)), repeat
    )
    out["merge_set"]["seconds_per_set"] = round(out["merge_set"]["seconds"] / MERGE_CHUNK, 4)
    out["merge_set"]["set_size"] = SET_SIZE
    return out


def bench_size(n: int, max_sets: int, repeat: int, real_visits: int = 0) -> dict:
    """All stages for a library of `n` adapters (run in a fresh process)."""
    sampler = RssSampler()
    k = max(2, round(n / 8))
    names = [f"task{i:04d}" for i in range(n)]
    out: dict = {
        "n": n,
        "k": k,
        "library_gb_float32": round(n * factor_bytes(MODULE_SHAPES) / 2**30, 3),
    }
    loads, library = load_stages(
        random_factors(n, MODULE_SHAPES, LAYERS, RANK, seed=n), names, sampler, repeat
    )
    out.update(loads)
    out.update(parameter_stages(library, k, sampler, repeat))
    if real_visits:
        with sampler.stage("d2c_visits_real_model"):
            out["d2c_visits_real_model"] = real_model_visits(library, k, real_visits)
        out["d2c_visits_real_model"].update(sampler.stages["d2c_visits_real_model"])
    del library  # free the big library before the tiny-model stage
    with sampler.stage("d2c_scoring"):
        out["d2c_scoring"] = d2c_iteration(n, k, max_sets)
    out["d2c_scoring"].update(sampler.stages["d2c_scoring"])
    out["process_peak_rss_gb"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 3
    )
    out.update(device_record())
    return out


def device_record() -> dict:
    """The device JAX computed on, and its peak memory where the backend reports it
    (accelerators; the CPU backend reports none: see the RSS figures)."""
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {
        "device": {"platform": device.platform, "kind": device.device_kind},
        "device_peak_memory_gb": None if peak is None else round(peak / 2**30, 3),
    }


def d2c_iteration(n: int, k: int, max_sets: int) -> dict:
    """One D2C iteration's scoring with the test suite's tiny model (see module docstring)."""
    from d2c_jax.cluster import KMeansClustering
    from d2c_jax.cluster.d2c import CachedObjective, move_deltas
    from d2c_jax.cluster.objective import DevObjective, ObjectiveConfig
    from kernels.merge import MergeConfig
    from tests.conftest import build_tiny_base, build_tiny_tokenizer

    base = build_tiny_base(build_tiny_tokenizer())
    shapes = {m: base.config.module_shape(m) for m in MODULE_SHAPES}
    names = [f"task{i:04d}" for i in range(n)]
    factors = random_factors(n, shapes, base.config.num_layers, RANK, seed=n + 1)
    library = make_library(factors, names, base_model="tiny-llama")
    rng = np.random.default_rng(n)
    words = ["cat", "dog", "sun", "sky", "tree", "jax", "hello", "lora"]
    examples = {
        name: [
            {"prompt": f"{name}: {rng.choice(words)}", "target": str(rng.choice(words))}
            for _ in range(3)
        ]
        for name in names
    }
    objective = DevObjective(
        base,
        library,
        examples,
        MergeConfig("ties", space="delta", density=DENSITY),
        ObjectiveConfig(candidates_per_call=64),
    )
    assign = KMeansClustering().fit(library, k, seed=0).assign
    total_sets = k + n * k  # K clusters + per adapter 1 source + K-1 destinations
    movers = np.arange(n)
    if total_sets > max_sets:
        movers = np.sort(rng.choice(n, size=max(1, (max_sets - k) // k), replace=False))
    # Warm-up: compile the merge and scoring shapes on a few movers.
    move_deltas(assign, k, CachedObjective(objective), movers[:2])
    cached = CachedObjective(objective)
    start = time.perf_counter()
    move_deltas(assign, k, cached, movers)
    seconds = time.perf_counter() - start
    per_set = seconds / cached.evaluations
    return {
        "model": "tests/conftest.py tiny Llama: 2 layers, hidden 64, 4 heads, vocab 259",
        "member_sets_per_iteration": total_sets,
        "member_sets_scored": cached.evaluations,
        "extrapolated": bool(len(movers) < n),
        "seconds_measured": round(seconds, 3),
        "seconds_per_set": round(per_set, 6),
        "seconds": round(per_set * total_sets, 2),
        "sets_per_second": round(1 / per_set, 1),
    }


def real_model_objective(library):
    """``(base, DevObjective)``: the embedded SmolLM2-135M and 10 real dev examples per
    task, adapter j of a synthetic library standing for suite task ``j mod 40``."""
    from d2c_jax.cluster.objective import DevObjective, ObjectiveConfig
    from d2c_jax.merging import DEFAULT_MERGE
    from d2c_jax.models import load_base
    from d2c_jax.tasks import list_tasks, load_split

    base = load_base("default")
    tasks = list_tasks()
    examples = {
        name: load_split(None, tasks[j % len(tasks)], "dev")[:REAL_EXAMPLES]
        for j, name in enumerate(library.names)
    }
    config = ObjectiveConfig(candidates_per_call=2)  # a visit scores two member sets
    return base, DevObjective(base, library, examples, DEFAULT_MERGE, config)


def real_model_visits(library, k: int, visits: int) -> dict:
    """Sweep visits of D2C's default (``destinations`` = 1) with the embedded
    SmolLM2-135M and 10 real dev examples per task.

    Adapter j of the synthetic library stands for suite task ``j mod 40``; the
    clusters are a seeded balanced partition (N / K members each: K-Means on
    unstructured random adapters puts most of them in one cluster, which no real
    library does). Each visit scores the mover's source set and one destination set
    (a seeded random one: the cost does not depend on which). The iteration's time is
    extrapolated to N visits plus the K current clusters, and to ceil(f N) visits for
    each `VISIT_FRACTIONS` f (``--visit-fraction``). The proxy that picks the
    destination in the engine, every task's loss under every current merge
    (`CachedObjective.cross_losses`), costs K x N task evaluations per sweep: reported
    from the measured seconds per task evaluation.
    """
    from d2c_jax.cluster import membership_mask
    from d2c_jax.cluster.d2c import CachedObjective

    try:
        base, objective = real_model_objective(library)
    except (FileNotFoundError, ImportError, ValueError) as err:
        return {"skipped": f"embedded model unavailable: {err}"}
    n = library.num_adapters
    rng = np.random.default_rng(n)
    assign = rng.permutation(np.arange(n) % k)
    current = membership_mask(assign, k)
    movable = np.flatnonzero(current.sum(1)[assign] > 1)
    movers = rng.choice(movable, size=min(visits + 1, len(movable)), replace=False)

    def visit_sets(i):  # the mover's source set and one destination set
        source, dest = (
            current[assign[i]].copy(),
            current[rng.choice(np.delete(np.arange(k), assign[i]))].copy(),
        )
        source[i], dest[i] = False, True
        return np.stack([source, dest])

    cached = CachedObjective(objective)
    cached.cluster_losses(visit_sets(movers[0]))  # compiles the visit's shapes
    sets = [visit_sets(i) for i in movers[1:]]
    start = time.perf_counter()
    for pair in sets:
        cached.cluster_losses(pair)
    seconds = time.perf_counter() - start
    task_evaluations = int(sum(pair.sum() for pair in sets))
    per_task = seconds / task_evaluations
    per_visit = seconds / len(sets)
    # N visits (ceil(f N) with `D2CClustering.visit_fraction` f), plus the K current
    # clusters (N task evaluations) at the start
    estimate = lambda f: round(np.ceil(f * n) * per_visit + n * per_task, 1)
    return {
        "model": base.name,
        "examples_per_task": REAL_EXAMPLES,
        "visits_timed": len(sets),
        "task_evaluations": task_evaluations,
        "seconds_measured": round(seconds, 2),
        "seconds_per_visit": round(per_visit, 2),
        "seconds_per_task_evaluation": round(per_task, 3),
        "iteration_seconds_estimate": estimate(1.0),
        "iteration_seconds_estimate_by_visit_fraction": {
            str(f): estimate(f) for f in VISIT_FRACTIONS
        },
        "proxy_task_evaluations": n * k,
        "proxy_seconds_estimate": round(n * k * per_task, 1),
    }


# ---------------------------------------------------------------------- roofline


def matmul_peak(n: int = 2048, repeat: int = 5) -> dict:
    """Best-of-`repeat` NumPy float32 ``n^3`` matmul rate."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    timing = time_calls(lambda: a @ b, repeat=repeat, warmup=1)
    return {"n": n, "gflops_best": round(2 * n**3 / timing["min"] / 1e9, 1)}


def scoring_roofline(repeat: int) -> dict:
    """Time the scoring kernel on a random SmolLM2-135M-shaped model; count its FLOPs."""
    import jax
    import jax.numpy as jnp

    from d2c_jax.examples import EncodedExamples
    from d2c_jax.models import Decoder, DecoderConfig, init_weights
    from d2c_jax.scoring import score_candidates

    config = DecoderConfig(
        vocab_size=49152,
        hidden_size=HIDDEN,
        intermediate_size=1536,
        num_layers=LAYERS,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        max_position_embeddings=2048,
    )
    model = Decoder(config, init_weights(config, seed=0), dtype=jnp.float32)
    base = _bare_base(model)
    candidates, rows, row_len, examples = 2, 2, 128, 8
    length, labels = row_len * rows // examples, 8  # 8 examples of 32 tokens, 8 labels each
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, config.vocab_size, (examples, length)).astype(np.int32)
    loss_mask = np.zeros((examples, length), np.float32)
    loss_mask[:, -labels:] = 1
    bank = EncodedExamples(tokens=tokens, loss_mask=loss_mask)
    deltas = {
        m: {
            "delta": jnp.asarray(
                0.01 * rng.standard_normal((candidates, LAYERS, o, i)), jnp.float32
            )
        }
        for m, (o, i) in MODULE_SHAPES.items()
    }
    index = np.tile(np.arange(examples), (candidates, 1))
    call = lambda: score_candidates(
        base, deltas, bank, index, chunk_size=candidates, pack_len=row_len
    )
    _, stats = score_candidates(
        base, deltas, bank, index, chunk_size=candidates, pack_len=row_len, return_stats=True
    )
    timing = time_calls(call, repeat=repeat, warmup=1)
    square = jnp.asarray(rng.standard_normal((2048, 2048)), jnp.float32)
    xla_gemm = time_calls(lambda: block(square @ square), repeat=5, warmup=1)
    one = {m: d["delta"][0] for m, d in deltas.items()}  # one merged adapter [L, o, i]
    truncation = {
        kind: time_calls(functools.partial(truncate_all, one, kind), repeat=repeat)
        for kind in ("exact", "randomized")
    }
    computed = stats["computed_tokens"] // candidates
    label_positions = stats["computed_label_positions"] // candidates
    trunk = (
        2
        * LAYERS
        * sum(
            int(np.prod(config.module_shape(m)))
            for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        )
    )
    fold = LAYERS * sum(o * i for o, i in MODULE_SHAPES.values())  # W + delta, per candidate
    attention = (
        2
        * 2
        * LAYERS
        * config.num_heads
        * config.head_dim
        * stats["rows_per_candidate"]
        * row_len**2
    )
    head = 2 * config.vocab_size * HIDDEN
    flops = computed * trunk + fold + attention + label_positions * head
    jax.clear_caches()
    return {
        "model": "random weights of SmolLM2-135M's shape, float32, dense q,v deltas",
        "candidates_per_call": candidates,
        "rows_per_candidate": stats["rows_per_candidate"],
        "row_len": row_len,
        "label_positions_per_candidate": label_positions,
        "gflop_per_candidate": round(flops / 1e9, 2),
        "gflop_breakdown": {
            "trunk": round(computed * trunk / 1e9, 2),
            "delta_fold_adds": round(fold / 1e9, 3),
            "attention_full_rows": round(attention / 1e9, 2),
            "lm_head_at_labels": round(label_positions * head / 1e9, 2),
        },
        "seconds_per_call": round(timing["min"], 3),
        "gflops_per_second": round(candidates * flops / timing["min"] / 1e9, 1),
        "truncate_seconds_per_adapter": round(truncation["exact"]["min"], 3),
        "randomized_truncate_seconds_per_adapter": round(truncation["randomized"]["min"], 4),
        "xla_matmul_peak_gflops": round(2 * 2048**3 / xla_gemm["min"] / 1e9, 1),
        **device_record(),
    }


def _bare_base(model):
    """The `BaseModel` interface `score_candidates` needs, without a tokenizer."""
    from d2c_jax.models import BaseModel

    return BaseModel(model, tokenizer=None, name="smollm2-shape", source="random")


# ---------------------------------------------------------------------- driver


def child(argv: list[str]) -> dict:
    """Run one measurement in a fresh process (clean peak RSS); returns its JSON."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, __file__, *argv], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:], "argv": argv}
    return json.loads(proc.stdout.strip().splitlines()[-1])


STAGES = (
    "load_arrays",
    "load_files",
    "kmeans",
    "mbc",
    "merge_factor",
    "prepare_delta",
    "merge_delta",
    "merge_set",
    "d2c_scoring",
)


def exponents(sizes: list[dict]) -> dict[str, float]:
    """Per stage, b of the least-squares fit ``seconds ~ N^b`` over the sizes measured."""
    ok = [s for s in sizes if "error" not in s]
    if len(ok) < 2:
        return {}
    log_n = np.log([s["n"] for s in ok])
    return {
        stage: round(float(np.polyfit(log_n, np.log([s[stage]["seconds"] for s in ok]), 1)[0]), 3)
        for stage in STAGES
        if all(stage in s for s in ok)
    }


def plot(sizes: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [s for s in sizes if "error" not in s]
    ns = [s["n"] for s in ok]
    slopes = exponents(sizes)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for stage in STAGES:
        label = f"{stage} (N^{slopes[stage]:.2f})" if stage in slopes else stage
        ax_t.plot(ns, [s[stage]["seconds"] for s in ok], "o-", label=label)
        ax_m.plot(ns, [s[stage]["rss_peak_gb"] for s in ok], "o-", label=stage)
    ax_t.set(xscale="log", yscale="log", xlabel="adapters N (K = N/8)", ylabel="seconds")
    ax_t.set_title("time per stage (d2c_scoring: one iteration, tiny model)")
    ax_m.set(xscale="log", xlabel="adapters N", ylabel="GiB")
    ax_m.set_title("peak RSS during the stage")
    ax_m.axhline(24, color="k", ls=":", lw=1)
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    from d2c_jax.io import write_atomic

    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 40, 160 only")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--max-sets", type=int, default=3000, help="see d2c_scoring")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--out",
        default=None,
        help="result name under benchmarks/results/ (default: bench_scale[_quick])",
    )
    parser.add_argument(
        "--real-visits",
        type=int,
        default=8,
        help="D2C sweep visits timed with the embedded SmolLM2 at the largest N (0: none)",
    )
    parser.add_argument("--child-size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-roofline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_size is not None:
        print(json.dumps(bench_size(args.child_size, args.max_sets, args.repeat, args.real_visits)))
        return 0
    if args.child_roofline:
        print(json.dumps(scoring_roofline(args.repeat)))
        return 0

    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    load_before = list(os.getloadavg())  # the machine record holds the one after
    peak_before, bandwidth = matmul_peak(), memory_bandwidth()
    results = []
    for n in sizes:
        print(f"N={n} ...", flush=True)
        results.append(
            child(
                [
                    "--child-size",
                    str(n),
                    "--max-sets",
                    str(args.max_sets),
                    "--repeat",
                    str(args.repeat),
                    "--real-visits",
                    str(args.real_visits if n == max(sizes) else 0),
                ]
            )
        )
        print(json.dumps(results[-1])[:400], flush=True)
    roofline = child(["--child-roofline", "--repeat", str(args.repeat)])
    # The denominator: the best all-core float32 GEMM rate of NumPy (before and after
    # the sizes) and of XLA (in the roofline child), whichever is higher.
    numpy_peak = max(peak_before["gflops_best"], matmul_peak()["gflops_best"])
    peak = max(numpy_peak, roofline.get("xla_matmul_peak_gflops", 0.0))
    for r in results:
        if "error" not in r and "error" not in roofline:
            r["merge_delta"]["truncate_seconds_estimate"] = round(
                r["k"] * roofline["truncate_seconds_per_adapter"], 2
            )
            r["merge_delta"]["randomized_truncate_seconds_estimate"] = round(
                r["k"] * roofline["randomized_truncate_seconds_per_adapter"], 2
            )
    if "error" not in roofline:
        roofline["fraction_of_matmul_peak"] = round(roofline["gflops_per_second"] / peak, 3)
    merges = [r for r in results if "error" not in r]
    merge_roofline = None
    if merges:
        largest = merges[-1]
        moved = largest["merge_delta"]["min_bytes_moved"]
        rate = moved / largest["merge_delta"]["seconds"] / 1e9
        merge_roofline = {
            "n": largest["n"],
            "k": largest["k"],
            "min_bytes_moved_gb": round(moved / 1e9, 2),
            "seconds": largest["merge_delta"]["seconds"],
            "gb_per_second": round(rate, 2),
            "fraction_of_copy_bandwidth": round(rate / bandwidth["gb_per_s"], 3),
        }
    name = args.out or ("bench_scale_quick" if args.quick else "bench_scale")
    payload = {
        "quick": args.quick,
        "load_average_before": load_before,
        "setup": {
            "library": "synthetic, seeded: rank 8, q_proj (576x576) + v_proj (192x576), 30 layers",
            "k": "N / 8 (12.5% budget)",
            "merge": f"TIES density {DENSITY}, per-tensor trim, count divisor",
            "timing": f"best of {args.repeat} after one warm-up; load_files and kmeans: "
            "one timed call",
            "memory": "RSS sampled every 5 ms from /proc/self/statm; one process per N",
            "d2c_scoring_model": "tests/conftest.py tiny Llama (2 layers, hidden 64, vocab 259)",
            "max_sets": args.max_sets,
        },
        "matmul_peak_gflops": peak,
        "numpy_matmul_peak_gflops": numpy_peak,
        "copy_bandwidth": bandwidth,
        "sizes": results,
        "exponents": exponents(results),
        "roofline": {"scoring": roofline, "merge_delta": merge_roofline},
    }
    path = write_result(name, payload)
    plot(results, RESULTS_DIR / f"{name}.png")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
