"""Candidate scoring speed: batched JAX vs a per-candidate JAX loop vs transformers+PEFT.

A *candidate* is a cluster of k adapters from a library of N rank-r LoRAs (q_proj and
v_proj of the embedded SmolLM2-135M-Instruct): merge it with TIES and compute the
mean NLL of each member task's dev examples under base + merged adapter. This is
the unit of work of D2C's search. Three ways to score the same C candidates, on the
same model weights, adapters and examples, in one run:

(a) ``batched``: ``merging.merged_deltas`` for all C candidates at once (TIES in delta
    space, untruncated) + ``scoring.score_candidates`` (one jitted, vmapped call per
    chunk of candidates; examples packed several to a row; LM head only at labels).
(b) ``loop``: for each candidate, ``merged_deltas`` of that one candidate + a jitted
    single-adapter ``example_nll`` over its examples (one example per row, padded to
    the longest; the same loss kernel with the same label compaction).
(c) ``torch_peft``: transformers + PEFT as a user would write it: the N adapters loaded
    into a ``PeftModel``; per candidate ``add_weighted_adapter(...,
    combination_type="ties_svd", density=0.2)``, ``set_adapter``, forward in batches of
    16 with an attention mask, per-example cross-entropy, ``delete_adapter``. With
    ``--quick`` only 2 candidates are timed for (c) (it is by far the slowest); all rates
    and ratios are per candidate.

Full runs add two ablations of (a): ``batched_unpacked`` (no packing: isolates the
gain of vmapping alone) and ``batched_deployed`` (truncate each merged delta to rank r
by SVD and score the factors: "score exactly what you deploy").

Also measured in the same run: this machine's dense float32 matmul rate (NumPy,
2048^3, best of 5, before and after), from which (a)'s fraction of peak is computed
with two FLOP counts: *executed* (what (a) computes, padding included) and *useful*
(what the real tokens need: all layers on real tokens, the head only on labels), and
the dominant GEMM shape timed in jitted JAX against NumPy (how fast XLA's own matmul
kernel is here).
A profile of one (a) call (``jax.profiler`` trace, XLA ops grouped into matmul and
other kinds via the compiled HLO) says where the time goes.

Usage: ``python benchmarks/bench_scoring.py [--quick]``; writes
``benchmarks/results/bench_scoring[_quick].json``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402

MODULES = ("q_proj", "v_proj")


def matmul_peak(n: int = 2048, repeat: int = 5) -> dict:
    """Best-of-`repeat` NumPy float32 ``n x n x n`` matmul rate (GFLOP/s)."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    a @ b
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        a @ b
        runs.append(time.perf_counter() - start)
    return {
        "n": n,
        "gflops_best": 2 * n**3 / min(runs) / 1e9,
        "gflops_median": 2 * n**3 / float(np.median(runs)) / 1e9,
    }


def gemm_efficiency(tokens: int, d_in: int, d_out: int, repeat: int = 7) -> dict:
    """The dominant GEMM of the forward (``[tokens, d_in] x [d_in, d_out]``) in jitted
    JAX and in NumPy, interleaved, best of `repeat`: how fast XLA's own matmul kernel
    runs on this machine relative to NumPy's BLAS, for the same shape."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens, d_in)).astype(np.float32)
    w = rng.standard_normal((d_out, d_in)).astype(np.float32)
    wt = np.ascontiguousarray(w.T)
    f = jax.jit(lambda x, w: jnp.einsum("ti,oi->to", x, w))
    xj, wj = jnp.asarray(x), jnp.asarray(w)
    f(xj, wj).block_until_ready()
    tj, tn = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        f(xj, wj).block_until_ready()
        tj.append(time.perf_counter() - t)
        t = time.perf_counter()
        x @ wt
        tn.append(time.perf_counter() - t)
    fl = 2 * tokens * d_in * d_out
    return {
        "shape": [tokens, d_in, d_out],
        "jax_gflops": round(fl / min(tj) / 1e9, 1),
        "numpy_gflops": round(fl / min(tn) / 1e9, 1),
        "jax_over_numpy": round(min(tn) / min(tj), 3),
    }


def random_library(config, n, rank, seed):
    """N random LoRAs with PEFT's A init (Kaiming-uniform) and a small random B."""
    rng = np.random.default_rng(seed)
    params = {}
    for m in MODULES:
        d_out, d_in = config.module_shape(m)
        bound = 1.0 / np.sqrt(d_in)
        params[m] = {
            "A": rng.uniform(-bound, bound, (n, config.num_layers, rank, d_in)).astype(np.float32),
            "B": (0.01 * rng.standard_normal((n, config.num_layers, d_out, rank))).astype(
                np.float32
            ),
        }
    return params


def flops(config, tokens: int, labels: int, attn_pairs: int) -> float:
    """Forward FLOPs: trunk matmuls on `tokens`, head on `labels`, attention on pairs."""
    c = config
    trunk = (
        2
        * tokens
        * c.num_layers
        * sum(
            int(np.prod(c.module_shape(m)))
            for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        )
    )
    head = 2 * labels * c.vocab_size * c.hidden_size
    attention = 2 * 2 * attn_pairs * c.num_layers * c.num_heads * c.head_dim
    return float(trunk + head + attention)


def spearman(x, y) -> float:
    rx = np.argsort(np.argsort(x))
    ry = np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


# ------------------------------------------------------------------ profile


def hlo_kinds(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Map each fusion / op name in optimized HLO to ``(kind, output shape)``; kind is
    "matmul" (it contains a dot or a convolution) or "other"."""
    bodies: dict[str, str] = {}
    current, lines = None, []
    for line in hlo_text.splitlines():
        head = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$", line)
        if head:
            current, lines = head.group(1), []
            continue
        if current and line.strip() == "}":
            bodies[current] = "\n".join(lines)
            current = None
            continue
        if current:
            lines.append(line)
    kinds = {}
    for body in bodies.values():
        for line in body.splitlines():
            m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+(\w[\w\-]*)\(", line)
            if not m:
                continue
            name, shape, op = m.groups()
            calls = re.search(r"calls=%?([\w.\-]+)", line)
            text = bodies.get(calls.group(1), "") if calls else line
            is_mm = op in ("dot", "convolution") or " dot(" in text or "convolution(" in text
            kinds[name] = ("matmul" if is_mm else "other", shape.split("{")[0])
    return kinds


def profile_call(fn, hlo_text: str, workdir: str) -> dict:
    """Run `fn` under the JAX profiler; group XLA op time into matmul / other."""
    import jax

    with jax.profiler.trace(workdir, create_perfetto_trace=True):
        fn()
    trace = glob.glob(os.path.join(workdir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    data = json.load(gzip.open(trace))
    events = data["traceEvents"] if isinstance(data, dict) else data
    kinds = hlo_kinds(hlo_text)
    per_op = collections.Counter()
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") == "X" and "hlo_op" in args:
            per_op[e["name"]] += e.get("dur", 0) / 1e6
    # while loops contain their bodies' ops: count only leaf ops
    leaf = {k: v for k, v in per_op.items() if not k.startswith(("while", "call", "conditional"))}
    total = sum(leaf.values())
    by_kind = collections.Counter()
    for name, sec in leaf.items():
        by_kind[kinds.get(name, ("other", ""))[0]] += sec
    top = [
        {
            "op": k,
            "kind": kinds.get(k, ("other", ""))[0],
            "shape": kinds.get(k, ("", "?"))[1],
            "seconds": round(v, 4),
            "share": round(v / total, 4),
        }
        for k, v in collections.Counter(leaf).most_common(12)
    ]
    return {
        "xla_op_seconds": round(total, 4),
        "by_kind_seconds": {k: round(v, 4) for k, v in by_kind.items()},
        "matmul_share": round(by_kind["matmul"] / total, 4) if total else None,
        "top_ops": top,
    }


# ------------------------------------------------------------------ main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run, under 2 minutes")
    parser.add_argument("--adapters", type=int, help="N adapters (tasks) in the library")
    parser.add_argument("--cluster-size", type=int, help="k adapters per candidate")
    parser.add_argument("--candidates", type=int, help="C candidates scored")
    parser.add_argument("--examples-per-task", type=int, help="dev examples per task (<= 10)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeat", type=int, help="timed repetitions per method")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument(
        "--torch-candidates",
        type=int,
        help="candidates timed for the torch peer (default: 2 with --quick, else all); "
        "rates are per candidate",
    )
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    q = args.quick
    n = args.adapters or (8 if q else 16)
    k = args.cluster_size or (4 if q else 8)
    c = args.candidates or (4 if q else 8)
    e = args.examples_per_task or (5 if q else 10)
    repeat = args.repeat or (1 if q else 2)
    torch_cands = min(c, args.torch_candidates or (2 if q else c))
    wall = time.perf_counter()

    import jax
    import jax.numpy as jnp

    from d2c_jax import merging
    from d2c_jax.models import load_base
    from d2c_jax.scoring import (
        encode_examples,
        example_nll,
        pack_examples,
        score_candidates,
        task_mean_nll,
    )
    from d2c_jax.tasks import list_tasks, load_split

    load_start = [os.getloadavg()[0]]
    peak_before = matmul_peak()
    base = load_base("default")
    cfg = base.config
    tasks = list_tasks()[:n]
    if len(tasks) < n:
        raise SystemExit(f"only {len(tasks)} tasks available")
    examples = [dict(x, task=t) for t in tasks for x in load_split(None, t, "dev")[:e]]
    bank = encode_examples(base, examples)
    rng = np.random.default_rng(args.seed)
    masks = np.zeros((c, n), bool)
    for i in range(c):
        masks[i, rng.choice(n, k, replace=False)] = True
    example_idx = np.stack(
        [
            np.concatenate([np.arange(t * e, (t + 1) * e) for t in np.flatnonzero(row)])
            for row in masks
        ]
    )
    task_of = bank.task_ids
    params_np = random_library(cfg, n, args.rank, args.seed)
    params = jax.tree.map(jnp.asarray, params_np)
    alpha = 2.0 * args.rank
    scale = jnp.full((n,), alpha / args.rank, jnp.float32)
    merge_cfg = merging.DEFAULT_MERGE
    t0 = time.perf_counter()
    prepared = merging.prepare(params, scale, merge_cfg, names=tasks)
    jax.block_until_ready(prepared.tensors)
    prepare_seconds = time.perf_counter() - t0
    mask_j = jnp.asarray(masks, jnp.float32)

    results: dict[str, dict] = {}
    outputs: dict[str, np.ndarray] = {}

    def per_task(nll):
        return task_mean_nll(nll, task_of[example_idx], n)

    # (a) batched merge + vmapped, packed scoring
    def run_batched(pack=True, deployed=False):
        t = time.perf_counter()
        if deployed:
            merged = merging.merged_factors(prepared, mask_j)
            cands, cscale = merged.params, merged.scale
        else:
            cands, cscale = merging.merged_deltas(prepared, mask_j), None
        jax.block_until_ready(cands)
        merge_s = time.perf_counter() - t
        nll, stats = score_candidates(
            base, cands, bank, example_idx, scale=cscale, pack=pack, return_stats=True
        )
        return per_task(nll), merge_s, time.perf_counter() - t - merge_s, stats

    # (b) per-candidate loop: our merge of one candidate + jitted single-adapter forward
    single = jax.jit(example_nll, static_argnames=("max_labels",))
    longest = int(bank.lengths[example_idx].max())
    t_len = -(-longest // 16) * 16
    max_labels = -(-int(bank.num_labels[example_idx].max()) // 16) * 16

    def run_loop():
        merge_s = score_s = 0.0
        nll = np.empty(example_idx.shape, np.float32)
        for i in range(c):
            t = time.perf_counter()
            delta = merging.merged_deltas(prepared, mask_j[i : i + 1])
            delta = jax.tree.map(lambda x: x[0], delta)
            jax.block_until_ready(delta)
            t2 = time.perf_counter()
            rows = example_idx[i]
            nll[i] = np.asarray(
                single(
                    base,
                    delta,
                    1.0,
                    bank.tokens[rows, :t_len],
                    bank.loss_mask[rows, :t_len],
                    max_labels=max_labels,
                )
            )
            merge_s += t2 - t
            score_s += time.perf_counter() - t2
        return per_task(nll), merge_s, score_s, None

    methods = {"batched": run_batched, "loop": run_loop}
    if not q:
        methods["batched_unpacked"] = lambda: run_batched(pack=False)
        methods["batched_deployed"] = lambda: run_batched(deployed=True)

    # (c) transformers + PEFT
    tmp = tempfile.TemporaryDirectory(prefix="bench_scoring_")
    if not args.skip_torch:
        import torch
        import transformers
        from peft import PeftModel

        from d2c_jax.library import save_peft_adapter
        from d2c_jax.models.hf import save_hf_weights

        w = base.model.weights()
        weights = {key: np.asarray(v) for key, v in w.items() if key != "layers"}
        weights["layers"] = {key: np.asarray(v) for key, v in w["layers"].items()}
        save_hf_weights(Path(tmp.name) / "hf", cfg, weights)
        tmodel = transformers.AutoModelForCausalLM.from_pretrained(
            str(Path(tmp.name) / "hf"), dtype=torch.float32
        ).eval()
        names = [f"t{i}" for i in range(n)]
        for i in range(n):
            save_peft_adapter(
                Path(tmp.name) / names[i],
                {m: {f: params_np[m][f][i] for f in "AB"} for m in MODULES},
                rank=args.rank,
                alpha=alpha,
                base_model=base.name,
                dtype=jnp.float32,
            )
        pmodel = PeftModel.from_pretrained(
            tmodel, str(Path(tmp.name) / names[0]), adapter_name=names[0]
        )
        for i in range(1, n):
            pmodel.load_adapter(str(Path(tmp.name) / names[i]), adapter_name=names[i])
        pmodel.eval()

        def run_torch():
            merge_s = score_s = 0.0
            nll = np.full(example_idx.shape, np.nan, np.float32)
            with torch.inference_mode():
                for i in range(torch_cands):
                    t = time.perf_counter()
                    members = [names[j] for j in np.flatnonzero(masks[i])]
                    pmodel.add_weighted_adapter(
                        members,
                        [1.0] * len(members),
                        "cand",
                        combination_type="ties_svd",
                        density=0.2,
                    )
                    pmodel.set_adapter("cand")
                    t2 = time.perf_counter()
                    rows = example_idx[i]
                    for lo in range(0, len(rows), 16):
                        r = rows[lo : lo + 16]
                        ids = torch.from_numpy(bank.tokens[r, :t_len]).long()
                        att = torch.from_numpy(
                            np.arange(t_len)[None, :] < bank.lengths[r][:, None]
                        ).long()
                        logits = pmodel(input_ids=ids, attention_mask=att).logits[:, :-1]
                        labels = ids[:, 1:].clone()
                        labels[torch.from_numpy(bank.loss_mask[r, 1:t_len]) == 0] = -100
                        ce = torch.nn.functional.cross_entropy(
                            logits.reshape(-1, logits.shape[-1]),
                            labels.reshape(-1),
                            reduction="none",
                        ).reshape(labels.shape)
                        nll[i, lo : lo + len(r)] = (ce.sum(1) / (labels != -100).sum(1)).numpy()
                    score_s += time.perf_counter() - t2
                    pmodel.delete_adapter("cand")
                    merge_s += t2 - t
            return per_task(nll), merge_s, score_s, None

        def warm_torch():  # torch compiles nothing: one merge and one batch warm it up
            with torch.inference_mode():
                members = [names[j] for j in np.flatnonzero(masks[0])]
                pmodel.add_weighted_adapter(
                    members, [1.0] * len(members), "cand", combination_type="ties_svd", density=0.2
                )
                pmodel.set_adapter("cand")
                pmodel(input_ids=torch.from_numpy(bank.tokens[example_idx[0][:16], :t_len]).long())
                pmodel.delete_adapter("cand")

        methods["torch_peft"] = run_torch

    done = {name: c for name in methods}
    if "torch_peft" in methods:
        done["torch_peft"] = torch_cands
    # warm-up (compilation), then interleaved timed repetitions
    compile_seconds = {}
    for name, fn in methods.items():
        t = time.perf_counter()
        warm_torch() if name == "torch_peft" else fn()
        compile_seconds[name] = time.perf_counter() - t
    runs: dict[str, list] = {name: [] for name in methods}
    for _ in range(repeat):
        for name, fn in methods.items():
            t = time.perf_counter()
            out = fn()
            total = time.perf_counter() - t
            runs[name].append((total, out[1], out[2]))
            outputs[name], stats = out[0], out[3]
            if stats is not None:
                results.setdefault(name, {})["score_stats"] = stats
    load_start.append(os.getloadavg()[0])
    gemm = gemm_efficiency(2048, cfg.hidden_size, cfg.intermediate_size)
    peak_after = matmul_peak()
    peak = max(peak_before["gflops_best"], peak_after["gflops_best"])

    real_tokens = int(bank.lengths[example_idx].sum())
    labels = int(bank.num_labels[example_idx].sum())
    pairs = int((bank.lengths[example_idx] * (bank.lengths[example_idx] + 1) // 2).sum())
    useful = flops(cfg, real_tokens, labels, pairs)
    for name, rs in runs.items():
        best = min(rs, key=lambda r: r[0])
        entry = results.setdefault(name, {})
        entry.update(
            {
                "seconds": round(best[0], 4),
                "merge_seconds": round(best[1], 4),
                "score_seconds": round(best[2], 4),
                "all_runs_seconds": [round(r[0], 4) for r in rs],
                "warmup_seconds_incl_compile": round(compile_seconds[name], 3),
                "candidates_timed": done[name],
                "seconds_per_candidate": round(best[0] / done[name], 4),
                "candidates_per_second": round(done[name] / best[0], 4),
                "real_tokens_per_second": round(real_tokens * done[name] / c / best[0], 1),
                "useful_gflops_per_second": round(useful * done[name] / c / best[0] / 1e9, 2),
                "useful_fraction_of_matmul_peak": round(
                    useful * done[name] / c / best[0] / 1e9 / peak, 4
                ),
            }
        )
        st = entry.get("score_stats")
        if st:
            t_rows = st["seq_len"]
            executed = flops(
                cfg,
                st["computed_tokens"],
                st["computed_label_positions"],
                st["computed_tokens"] * (t_rows + 1) // 2,
            )
            entry["executed_gflop"] = round(executed / 1e9, 2)
            entry["executed_fraction_of_matmul_peak_scoring_only"] = round(
                executed / best[2] / 1e9 / peak, 4
            )
            entry["executed_fraction_of_matmul_peak_end_to_end"] = round(
                executed / best[0] / 1e9 / peak, 4
            )
    # the loop's executed FLOPs (one example per padded row)
    loop_exec = flops(
        cfg,
        c * example_idx.shape[1] * t_len,
        c * example_idx.shape[1] * max_labels,
        c * example_idx.shape[1] * t_len * (t_len + 1) // 2,
    )
    results["loop"]["executed_gflop"] = round(loop_exec / 1e9, 2)
    results["loop"]["executed_fraction_of_matmul_peak_scoring_only"] = round(
        loop_exec / results["loop"]["score_seconds"] / 1e9 / peak, 4
    )

    agreement = {}
    ref = outputs["batched"]
    for name, out in outputs.items():
        if name != "batched":
            agreement[f"max_abs_task_nll_diff_batched_vs_{name}"] = float(
                np.nanmax(np.abs(out - ref))
            )
    if "torch_peft" in outputs and "batched_deployed" in outputs:
        agreement["max_abs_task_nll_diff_deployed_vs_torch_peft"] = float(
            np.nanmax(np.abs(outputs["batched_deployed"] - outputs["torch_peft"]))
        )
    agreement["mean_task_nll_batched"] = float(np.nanmean(ref))
    # does scoring the untruncated delta rank candidates like scoring what is deployed?
    cand_mean = {name: np.nanmean(out, axis=1) for name, out in outputs.items()}
    for other in ("batched_deployed", "torch_peft"):
        both = ~np.isnan(cand_mean[other]) if other in cand_mean else np.zeros(c, bool)
        if both.sum() > 2:
            agreement[f"spearman_candidate_ranking_batched_vs_{other}"] = spearman(
                cand_mean["batched"][both], cand_mean[other][both]
            )
    agreement["candidate_mean_nll"] = {
        k2: [None if np.isnan(x) else round(float(x), 4) for x in v] for k2, v in cand_mean.items()
    }

    per_cand = {name: results[name]["seconds_per_candidate"] for name in results}
    ratios = {"batched_over_loop": per_cand["loop"] / per_cand["batched"]}
    if "torch_peft" in results:
        ratios["batched_over_torch_peft"] = per_cand["torch_peft"] / per_cand["batched"]
    if "batched_unpacked" in results:
        ratios["unpacked_over_loop"] = (
            results["loop"]["seconds"] / results["batched_unpacked"]["seconds"]
        )

    profile = None
    if not args.no_profile:
        deltas = merging.merged_deltas(prepared, mask_j)
        _, st = score_candidates(base, deltas, bank, example_idx, return_stats=True)
        packed = pack_examples(bank, example_idx, np.ones(example_idx.shape, bool), st["seq_len"])
        from d2c_jax.scoring import _packed_candidate_nll_jit

        size = st["chunk_size"]
        sel = np.arange(size)
        chunk = jax.tree.map(lambda x: x[:size], deltas)
        call_args = (
            base,
            chunk,
            jnp.ones((size,), jnp.float32),
            packed.tokens[sel],
            packed.segments[sel],
            packed.positions[sel],
            packed.loss_mask[sel],
            packed.slots[sel],
        )
        kwargs = dict(
            num_examples=example_idx.shape[1], max_labels=st["max_labels"], vocab_chunk=8192
        )
        hlo = _packed_candidate_nll_jit.lower(*call_args, **kwargs).compile().as_text()
        t = time.perf_counter()
        profile = profile_call(
            lambda: jax.block_until_ready(_packed_candidate_nll_jit(*call_args, **kwargs)),
            hlo,
            os.path.join(tmp.name, "trace"),
        )
        profile["call_wall_seconds_under_profiler"] = round(time.perf_counter() - t, 3)
        profile["candidates_in_call"] = size
        profile["note"] = (
            "one jitted scoring call of (a) (one chunk); 'matmul' = XLA ops "
            "whose fused computation contains a dot"
        )
    tmp.cleanup()

    payload = {
        "quick": q,
        "setup": {
            "model": base.name,
            "dtype": "float32",
            "adapters": n,
            "rank": args.rank,
            "target_modules": list(MODULES),
            "cluster_size": k,
            "candidates": c,
            "examples_per_task": e,
            "torch_candidates_timed": torch_cands if not args.skip_torch else 0,
            "examples_per_candidate": int(example_idx.shape[1]),
            "real_tokens_per_candidate": real_tokens / c,
            "label_tokens_per_candidate": labels / c,
            "merge": {
                "method": merge_cfg.method,
                "space": merge_cfg.space,
                "density": merge_cfg.density,
                "jax_scores": "untruncated merged delta",
                "torch": "add_weighted_adapter ties_svd density 0.2 (SVD to rank r)",
            },
            "adapters_note": "random LoRAs (seeded): A Kaiming-uniform as PEFT, B N(0, 0.01)",
            "examples": "built-in task suite, dev split",
            "library_prepare_seconds_once": round(prepare_seconds, 3),
            "timing": f"best of {repeat} interleaved repetitions after one warm-up each",
        },
        "matmul_peak": {"before": peak_before, "after": peak_after, "gflops_used": peak},
        "load_average_1min": {"start": load_start[0], "end": load_start[1]},
        "flops": {
            "useful_gflop_total": round(useful / 1e9, 2),
            "model_gflop_per_token": round(cfg.flops_per_token() / 1e9, 4),
        },
        "methods": results,
        "ratios": {key: round(v, 3) for key, v in ratios.items()},
        "agreement": agreement,
        "profile_batched": profile,
        "gemm_jax_vs_numpy": gemm,
        "wall_seconds": round(time.perf_counter() - wall, 1),
    }
    path = write_result("bench_scoring_quick" if q else "bench_scoring", payload)
    key = "executed_fraction_of_matmul_peak_scoring_only"
    print(
        json.dumps(
            {
                "ratios": payload["ratios"],
                "seconds": {k2: v["seconds"] for k2, v in results.items()},
                "fraction_of_peak": {k2: v.get(key) for k2, v in results.items()},
                "peak_gflops": round(peak, 1),
                "wall": payload["wall_seconds"],
            },
            indent=2,
        )
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
