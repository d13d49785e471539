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
(c) ``torch_peft``: transformers + PEFT as a user would write it (`benchmarks/peers.py`,
    shared with ``bench_d2c.py``): the N adapters loaded into a ``PeftModel``; per
    candidate ``add_weighted_adapter(..., combination_type="ties_svd", density=0.2)``,
    ``set_adapter``, forward in batches of 16 padded to their longest with an attention
    mask, per-example cross-entropy, ``delete_adapter``; torch threads: the faster of 1
    and the default on a probe. With ``--quick`` only 2 candidates are timed for (c)
    (it is by far the slowest); all rates and ratios are per candidate.

Full runs add two ablations of (a): ``batched_unpacked`` (no packing: isolates the
gain of vmapping alone) and ``batched_deployed`` (truncate each merged delta to rank r
by SVD and score the factors: "score exactly what you deploy").

Also measured in the same run: this machine's dense float32 matmul rate (the best of
NumPy's, 2048^3, best of 5, before and after, and jitted XLA's on the same shape),
from which (a)'s fraction of peak is computed
with two FLOP counts: *executed* (what (a) computes, padding included) and *useful*
(what the real tokens need: all layers on real tokens, the head only on labels), and
the dominant GEMM shape timed in jitted JAX against NumPy (how fast XLA's own matmul
kernel is here).
A profile of one (a) call (the ``profile`` section) says where the time goes: XLA's
cost analysis and an analytic count of the executed FLOPs per candidate, the call's
GFLOP/s as a fraction of that matmul peak, and (``jax.profiler`` trace) the op
time split into matmul / other and into components (attention, q/v projections with
the adapter folded in, the fold itself, k/o projections, MLP, loss head, norms,
other), each with its GFLOP/s.

Usage: ``python benchmarks/bench_scoring.py [--quick]``; writes
``benchmarks/results/bench_scoring[_quick].json``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import linecache
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import time_calls, write_result  # noqa: E402

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


def xla_matmul_peak(n: int = 2048, repeat: int = 5) -> float:
    """Best-of-`repeat` jitted JAX float32 ``n x n x n`` matmul rate (GFLOP/s): XLA's
    own GEMM, which can beat NumPy's BLAS on the same cores."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    product = jax.jit(lambda x: x @ x)
    timing = time_calls(lambda: jax.block_until_ready(product(a)), repeat=repeat, warmup=1)
    return 2 * n**3 / timing["min"] / 1e9


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


# ------------------------------------------------------------------ profile


# Components of the scoring kernel. XLA keeps, for every op, the Python frames that
# emitted it (HLO stack-frame metadata); the innermost frame's function (and, inside
# `lora_linear`, the source lines of its frames and the weight's shape) names the
# component.
COMPONENTS = (
    "attention",  # scores, softmax, probs @ v, RoPE
    "adapted_projections",  # q, v GEMMs with per-candidate weights W + delta
    "lora_fold",  # W + delta, per candidate and layer
    "other_projections",  # k, o GEMMs (shared weights)
    "mlp",  # gate, up, down GEMMs and SiLU * up
    "loss_head",  # LM head at label positions, log-sum-exp, label gather
    "norms",
    "other",  # embedding gather, masks, residual adds, loop bookkeeping
)


def _hlo_table(hlo_text: str, name: str) -> dict[int, str]:
    """A numbered table of the HLO module's stack-frame metadata (FileNames, ...)."""
    rows: dict[int, str] = {}
    at = hlo_text.find(f"\n{name}\n")
    if at < 0:
        return rows
    for line in hlo_text[at + len(name) + 2 :].splitlines():
        m = re.match(r"^(\d+) (.*)$", line)
        if not m:
            break
        rows[int(m[1])] = m[2]
    return rows


def _frames(hlo_text: str) -> dict[int, tuple[str, str, str, int]]:
    """stack_frame_id -> (function, file, source text of its line(s), parent id)."""
    files = {k: v.strip('"') for k, v in _hlo_table(hlo_text, "FileNames").items()}
    functions = {k: v.strip('"') for k, v in _hlo_table(hlo_text, "FunctionNames").items()}
    locations = {
        k: {a: int(b) for a, b in re.findall(r"(\w+)=(\d+)", v)}
        for k, v in _hlo_table(hlo_text, "FileLocations").items()
    }
    frames = {}
    for k, v in _hlo_table(hlo_text, "StackFrames").items():
        loc = locations[int(re.search(r"file_location_id=(\d+)", v)[1])]
        parent = re.search(r"parent_frame_id=(\d+)", v)
        path = files[loc["file_name_id"]]
        text = " ".join(
            linecache.getline(path, n).strip() for n in range(loc["line"], loc["end_line"] + 1)
        )
        frames[k] = (
            functions[loc["function_name_id"]],
            path,
            text,
            int(parent[1]) if parent else 0,
        )
    return frames


def _sources(frames, frame_id: int, function: str) -> str:
    """Source text of `frame_id` and of the frames above it that are in `function` (a
    GEMM on the folded weight W + delta is recorded under the fold's line)."""
    texts, seen = [], set()
    while frame_id in frames and frame_id not in seen and frames[frame_id][0] == function:
        seen.add(frame_id)
        texts.append(frames[frame_id][2])
        frame_id = frames[frame_id][3]
    return " ".join(texts)


def hlo_ops(hlo_text: str, mlp_weights: set[tuple[int, int]]) -> dict[str, dict[str, str]]:
    """Each op of optimized HLO -> ``{"kind", "shape", "component"}``.

    kind is "matmul" (it contains a dot or a convolution) or "other"; component is one
    of `COMPONENTS`; `mlp_weights` are the ``(d_out, d_in)`` shapes of the MLP weights.
    """
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
    frames = _frames(hlo_text)
    shapes: dict[str, str] = {}
    parsed = []
    for body in bodies.values():
        for line in body.splitlines():
            m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+(\w[\w\-]*)\((.*)", line)
            if m:
                shapes[m[1]] = m[2].split("{")[0]
                parsed.append((m, line))
    ops = {}
    for m, line in parsed:
        name, shape, op, rest = m.groups()
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        text = bodies.get(calls.group(1), "") if calls else line
        is_mm = op in ("dot", "convolution") or " dot(" in text or "convolution(" in text
        # A fusion without metadata of its own: take its dot's (or first op's) frame.
        dots = [x for x in text.splitlines() if " dot(" in x]
        frame = next(
            filter(None, (re.search(r"stack_frame_id=(\d+)", x) for x in [line, *dots, text])),
            None,
        )
        frame_id = int(frame[1]) if frame else 0
        function, path, _, _ = frames.get(frame_id, ("", "", "", 0))
        source = _sources(frames, frame_id, function)
        operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
        dims = {
            tuple(int(d) for d in re.findall(r"\d+", shapes.get(o, "").split("[")[-1]))
            for o in operands
        }
        if path.endswith("kernels/loss.py"):
            component = "loss_head"
        elif function in ("attention", "apply_rope", "rope_tables"):
            component = "attention"
        elif is_mm and not function and shape.count(",") >= 3:
            # XLA can drop the metadata of attention's batched dots; only they are
            # matmuls with rank >= 4 (projections are [C, tokens, d] or [tokens, d]).
            component = "attention"
        elif function == "rms_norm":
            component = "norms"
        elif function == "lora_linear" and "delta" in source:
            # the fold itself, or a GEMM whose weight operand is the fold (fused in)
            component = "adapted_projections" if is_mm else "lora_fold"
        elif function == "lora_linear" and is_mm:
            component = "mlp" if dims & mlp_weights else "other_projections"
        elif function == "decoder_layer" and "silu" in source:
            component = "mlp"
        else:
            component = "other"
        ops[name] = {"kind": "matmul" if is_mm else "other", "shape": shape.split("{")[0]}
        ops[name]["component"] = component
    return ops


def component_flops(config, adapted, tokens: int, label_positions: int, pairs: int) -> dict:
    """Executed FLOPs per component: GEMMs on `tokens`, the head on `label_positions`,
    attention on `pairs` (query, key) pairs; `adapted` modules have W + delta folded."""
    c = config
    gemm = lambda modules: (
        2 * tokens * c.num_layers * sum(int(np.prod(c.module_shape(m))) for m in modules)
    )
    attention_modules = ("q_proj", "k_proj", "v_proj", "o_proj")
    return {
        "attention": 2 * 2 * pairs * c.num_layers * c.num_heads * c.head_dim,
        "adapted_projections": gemm([m for m in attention_modules if m in adapted]),
        "other_projections": gemm([m for m in attention_modules if m not in adapted]),
        "mlp": gemm(("gate_proj", "up_proj", "down_proj")),
        "loss_head": 2 * label_positions * c.vocab_size * c.hidden_size,
    }


def profile_call(fn, ops: dict[str, dict[str, str]], workdir: str) -> dict:
    """Run `fn` under the JAX profiler; XLA op time by kind (matmul / other) and by
    component (`hlo_ops`)."""
    import jax

    with jax.profiler.trace(workdir, create_perfetto_trace=True):
        fn()
    trace = glob.glob(os.path.join(workdir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    data = json.load(gzip.open(trace))
    events = data["traceEvents"] if isinstance(data, dict) else data
    per_op = collections.Counter()
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") == "X" and "hlo_op" in args:
            per_op[e["name"]] += e.get("dur", 0) / 1e6
    # while loops contain their bodies' ops: count only leaf ops
    leaf = {k: v for k, v in per_op.items() if not k.startswith(("while", "call", "conditional"))}
    total = sum(leaf.values())
    unknown = {"kind": "other", "shape": "?", "component": "other"}
    by_kind, by_component = collections.Counter(), collections.Counter()
    for name, sec in leaf.items():
        by_kind[ops.get(name, unknown)["kind"]] += sec
        by_component[ops.get(name, unknown)["component"]] += sec
    top = [
        {"op": k, **ops.get(k, unknown), "seconds": round(v, 4), "share": round(v / total, 4)}
        for k, v in collections.Counter(leaf).most_common(12)
    ]
    return {
        "xla_op_seconds": round(total, 4),
        "by_kind_seconds": {k: round(v, 4) for k, v in by_kind.items()},
        "matmul_share": round(by_kind["matmul"] / total, 4) if total else None,
        "by_component_seconds": {k: round(by_component[k], 4) for k in COMPONENTS},
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
    from scipy.stats import spearmanr

    from d2c_jax import merging
    from d2c_jax.examples import encode_examples
    from d2c_jax.models import load_base
    from d2c_jax.packing import pack_examples
    from d2c_jax.scoring import example_nll, score_candidates, task_mean_nll
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
    jax.block_until_ready(prepared)
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

    # (c) transformers + PEFT (benchmarks/peers.py)
    tmp = tempfile.TemporaryDirectory(prefix="bench_scoring_")
    if not args.skip_torch:
        from benchmarks import peers

        names = [f"t{i}" for i in range(n)]
        pmodel = peers.peft_model(
            peers.causal_lm(base, Path(tmp.name) / "hf"),
            peers.save_adapters(
                params_np,
                names,
                rank=args.rank,
                alpha=alpha,
                base_model=base.name,
                workdir=Path(tmp.name),
            ),
        )
        examples_of = [np.arange(t * e, (t + 1) * e) for t in range(n)]
        torch_threads = peers.pick_torch_threads(pmodel, names, bank, merge_cfg)

        def run_torch():
            timed = peers.score_member_sets(
                pmodel, names, masks[:torch_cands], bank, examples_of, merge_cfg
            )
            out = np.full((c, n), np.nan)
            out[:torch_cands] = timed.value
            return out, timed.merge_seconds, timed.score_seconds, None

        methods["torch_peft"] = run_torch

    done = {name: c for name in methods}
    if "torch_peft" in methods:
        done["torch_peft"] = torch_cands
    # warm-up (compilation), then interleaved timed repetitions
    compile_seconds = {}
    for name, fn in methods.items():
        t = time.perf_counter()
        peers.warm_up(pmodel, names, bank, merge_cfg) if name == "torch_peft" else fn()
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
    xla_peak = xla_matmul_peak()
    # The denominator: the best all-core float32 GEMM of NumPy (before and after) and XLA.
    peak = max(peak_before["gflops_best"], peak_after["gflops_best"], xla_peak)

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
            agreement[f"spearman_candidate_ranking_batched_vs_{other}"] = float(
                spearmanr(cand_mean["batched"][both], cand_mean[other][both]).statistic
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
        compiled = _packed_candidate_nll_jit.lower(*call_args, **kwargs).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        mlp_weights = {cfg.module_shape(m) for m in ("gate_proj", "up_proj", "down_proj")}
        ops = hlo_ops(compiled.as_text(), mlp_weights)
        # The AOT executable runs exactly the HLO that `ops` describes.
        call = lambda: jax.block_until_ready(compiled(*call_args))
        seconds = time_calls(call, repeat=1)["min"]
        t = time.perf_counter()
        profile = profile_call(call, ops, os.path.join(tmp.name, "trace"))
        profile["call_wall_seconds_under_profiler"] = round(time.perf_counter() - t, 3)
        rows, seq = packed.tokens.shape[1], st["seq_len"]
        # Packed rows attend over all seq x seq pairs (segment masks select within them).
        executed = component_flops(
            cfg,
            MODULES,
            tokens=size * rows * seq,
            label_positions=size * rows * st["max_labels"],
            pairs=size * rows * seq * seq,
        )
        total_flops = sum(executed.values())
        op_seconds = profile["xla_op_seconds"]
        components = {}
        for name, sec in profile["by_component_seconds"].items():
            entry = {"seconds": sec, "share_of_op_time": round(sec / op_seconds, 4)}
            if name in executed and sec > 0:
                rate = executed[name] / max(sec, 1e-9) / 1e9
                entry["executed_gflop"] = round(executed[name] / 1e9, 3)
                entry["gflops_per_second"] = round(rate, 2)
                entry["fraction_of_matmul_peak"] = round(rate / peak, 4)
            components[name] = entry
        profile.update(
            {
                "candidates_in_call": size,
                "call_seconds": round(seconds, 3),
                "xla_cost_analysis_flops": cost.get("flops"),
                "analytic_executed_flops": total_flops,
                "flops_per_candidate": {
                    "xla_cost_analysis": cost.get("flops", 0) / size,
                    "analytic_executed": total_flops / size,
                },
                "gflops_per_second": round(total_flops / seconds / 1e9, 2),
                "fraction_of_matmul_peak": round(total_flops / seconds / 1e9 / peak, 4),
                "components": components,
                "note": (
                    "one jitted scoring call of (a) (one chunk of candidates), AOT-compiled and "
                    "timed once without and once under the profiler; components from XLA's "
                    "stack-frame metadata (see COMPONENTS); executed FLOPs are analytic (padding "
                    "included); XLA's cost analysis is reported as is: it falls far below the "
                    "analytic count here, so it is not a usable FLOP count for this kernel"
                ),
            }
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
            "torch_threads": None if args.skip_torch else torch_threads,
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
        "matmul_peak": {
            "before": peak_before,
            "after": peak_after,
            "xla_gflops_best": round(xla_peak, 1),
            "gflops_used": peak,
        },
        "load_average_1min": {"start": load_start[0], "end": load_start[1]},
        "flops": {
            "useful_gflop_total": round(useful / 1e9, 2),
            "model_gflop_per_token": round(cfg.flops_per_token() / 1e9, 4),
        },
        "methods": results,
        "ratios": {key: round(v, 3) for key, v in ratios.items()},
        "agreement": agreement,
        "profile": profile,
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
