"""Merge throughput: our batched kernels vs PEFT ``add_weighted_adapter`` in a loop.

Same random adapters for both (SmolLM2-135M shapes: 30 layers, q_proj 576x576 and
v_proj 192x576, rank 8, N=40), same merges, same process. Scenarios:

- clustering: K=5 clusters of 8 adapters (a 12.5% storage budget), merged all at
  once by one call (ours) vs one ``add_weighted_adapter`` per cluster (PEFT),
  in factor space (PEFT's semantics) and, without --quick, in delta space
  against PEFT's ``ties_svd``, truncated back to rank r exactly and by the
  randomized range finder. ``truncation_residual_over_exact`` is the Frobenius
  residual of the merged delta left by our truncation over the exact one's (what a
  truncation is judged by); ``max_relative_error_vs_peft`` compares the rank-r
  results themselves, which for the randomized truncation differ from PEFT's exact
  SVD wherever the merged delta's singular values are close (a different rank-r
  subspace with almost the same residual).
- candidates: the N*(K-1) = 160 destination candidates one D2C iteration scores
  (a cluster plus one adapter moved in), ours in one call.

Throughput is GB of member adapter parameters (float32 A and B) merged per
second: sum over clusters of (members x bytes of one adapter) / seconds. Ours is
timed end to end (trimming included) and by stage: prepare (trim / DARE once per
adapter) and combine (per membership mask). PEFT's time is its
add_weighted_adapter calls only (deleting the merged adapter between calls is
not timed), with the whole library loaded, on its first clusters, with 1 torch
thread and with torch's default (the faster counts). Every merge is checked to
agree with PEFT (dense B @ A), except DARE whose random masks differ. Memory
bandwidth is a plain NumPy copy at the start and end of the run (bytes read +
written per second; the better of the two); "fraction of bandwidth" is a
throughput over it.

    python benchmarks/bench_merge.py --quick     # under 2 minutes
    python benchmarks/bench_merge.py             # more methods, delta space, repeats
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# LAPACK (jax's eigh / svd on CPU go through scipy's OpenBLAS) with one thread: on a
# busy 2-core machine its default threads spin against each other and run ~20x
# slower. Set before numpy / scipy load; an explicit setting in the environment wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import memory_bandwidth, time_calls, write_result  # noqa: E402
from d2c_jax import merging  # noqa: E402
from kernels.merge import MergeConfig  # noqa: E402

LAYERS, RANK, ALPHA, HIDDEN = 30, 8, 16, 576
SHAPES = {"q_proj": (576, 576), "v_proj": (192, 576)}  # (d_out, d_in)
# PEFT runs with 1 torch thread and with torch's default; the faster counts (on a
# busy machine OpenMP spinning can make the default several times slower).
PEFT_THREADS = tuple(sorted({1, torch.get_num_threads()}))


def random_library(n: int, seed: int):
    """Stacked random adapters with realistic magnitudes (A ~ kaiming-uniform, B small)."""
    rng = np.random.default_rng(seed)
    params = {
        m: {
            "A": rng.uniform(-1, 1, (n, LAYERS, RANK, d_in)).astype(np.float32) / np.sqrt(d_in),
            "B": rng.normal(0, 0.01, (n, LAYERS, d_out, RANK)).astype(np.float32),
        }
        for m, (d_out, d_in) in SHAPES.items()
    }
    return params, np.full(n, ALPHA / RANK, np.float32)


def adapter_bytes(params) -> int:
    return sum(x[0].nbytes for f in params.values() for x in f.values())


def peft_model(params, names):
    """A torch Llama with SmolLM2's attention shapes (MLP and vocab shrunk) and N adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=9,
        num_key_value_heads=3,
    )
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(SHAPES))
    model = get_peft_model(LlamaForCausalLM(config), lora, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, lora)
    with torch.no_grad():
        for layer, block in enumerate(model.base_model.model.model.layers):
            for m in SHAPES:
                module = getattr(block.self_attn, m)
                for n, name in enumerate(names):
                    module.lora_A[name].weight.copy_(torch.from_numpy(params[m]["A"][n, layer]))
                    module.lora_B[name].weight.copy_(torch.from_numpy(params[m]["B"][n, layer]))
    return model


def peft_merge(model, names, members, combination, density):
    """One add_weighted_adapter call; returns (seconds, {m: (A [L,r,i], B [L,o,r])})."""
    start = time.perf_counter()
    model.add_weighted_adapter(
        adapters=[names[i] for i in members],
        weights=[1.0] * len(members),
        adapter_name="merged",
        combination_type=combination,
        density=density,
    )
    seconds = time.perf_counter() - start
    layers = model.base_model.model.model.layers
    out = {
        m: (
            np.stack(
                [getattr(b.self_attn, m).lora_A["merged"].weight.detach().numpy() for b in layers]
            ),
            np.stack(
                [getattr(b.self_attn, m).lora_B["merged"].weight.detach().numpy() for b in layers]
            ),
        )
        for m in SHAPES
    }
    model.delete_adapter("merged")
    return seconds, out


def max_relative_error(ours, peft, cluster: int) -> float:
    """Largest ||ours - peft|| / ||peft|| over modules of the dense B @ A."""
    errors = []
    for m, (a, b) in peft.items():
        ref = b @ a
        got = np.asarray(ours[m]["B"][cluster] @ ours[m]["A"][cluster])
        errors.append(float(np.linalg.norm(got - ref) / np.linalg.norm(ref)))
    return max(errors)


def membership_of(clusters, n):
    mask = np.zeros((len(clusters), n), np.float32)
    for c, members in enumerate(clusters):
        mask[c, list(members)] = 1
    return mask


def bench_ours(params, scale, names, clusters, config, repeat, truncation="exact"):
    """Seconds of merging all clusters at once: end to end and by stage.

    ``combine`` gives deployable rank-r adapters (in delta space: including the
    truncation); delta space also reports ``combine_untruncated`` (the dense merged
    deltas that candidate scoring uses). The first end-to-end call compiles every
    stage, so the others are timed without a further warm-up. Returns the timings
    and the merged adapters.
    """
    membership = jnp.asarray(membership_of(clusters, len(names)))

    def full():
        out = merging.merge(params, scale, membership, config, names=names, truncation=truncation)
        return jax.block_until_ready(out.params)

    timings = {"end_to_end": time_calls(full, repeat=repeat)}
    timings["prepare"] = time_calls(
        lambda: jax.block_until_ready(merging.prepare(params, scale, config, names=names)),
        repeat=repeat,
        warmup=0,
    )
    prepared = merging.prepare(params, scale, config, names=names)
    merged = merging.merged_factors(prepared, membership, truncation=truncation)
    timings["combine"] = time_calls(
        lambda: jax.block_until_ready(
            merging.merged_factors(prepared, membership, truncation=truncation).params
        ),
        repeat=repeat,
        warmup=0,
    )
    if config.space == "delta":
        timings["combine_untruncated"] = time_calls(
            lambda: jax.block_until_ready(merging.merged_deltas(prepared, membership)),
            repeat=repeat,
        )
        exact = merging.merged_factors(prepared, membership, truncation="exact").params
        timings["residual_over_exact"] = residual_ratio(
            merging.merged_deltas(prepared, membership), merged.params, exact
        )
    return timings, merged.params


def residual_ratio(deltas, ours, exact) -> float:
    """``||D - B A||_F`` of our truncation over the exact truncation's, over every
    cluster, module and layer (1 for the exact one; the best rank-r residual is the
    exact one's, so a truncation is judged by how close this is to 1)."""

    def residual(factors):
        return np.sqrt(
            sum(
                float(jnp.sum((d["delta"] - factors[m]["B"] @ factors[m]["A"]) ** 2))
                for m, d in deltas.items()
            )
        )

    return residual(ours) / residual(exact)


def run_case(
    label,
    config,
    combination,
    params,
    scale,
    names,
    model,
    clusters,
    peft_clusters,
    repeat,
    peft_repeat,
    check=True,
    truncation="exact",
):
    """Time ours on all `clusters` and PEFT on `peft_clusters` (their first ones).

    PEFT is timed with each of `PEFT_THREADS` torch threads; the fastest counts.

    With `check`, the largest relative difference of the dense B @ A between ours
    and PEFT is recorded (DARE draws different random masks in each, so not there).
    """
    one = adapter_bytes(params)
    ours_bytes = sum(len(c) for c in clusters) * one
    peft_bytes = sum(len(c) for c in peft_clusters) * one
    library_bytes = len(names) * one  # prepare runs once per adapter
    timings, merged = bench_ours(params, scale, names, clusters, config, repeat, truncation)
    error = 0.0 if check else None
    peft_runs: dict[int, list[float]] = {}
    for threads in PEFT_THREADS:
        torch.set_num_threads(threads)
        for _ in range(peft_repeat):
            total = 0.0
            for c, members in enumerate(peft_clusters):
                seconds, out = peft_merge(model, names, members, combination, config.density)
                total += seconds
                if check:
                    error = max(error, max_relative_error(merged, out, c))
            peft_runs.setdefault(threads, []).append(total)
    best_threads = min(peft_runs, key=lambda t: min(peft_runs[t]))
    peft_seconds = min(peft_runs[best_threads])
    result = {
        "method": config.method,
        "peft_combination_type": combination,
        "config": config.to_dict(),
        "truncation": truncation if config.space == "delta" else None,
        "clusters": len(clusters),
        "peft_clusters": len(peft_clusters),
        "max_relative_error_vs_peft": error,
        "ours": {
            part: {
                **t,
                "gb_per_s": (library_bytes if part == "prepare" else ours_bytes) / t["min"] / 1e9,
            }
            for part, t in timings.items()
            if part != "residual_over_exact"
        },
        "truncation_residual_over_exact": timings.get("residual_over_exact"),
        "peft": {
            "seconds_min": peft_seconds,
            "torch_threads": best_threads,
            "runs_by_torch_threads": peft_runs,
            "seconds_per_merge": peft_seconds / len(peft_clusters),
            "gb_per_s": peft_bytes / peft_seconds / 1e9,
        },
    }
    result["speedup_end_to_end"] = (
        result["ours"]["end_to_end"]["gb_per_s"] / result["peft"]["gb_per_s"]
    )
    result["speedup_combine"] = result["ours"]["combine"]["gb_per_s"] / result["peft"]["gb_per_s"]
    ours = result["ours"]
    shown_error = "n/a" if error is None else f"{error:.1e}"
    print(
        f"{label:34s} ours {ours['end_to_end']['gb_per_s']:7.3f} GB/s end-to-end, "
        f"{ours['combine']['gb_per_s']:7.3f} combine | PEFT {result['peft']['gb_per_s']:7.4f} GB/s"
        f" | x{result['speedup_end_to_end']:.1f} / x{result['speedup_combine']:.1f}"
        f" | err {shown_error}",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer methods and repeats (< 2 min)")
    parser.add_argument("--adapters", type=int, default=40, help="library size N (default: 40)")
    parser.add_argument("--clusters", type=int, default=5, help="K (default: 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default="bench_merge", help="result name under benchmarks/results/"
    )
    args = parser.parse_args(argv)

    n, k = args.adapters, args.clusters
    rng = np.random.default_rng(args.seed)
    params, scale = random_library(n, args.seed)
    names = [f"task{i:03d}" for i in range(n)]
    clusters = [tuple(sorted(c)) for c in np.array_split(rng.permutation(n), k)]
    # D2C destination candidates: every other cluster with adapter i moved in, N*(K-1).
    candidates = [
        tuple(sorted({*members, i})) for i in range(n) for members in clusters if i not in members
    ]
    # PEFT merges one cluster per call, so its throughput is measured on the first
    # `peft_merges` of the clusters (all of them unless --quick).
    repeat, peft_repeat, peft_merges = (3, 1, 2) if args.quick else (5, 2, k)
    bandwidth_start = memory_bandwidth()
    print(
        f"memory bandwidth (NumPy copy, read+write): {bandwidth_start['gb_per_s']:.1f} GB/s",
        flush=True,
    )
    print(f"building the PEFT model with {n} adapters ...", flush=True)
    start = time.perf_counter()
    model = peft_model(params, names)
    print(f"  {time.perf_counter() - start:.1f} s", flush=True)
    jparams = jax.tree.map(jnp.asarray, params)
    jscale = jnp.asarray(scale)

    cases = [
        ("ties", "ties", 0.2),
        ("task_arithmetic", "linear", None),
    ]
    if not args.quick:
        cases += [("magnitude_prune", "magnitude_prune", 0.2), ("dare_ties", "dare_ties", 0.5)]
    results = {}
    for method, combination, density in cases:
        config = MergeConfig(method, space="factor", density=density)
        label = f"factor {method} K={k}"
        results[label] = run_case(
            label,
            config,
            combination,
            jparams,
            jscale,
            names,
            model,
            clusters,
            clusters[:peft_merges],
            repeat,
            peft_repeat,
            check=not method.startswith("dare"),
        )
    config = MergeConfig("ties", space="factor", density=0.2)
    label = f"factor ties C={len(candidates)} candidates"
    results[label] = run_case(
        label,
        config,
        "ties",
        jparams,
        jscale,
        names,
        model,
        candidates,
        candidates[:peft_merges],
        repeat,
        peft_repeat,
    )
    if not args.quick:  # delta space (dense dW, TIES, rank-r truncation) vs PEFT's ties_svd
        config = MergeConfig("ties", space="delta", density=0.2)
        for truncation in merging.TRUNCATIONS:
            label = f"delta ties+{truncation} truncation K={k}"
            results[label] = run_case(
                label,
                config,
                "ties_svd",
                jparams,
                jscale,
                names,
                model,
                clusters,
                clusters[:2],
                3,
                1,
                truncation=truncation,
            )

    # Methods PEFT does not have (mergekit's DELLA / breadcrumbs, FusionBench's and
    # KnOTS's subspace merges): our batched merge of the K clusters, timed by stage;
    # their references' timings are not in this benchmark yet.
    beyond_peft = [
        ("della", "delta", dict(density=0.5)),
        ("breadcrumbs", "delta", dict(density=0.2)),
        ("tsvm", "delta", {}),
        ("iso_c", "delta", {}),
        ("iso_cts", "delta", {}),
        ("knots_ties", "delta", dict(density=1.0)),
    ]
    if not args.quick:
        beyond_peft += [
            ("della_linear", "factor", dict(density=0.5)),
            ("breadcrumbs_ties", "factor", dict(density=0.2)),
            ("knots_linear", "delta", {}),
        ]
    others = {}
    for method, space, extra in beyond_peft:
        label = f"{space} {method} K={k}"
        print(f"{label} ...", flush=True)
        timings, _ = bench_ours(
            jparams, jscale, names, clusters, MergeConfig(method, space=space, **extra), repeat
        )
        others[label] = {"config": MergeConfig(method, space=space, **extra).to_dict(), **timings}
        print(f"  end to end {timings['end_to_end']}", flush=True)

    # measured again at the end; on a shared machine the better of the two is the
    # closer estimate of what the hardware can do
    bandwidth_end = memory_bandwidth()
    bandwidth = max(bandwidth_start, bandwidth_end, key=lambda b: b["gb_per_s"])
    print(f"memory bandwidth at the end: {bandwidth_end['gb_per_s']:.1f} GB/s", flush=True)
    for result in results.values():
        for part in result["ours"].values():
            part["fraction_of_bandwidth"] = part["gb_per_s"] / bandwidth["gb_per_s"]
        result["peft"]["fraction_of_bandwidth"] = result["peft"]["gb_per_s"] / bandwidth["gb_per_s"]
    path = write_result(
        args.out,
        {
            "quick": args.quick,
            "setup": {
                "adapters": n,
                "layers": LAYERS,
                "rank": RANK,
                "modules": {m: list(s) for m, s in SHAPES.items()},
                "adapter_bytes_float32": adapter_bytes(params),
                "clusters": [list(map(int, c)) for c in clusters],
                "peft_torch_threads_tried": list(PEFT_THREADS),
                "openblas_num_threads": os.environ["OPENBLAS_NUM_THREADS"],
                "jax_devices": [str(d) for d in jax.devices()],
            },
            "throughput_definition": (
                "GB of member adapter parameters (float32 A and B) merged per second "
                "(prepare: GB of library parameters prepared per second); "
                "fraction_of_bandwidth divides by the NumPy copy bandwidth (read + write)"
            ),
            "memory_bandwidth": bandwidth,
            "memory_bandwidth_runs": {"start": bandwidth_start, "end": bandwidth_end},
            "results": results,
            "beyond_peft": others,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
