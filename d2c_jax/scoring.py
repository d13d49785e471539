"""Candidate scoring: per-example NLL of encoded examples under base + adapter(s).

The loss contract is in `d2c_jax.examples` (mean NLL of target tokens and eos). This
module computes it: for one adapter (`example_nll`, pure and differentiable, the
trainer's loss; `score_examples` for many examples, ``d2c score``) and for many
candidate adapters at once (`candidate_nll`, the vmapped kernel; `score_candidates`,
its chunked, sharded driver used by the D2C objective).

Shapes: one adapter ``{module: {"A": [L, r, d_in], "B": [L, d_out, r]}}`` or
``{module: {"delta": [L, d_out, d_in]}}``; candidates add a leading ``C``;
``tokens, loss_mask [M, T]`` (``[C, M, T]`` per candidate); results ``[M]`` or
``[C, M]`` float32. By default each candidate's examples are packed several to a row
(`d2c_jax.packing`; `packed_nll` runs them with segment-causal attention and
restarted RoPE positions, so the result is exact) because dev examples are short.
`task_mean_nll` reduces ``[C, M]`` to ``[C, num_tasks]``.

Training step with the base frozen::

    def loss_fn(lora, tokens, loss_mask):
        return example_nll(base, lora, scale, tokens, loss_mask).mean()

    @jax.jit
    def step(lora, opt_state, tokens, loss_mask):
        loss, grads = jax.value_and_grad(loss_fn)(lora, tokens, loss_mask)
        ...

``base`` is a pytree (its weights are leaves), so closing over it or passing it as a
jit argument both work; only the adapter is differentiated.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from d2c_jax import sharding
from d2c_jax.adapters import as_single_adapter, is_dense, num_stacked
from d2c_jax.examples import DEFAULT_BUCKET, EncodedExamples, round_up
from d2c_jax.models.decoder import check_adapter, forward_hidden
from d2c_jax.packing import pack_examples
from kernels.loss import (
    DEFAULT_VOCAB_CHUNK,
    ExampleScores,
    masked_example_nll,
    packed_example_nll,
)

DEFAULT_MAX_CHUNK_BYTES = 1 << 30  # 1 GiB of activations per jitted scoring call


def example_nll(
    base,
    adapter: Mapping[str, Mapping[str, jax.Array]] | None,
    scale: jax.Array | float,
    tokens: jax.Array,
    loss_mask: jax.Array,
    *,
    max_labels: int | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    correctness: bool = False,
) -> jax.Array | ExampleScores:
    """Mean label NLL per example ``[M]`` (float32) under base + one adapter (with
    `correctness`: `kernels.loss.ExampleScores` of ``[M]`` arrays from the same pass).

    Args:
      base: `BaseModel` or `Decoder`.
      adapter: ``{module: {"A": [L, r, d_in], "B": [L, d_out, r]}}`` (PEFT names),
        ``{module: {"delta": [L, d_out, d_in]}}`` (scale folded in), or None.
      scale: LoRA scale (alpha / r); ignored for dense deltas.
      tokens, loss_mask: ``[M, T]`` (see the module docstring).
      max_labels: static; if set, only the first `max_labels` labels of each example
        go through the LM head (cheaper; must be >= the largest label count).
      vocab_chunk: vocabulary chunk of the streamed logsumexp (memory ~ M*T*chunk).

    Pure and jittable; differentiable w.r.t. `adapter`.
    """
    model = getattr(base, "model", base)
    hidden, _ = forward_hidden(model, tokens, adapter=adapter, scale=scale, final_norm=False)
    return masked_example_nll(
        hidden,
        model.head(),
        tokens,
        loss_mask,
        max_labels=max_labels,
        vocab_chunk=vocab_chunk,
        final_norm=model.norm_hidden,
        softcap=model.config.final_softcap,
        correctness=correctness,
    )


def candidate_nll(
    base,
    candidates: Mapping[str, Mapping[str, jax.Array]],
    scale: jax.Array | None,
    tokens: jax.Array,
    loss_mask: jax.Array,
    *,
    max_labels: int | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    correctness: bool = False,
) -> jax.Array | ExampleScores:
    """The vmapped scoring kernel: ``[C, M]`` per-example NLL (or `ExampleScores` of
    ``[C, M]`` arrays with `correctness`).

    `candidates` leaves have a leading candidate axis (``A [C, L, r, d_in]``,
    ``B [C, L, d_out, r]`` with ``scale [C]``, or ``delta [C, L, d_out, d_in]`` with
    ``scale=None``); ``tokens, loss_mask [C, M, T]`` are each candidate's own examples.
    The base weights are shared (one GEMM over all candidates' tokens), LoRA is applied
    as ``x A^T B^T`` (or ``x delta^T``), and logits never exist beyond one vocabulary
    chunk. Jittable; call it inside ``jax.jit`` with `max_labels`/`vocab_chunk` static.
    """
    c = tokens.shape[0]
    if scale is None:
        scale = jnp.ones((c,), jnp.float32)
    fn = lambda ad, s, t, m: example_nll(
        base,
        ad,
        s,
        t,
        m,
        max_labels=max_labels,
        vocab_chunk=vocab_chunk,
        correctness=correctness,
    )
    return jax.vmap(fn)(candidates, scale, tokens, loss_mask)


@functools.partial(jax.jit, static_argnames=("max_labels", "vocab_chunk", "correctness"))
def _candidate_nll_jit(
    base, candidates, scale, tokens, loss_mask, *, max_labels, vocab_chunk, correctness=False
):
    return candidate_nll(
        base,
        candidates,
        scale,
        tokens,
        loss_mask,
        max_labels=max_labels,
        vocab_chunk=vocab_chunk,
        correctness=correctness,
    )


def packed_nll(
    base,
    adapter,
    scale,
    tokens: jax.Array,
    segments: jax.Array,
    positions: jax.Array,
    loss_mask: jax.Array,
    slots: jax.Array,
    *,
    num_examples: int,
    max_labels: int | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    correctness: bool = False,
) -> jax.Array | ExampleScores:
    """`example_nll` for packed rows ``[R, T]`` (see `PackedBatch`) -> ``[num_examples]``
    (`ExampleScores` of ``[num_examples]`` arrays with `correctness`)."""
    model = getattr(base, "model", base)
    t = tokens.shape[-1]
    mask = (segments[:, :, None] == segments[:, None, :]) & jnp.tril(jnp.ones((t, t), bool))
    hidden, _ = forward_hidden(
        model,
        tokens,
        adapter=adapter,
        scale=scale,
        positions=positions,
        mask=mask,
        final_norm=False,
    )
    return packed_example_nll(
        hidden,
        model.head(),
        tokens,
        loss_mask,
        slots,
        num_examples,
        max_labels=max_labels,
        vocab_chunk=vocab_chunk,
        final_norm=model.norm_hidden,
        softcap=model.config.final_softcap,
        correctness=correctness,
    )


@functools.partial(
    jax.jit, static_argnames=("num_examples", "max_labels", "vocab_chunk", "correctness")
)
def _packed_candidate_nll_jit(
    base,
    candidates,
    scale,
    tokens,
    segments,
    positions,
    loss_mask,
    slots,
    *,
    num_examples,
    max_labels,
    vocab_chunk,
    correctness=False,
):
    fn = lambda ad, s, *rows: packed_nll(
        base,
        ad,
        s,
        *rows,
        num_examples=num_examples,
        max_labels=max_labels,
        vocab_chunk=vocab_chunk,
        correctness=correctness,
    )
    return jax.vmap(fn)(candidates, scale, tokens, segments, positions, loss_mask, slots)


def activation_bytes_per_candidate(
    config,
    num_examples: int,
    seq_len: int,
    num_labels: int,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    itemsize: int = 4,
) -> int:
    """Rough peak activation bytes of scoring one candidate on ``M x T`` tokens
    (``num_labels`` labels per row go through the head).

    Counts the live per-layer buffers (residual, q/k/v/attention output, MLP
    intermediates, attention scores and probabilities) and one logits chunk with its
    exponentials; used to size candidate chunks under a memory bound.
    """
    c = config
    tokens = num_examples * seq_len
    per_token = (
        6 * c.hidden_size
        + 2 * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        + 3 * c.intermediate_size
        + 2 * c.num_heads * seq_len
    )
    head = num_examples * num_labels * (2 * min(vocab_chunk, c.vocab_size) + c.hidden_size)
    return int(itemsize * (tokens * per_token + head))


def candidate_param_bytes(candidates, per_candidate: bool = True) -> int:
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(candidates))
    return total // max(1, num_stacked(candidates)) if per_candidate else total


def score_candidates(
    base,
    candidates: Mapping[str, Mapping[str, jax.Array]],
    bank: EncodedExamples,
    example_idx: np.ndarray,
    example_valid: np.ndarray | None = None,
    *,
    scale: jax.Array | np.ndarray | None = None,
    chunk_size: int | None = None,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    pack: bool = True,
    pack_len: int | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    bucket: int = DEFAULT_BUCKET,
    mesh: jax.sharding.Mesh | None = None,
    return_stats: bool = False,
    correctness: bool = False,
):
    """Score C candidate adapters, each on its own examples from an encoded bank.

    Args:
      base: `BaseModel`.
      candidates: factor stack ``{module: {"A": [C, L, r, d_in], "B": [C, L, d_out, r]}}``
        (pass `scale` ``[C]``) or dense deltas ``{module: {"delta": [C, L, d_out, d_in]}}``
        (scale folded in, ``scale=None``).
      bank: all examples, encoded once (`encode_examples`).
      example_idx: ``[C, M]`` int indices into the bank (pad rows with any valid index).
      example_valid: ``[C, M]`` bool; invalid entries are not computed (packed) or
        computed on padding (unpacked) and are returned as NaN. Default: all valid.
      chunk_size: candidates per jitted call; default: the largest count whose
        activations (`activation_bytes_per_candidate`) plus candidate parameters fit in
        `max_chunk_bytes`. The last chunk is padded (repeating a candidate) so every
        call has the same shape.
      pack: pack each candidate's examples several to a row (`pack_examples`; exact:
        segment-causal attention, restarted positions) instead of one example per
        row padded to the longest; short examples then waste little compute on padding.
      pack_len: row length when packing (default: 128, or the longest example rounded
        up to `bucket` if longer).
      mesh: devices to split the candidate axis over (`d2c_jax.sharding`; default: all
        visible devices). Each chunk is padded to a multiple of the device count; the
        base is replicated (place it once with ``sharding.put(base, mesh, BASE)`` to
        avoid a copy per call).
      return_stats: also return a dict (chunks, chunk size, shapes, real vs computed
        token counts).
      correctness: return `kernels.loss.ExampleScores` (NLL, teacher-forced exact match,
        token accuracy, smallest margin, soft accuracy) of ``[C, M]`` arrays from the
        same forward pass instead of the NLL alone.

    Returns:
      ``[C, M]`` float32 NumPy per-example NLL (NaN where invalid), or with
      `correctness` an `ExampleScores` of such arrays; and stats if asked.
    """
    check_adapter(base.config, candidates)
    dense = is_dense(candidates)
    n_cand = num_stacked(candidates)
    example_idx = np.asarray(example_idx, np.int64)
    if example_idx.ndim != 2 or example_idx.shape[0] != n_cand:
        raise ValueError(f"example_idx must be [C={n_cand}, M], got {example_idx.shape}")
    if example_valid is None:
        example_valid = np.ones(example_idx.shape, bool)
    example_valid = np.asarray(example_valid, bool)
    if example_valid.shape != example_idx.shape:
        raise ValueError(f"example_valid {example_valid.shape} != example_idx {example_idx.shape}")
    if example_idx.size and (example_idx.min() < 0 or example_idx.max() >= bank.num_examples):
        raise ValueError(f"example_idx out of range for a bank of {bank.num_examples} examples")
    if dense:
        scale_arr = None
    else:
        if scale is None:
            raise ValueError("factor-form candidates need scale [C]")
        scale_arr = jnp.asarray(scale, jnp.float32).reshape(n_cand)

    m = example_idx.shape[1]
    longest = round_up(int(np.where(example_valid, bank.lengths[example_idx], 1).max()), bucket)
    if pack:
        row_len = pack_len or max(128, longest)
        packed = pack_examples(bank, example_idx, example_valid, row_len, bucket)
        rows, seq_len, max_labels = packed.tokens.shape[1], row_len, packed.max_labels
        arrays = (packed.tokens, packed.segments, packed.positions, packed.loss_mask, packed.slots)
    else:
        seq_len = min(longest, bank.tokens.shape[1])
        labels = bank.num_labels[example_idx]
        max_labels = round_up(int(np.where(example_valid, labels, 1).max()), bucket)
        max_labels = min(max_labels, seq_len - 1)
        rows = m
        arrays = (bank.tokens[:, :seq_len][example_idx], bank.loss_mask[:, :seq_len][example_idx])
    if chunk_size is None:
        per = activation_bytes_per_candidate(
            base.config, rows, seq_len, max_labels, vocab_chunk, base.dtype.itemsize
        )
        per += candidate_param_bytes(candidates)
        chunk_size = max(1, min(n_cand, max_chunk_bytes // max(per, 1)))
    mesh = sharding.make_mesh() if mesh is None else mesh
    chunk_size = sharding.round_to_devices(int(min(chunk_size, n_cand)), mesh)
    base = sharding.put(base, mesh, sharding.BASE)

    fields = ExampleScores._fields if correctness else ("nll",)
    out = {f: np.empty((n_cand, m), np.float32) for f in fields}
    n_chunks = math.ceil(n_cand / chunk_size)
    for k in range(n_chunks):
        lo, hi = k * chunk_size, min((k + 1) * chunk_size, n_cand)
        sel_np = np.arange(lo, lo + chunk_size).clip(max=hi - 1)  # pad by repeating the last
        sel = jnp.asarray(sel_np)
        if lo == 0 and chunk_size == n_cand:
            chunk, chunk_scale = candidates, scale_arr
        else:
            chunk = jax.tree.map(lambda x, sel=sel: jnp.take(x, sel, axis=0), candidates)
            chunk_scale = None if scale_arr is None else scale_arr[sel]
        if chunk_scale is None:
            chunk_scale = jnp.ones((chunk_size,), jnp.float32)
        chunk, chunk_scale, chunk_rows = sharding.put(
            (chunk, chunk_scale, tuple(a[sel_np] for a in arrays)), mesh, sharding.CANDIDATES
        )
        if pack:
            nll = _packed_candidate_nll_jit(
                base,
                chunk,
                chunk_scale,
                *chunk_rows,
                num_examples=m,
                max_labels=max_labels,
                vocab_chunk=vocab_chunk,
                correctness=correctness,
            )
        else:
            nll = _candidate_nll_jit(
                base,
                chunk,
                chunk_scale,
                *chunk_rows,
                max_labels=max_labels,
                vocab_chunk=vocab_chunk,
                correctness=correctness,
            )
        for f, x in zip(fields, nll if correctness else (nll,), strict=True):
            out[f][lo:hi] = sharding.fetch(x)[: hi - lo]
    for x in out.values():
        x[~example_valid] = np.nan
    out = ExampleScores(**out) if correctness else out["nll"]
    if return_stats:
        real = int(bank.lengths[example_idx][example_valid].sum())
        stats = {
            "chunks": n_chunks,
            "chunk_size": chunk_size,
            "devices": sharding.num_devices(mesh),
            "packed": pack,
            "rows_per_candidate": rows,
            "seq_len": seq_len,
            "max_labels": max_labels,
            "examples_per_candidate": m,
            "real_tokens": real,
            "computed_tokens": n_cand * rows * seq_len,
            "computed_label_positions": n_cand * rows * max_labels,
        }
        return out, stats
    return out


@functools.partial(jax.jit, static_argnames=("max_labels", "vocab_chunk"))
def _example_nll_jit(base, adapter, scale, tokens, loss_mask, *, max_labels, vocab_chunk):
    return example_nll(
        base, adapter, scale, tokens, loss_mask, max_labels=max_labels, vocab_chunk=vocab_chunk
    )


def score_examples(
    base,
    adapter,
    encoded: EncodedExamples,
    *,
    scale: float | None = None,
    batch_size: int = 16,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    bucket: int = DEFAULT_BUCKET,
) -> np.ndarray:
    """Per-example NLL ``[M]`` of many examples under base + one adapter (or None).

    Examples are sorted by length and scored `batch_size` at a time (each batch trimmed
    to its own length bucket; the last batch is padded by repetition so shapes repeat).
    """
    params, scale = as_single_adapter(adapter, scale)
    if params is not None:
        check_adapter(base.config, params)
    m = encoded.num_examples
    order = np.argsort(encoded.lengths, kind="stable")
    labels = encoded.num_labels
    out = np.empty(m, np.float32)
    scale = jnp.asarray(scale, jnp.float32)
    for lo in range(0, m, batch_size):
        rows = order[lo : lo + batch_size]
        take = np.resize(rows, min(batch_size, m))  # pad by repetition
        t_len = min(round_up(int(encoded.lengths[rows].max()), bucket), encoded.tokens.shape[1])
        max_labels = min(round_up(int(labels[rows].max()), bucket), t_len - 1)
        nll = _example_nll_jit(
            base,
            params,
            scale,
            encoded.tokens[take, :t_len],
            encoded.loss_mask[take, :t_len],
            max_labels=max_labels,
            vocab_chunk=vocab_chunk,
        )
        out[rows] = np.asarray(nll)[: len(rows)]
    return out


def task_mean_nll(
    nll: np.ndarray, task_ids: np.ndarray, num_tasks: int | None = None
) -> np.ndarray:
    """Per-candidate, per-task mean of ``nll [C, M]`` (NaN entries ignored).

    ``task_ids [C, M]`` (e.g. ``bank.task_ids[example_idx]``) or ``[M]``; returns
    ``[C, num_tasks]`` with NaN for tasks a candidate has no examples of.
    """
    nll = np.asarray(nll, np.float64)
    task_ids = np.broadcast_to(np.asarray(task_ids), nll.shape)
    if num_tasks is None:
        num_tasks = int(task_ids.max()) + 1
    valid = ~np.isnan(nll)
    onehot = (task_ids[..., None] == np.arange(num_tasks)) & valid[..., None]
    sums = np.einsum("cmk,cm->ck", onehot, np.where(valid, nll, 0.0))
    counts = onehot.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)
