"""Examples, losses, batched candidate scoring and generation on a base model.

Example contract (``docs/ARCHITECTURE.md``)
-------------------------------------------
Examples are JSONL lines ``{"prompt": str, "target": str}`` (other keys, e.g.
``"task"``, are kept and ignored here). An example's tokens are
``tokenizer(prompt, add_special_tokens=True) + tokenizer(target,
add_special_tokens=False) + [eos_id]``; with the tokenizers of `load_base` the first
part starts with a document-start token (``<|endoftext|>`` for SmolLM2, see
`d2c_jax.models`). Its loss is the mean NLL of the target tokens and the eos.
Sequences are right-padded to a length bucket (a multiple of `bucket`); padding never
changes a loss because no real token attends to a later position and padded labels
are masked.

``loss_mask[m, t] = 1`` iff token ``t`` of example ``m`` is a label (target or eos);
it is predicted from position ``t - 1``.

Functions
---------
* `read_examples(path)`: JSONL -> list of dicts, errors name the line.
* `encode_examples(tokenizer_or_base, examples)` -> `EncodedExamples`.
* `example_nll(base, adapter, scale, tokens, loss_mask)` -> ``[M]``: one adapter,
  pure, jittable, differentiable w.r.t. the adapter (the trainer's loss).
* `candidate_nll(...)`: the vmapped kernel, C candidates x their own examples.
* `score_candidates(base, candidates, bank, example_idx, ...)`: the chunked driver
  (memory bound set by the caller) -> ``[C, M]`` per-example NLL; `task_mean_nll`
  reduces it per task. By default each candidate's examples are packed several to a
  row (`pack_examples`, `packed_nll`: segment-causal attention and restarted RoPE
  positions, so the result is exact) because dev examples are short.
* `score_examples(base, adapter, encoded)`: many examples, one adapter (``d2c score``).
* `generate(base, adapter, prompts, max_new_tokens, chat_template)`: batched greedy
  decoding with a KV cache.

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

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from d2c_jax import sharding
from d2c_jax.models.llama import check_adapter, forward_hidden, logits_from_hidden, rms_norm
from kernels.loss import DEFAULT_VOCAB_CHUNK, masked_example_nll, packed_example_nll

DEFAULT_BUCKET = 16
DEFAULT_MAX_CHUNK_BYTES = 1 << 30  # 1 GiB of activations per jitted scoring call


class ExampleError(ValueError):
    """Invalid example input (malformed JSONL, empty target, too long for the context)."""


# ------------------------------------------------------------------ examples


def read_examples(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read ``{"prompt": str, "target": str}`` JSONL; blank lines are skipped.

    Each returned dict also carries ``"_line"`` (1-based line number) so later errors
    (e.g. too long for the context) can point at the file. Raises FileNotFoundError,
    or ExampleError naming ``path:line`` for malformed JSON, a line that is not an
    object, a missing or non-string prompt/target, or an empty target.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"examples file {str(path)!r} not found")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ExampleError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
            try:
                validate_example(obj)
            except ExampleError as err:
                raise ExampleError(f"{path}:{lineno}: {err}") from None
            examples.append({**obj, "_line": lineno})
    if not examples:
        raise ExampleError(f"{path}: no examples")
    return examples


def validate_example(obj: Any) -> None:
    """Raise ExampleError unless `obj` is ``{"prompt": str, "target": non-empty str}``."""
    if not isinstance(obj, Mapping):
        raise ExampleError(
            f"expected a JSON object with prompt and target, got {type(obj).__name__}"
        )
    for key in ("prompt", "target"):
        if key not in obj:
            raise ExampleError(f"missing {key!r}")
        if not isinstance(obj[key], str):
            raise ExampleError(f"{key!r} must be a string, got {type(obj[key]).__name__}")
    if not obj["target"].strip():
        raise ExampleError("empty target")


@dataclasses.dataclass(frozen=True)
class EncodedExamples:
    """Right-padded token batch (NumPy).

    Attributes:
      tokens: ``[M, T]`` int32, right-padded; T is a multiple of the bucket.
      loss_mask: ``[M, T]`` float32, 1 on label tokens (target + eos).
      lengths: ``[M]`` int32 real lengths (computed from the mask if omitted).
      task_ids: ``[M]`` int32 or None (filled by `encode_examples` from a task key).
      task_names: names of the task ids, or None.
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    lengths: np.ndarray | None = None
    task_ids: np.ndarray | None = None
    task_names: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.tokens.shape != self.loss_mask.shape:
            raise ValueError(
                f"tokens {self.tokens.shape} and loss_mask {self.loss_mask.shape} differ"
            )
        if self.lengths is None:
            m, t = self.loss_mask.shape
            last = t - 1 - np.argmax(np.asarray(self.loss_mask)[:, ::-1] > 0, axis=1)
            object.__setattr__(self, "lengths", (last + 1).astype(np.int32))

    @property
    def num_examples(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_labels(self) -> np.ndarray:
        return np.asarray(self.loss_mask).sum(axis=1).astype(np.int32)

    def __len__(self) -> int:
        return self.num_examples

    def subset(self, indices) -> EncodedExamples:
        idx = np.asarray(indices)
        return EncodedExamples(
            tokens=self.tokens[idx],
            loss_mask=self.loss_mask[idx],
            lengths=self.lengths[idx],
            task_ids=None if self.task_ids is None else self.task_ids[idx],
            task_names=self.task_names,
        )


def round_up(n: int, bucket: int) -> int:
    return max(bucket, int(math.ceil(n / bucket)) * bucket)


def _tokenizer_and_context(tokenizer_or_base, max_length):
    tokenizer = getattr(tokenizer_or_base, "tokenizer", tokenizer_or_base)
    config = getattr(tokenizer_or_base, "config", None)
    if max_length is None and config is not None:
        max_length = config.max_position_embeddings
    return tokenizer, max_length


def encode_examples(
    tokenizer_or_base,
    examples: Sequence[Mapping[str, Any]],
    *,
    max_length: int | None = None,
    bucket: int = DEFAULT_BUCKET,
    pad_to: int | None = None,
    task_key: str | None = "task",
) -> EncodedExamples:
    """Tokenize examples per the contract and right-pad them to a length bucket.

    Args:
      tokenizer_or_base: a tokenizer, or a `BaseModel` (then `max_length` defaults to
        the model's context length).
      examples: dicts with ``prompt`` and ``target`` (see `read_examples`).
      max_length: context length; longer examples raise ExampleError.
      bucket: T is rounded up to a multiple of this (fewer recompiles).
      pad_to: pad to exactly this T instead (must fit every example).
      task_key: if every example has this key, ``task_ids`` / ``task_names`` are set
        (ids in order of first appearance).
    """
    tokenizer, max_length = _tokenizer_and_context(tokenizer_or_base, max_length)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token")
    if not examples:
        raise ExampleError("no examples to encode")

    def where(i):
        line = examples[i].get("_line") if isinstance(examples[i], Mapping) else None
        return f"example {i}" + (f" (line {line})" if line is not None else "")

    for i, ex in enumerate(examples):
        try:
            validate_example(ex)
        except ExampleError as err:
            raise ExampleError(f"{where(i)}: {err}") from None
    prompts = tokenizer([ex["prompt"] for ex in examples], add_special_tokens=True)["input_ids"]
    targets = tokenizer([ex["target"] for ex in examples], add_special_tokens=False)["input_ids"]
    seqs, masks = [], []
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        if not p:
            raise ExampleError(
                f"{where(i)}: empty prompt and the tokenizer adds no start token, so the first "
                "target token would have no context"
            )
        if not t:
            raise ExampleError(f"{where(i)}: empty target")
        seq = list(p) + list(t) + [eos]
        if max_length is not None and len(seq) > max_length:
            raise ExampleError(
                f"{where(i)}: {len(seq)} tokens (prompt {len(p)}, target {len(t)}, eos 1) are "
                f"longer than the model's context of {max_length} tokens"
            )
        seqs.append(seq)
        masks.append([0] * len(p) + [1] * (len(t) + 1))
    longest = max(map(len, seqs))
    t_len = round_up(longest, bucket) if pad_to is None else pad_to
    if t_len < longest:
        raise ExampleError(
            f"pad_to={pad_to} is shorter than the longest example ({longest} tokens)"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    tokens = np.full((len(seqs), t_len), pad, np.int32)
    loss_mask = np.zeros((len(seqs), t_len), np.float32)
    for i, (seq, mask) in enumerate(zip(seqs, masks, strict=True)):
        tokens[i, : len(seq)] = seq
        loss_mask[i, : len(mask)] = mask
    task_ids = task_names = None
    if task_key and all(task_key in ex for ex in examples):
        names: dict[str, int] = {}
        task_ids = np.asarray(
            [names.setdefault(str(ex[task_key]), len(names)) for ex in examples], np.int32
        )
        task_names = tuple(names)
    return EncodedExamples(
        tokens=tokens,
        loss_mask=loss_mask,
        lengths=np.asarray([len(s) for s in seqs], np.int32),
        task_ids=task_ids,
        task_names=task_names,
    )


# ------------------------------------------------------------------ losses


def _final_norm(model):
    """The model's final RMSNorm as a function of hidden states (applied by the loss)."""
    return lambda h: rms_norm(h, model.final_norm[...], model.config.rms_norm_eps)


def example_nll(
    base,
    adapter: Mapping[str, Mapping[str, jax.Array]] | None,
    scale: jax.Array | float,
    tokens: jax.Array,
    loss_mask: jax.Array,
    *,
    max_labels: int | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
) -> jax.Array:
    """Mean label NLL per example ``[M]`` (float32) under base + one adapter.

    Args:
      base: `BaseModel` or `LlamaForCausalLM`.
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
        final_norm=_final_norm(model),
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
) -> jax.Array:
    """The vmapped scoring kernel: ``[C, M]`` per-example NLL.

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
        base, ad, s, t, m, max_labels=max_labels, vocab_chunk=vocab_chunk
    )
    return jax.vmap(fn)(candidates, scale, tokens, loss_mask)


@functools.partial(jax.jit, static_argnames=("max_labels", "vocab_chunk"))
def _candidate_nll_jit(base, candidates, scale, tokens, loss_mask, *, max_labels, vocab_chunk):
    return candidate_nll(
        base, candidates, scale, tokens, loss_mask, max_labels=max_labels, vocab_chunk=vocab_chunk
    )


# ------------------------------------------------------------------ packing


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """Examples packed several to a row (NumPy, leading axes ``[..., R, T]``).

    ``segments`` numbers the examples within a row from 1 (0 = padding); attention is
    causal within a segment only and RoPE ``positions`` restart at each segment, so a
    packed example computes exactly what it computes alone. ``slots`` maps each token
    to its example's column in the ``[..., M]`` result.
    """

    tokens: np.ndarray
    segments: np.ndarray
    positions: np.ndarray
    loss_mask: np.ndarray
    slots: np.ndarray
    num_examples: int
    max_labels: int
    real_tokens: int


def pack_rows(lengths: Sequence[int], row_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """First-fit-decreasing bin packing: ``(row, start, num_rows)`` of each sequence."""
    lengths = np.asarray(lengths, np.int64)
    if lengths.size and lengths.max() > row_len:
        raise ValueError(f"a sequence of {lengths.max()} tokens does not fit rows of {row_len}")
    row = np.zeros(len(lengths), np.int64)
    start = np.zeros(len(lengths), np.int64)
    free: list[int] = []
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        r = next((r for r, cap in enumerate(free) if cap >= n), len(free))
        if r == len(free):
            free.append(row_len)
        row[i], start[i] = r, row_len - free[r]
        free[r] -= n
    return row, start, len(free)


def pack_examples(
    bank: EncodedExamples,
    example_idx: np.ndarray,
    example_valid: np.ndarray,
    row_len: int,
    bucket: int = DEFAULT_BUCKET,
) -> PackedBatch:
    """Pack each candidate's valid examples (rows of ``example_idx [C, M]``) into rows
    of `row_len` tokens; every candidate gets the same (largest) row count R."""
    c, m = example_idx.shape
    plans = []
    for k in range(c):
        cols = np.flatnonzero(example_valid[k])
        lengths = bank.lengths[example_idx[k, cols]]
        plans.append((cols, *pack_rows(lengths, row_len)))
    n_rows = max(1, max(p[3] for p in plans))
    shape = (c, n_rows, row_len)
    pad = int(bank.tokens[0, -1])
    tokens = np.full(shape, pad, np.int32)
    segments = np.zeros(shape, np.int32)
    positions = np.zeros(shape, np.int32)
    loss_mask = np.zeros(shape, np.float32)
    slots = np.full(shape, m, np.int32)
    seg_count = np.zeros((c, n_rows), np.int32)
    labels_per_row = np.zeros((c, n_rows), np.int64)
    for k, (cols, rows, starts, _) in enumerate(plans):
        for col, r, s0 in zip(cols, rows, starts, strict=True):
            e = example_idx[k, col]
            n = int(bank.lengths[e])
            seg_count[k, r] += 1
            tokens[k, r, s0 : s0 + n] = bank.tokens[e, :n]
            segments[k, r, s0 : s0 + n] = seg_count[k, r]
            positions[k, r, s0 : s0 + n] = np.arange(n)
            loss_mask[k, r, s0 : s0 + n] = bank.loss_mask[e, :n]
            slots[k, r, s0 : s0 + n] = col
            labels_per_row[k, r] += int(bank.loss_mask[e, :n].sum())
    max_labels = min(round_up(int(labels_per_row.max()), bucket), row_len - 1)
    real = int(bank.lengths[example_idx][example_valid].sum())
    return PackedBatch(tokens, segments, positions, loss_mask, slots, m, max_labels, real)


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
) -> jax.Array:
    """`example_nll` for packed rows ``[R, T]`` (see `PackedBatch`) -> ``[num_examples]``."""
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
        final_norm=_final_norm(model),
    )


@functools.partial(jax.jit, static_argnames=("num_examples", "max_labels", "vocab_chunk"))
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
):
    fn = lambda ad, s, *rows: packed_nll(
        base,
        ad,
        s,
        *rows,
        num_examples=num_examples,
        max_labels=max_labels,
        vocab_chunk=vocab_chunk,
    )
    return jax.vmap(fn)(candidates, scale, tokens, segments, positions, loss_mask, slots)


def _leading(tree) -> int:
    return int(jax.tree.leaves(tree)[0].shape[0])


def is_dense(candidates: Mapping[str, Mapping[str, Any]]) -> bool:
    return all("delta" in v for v in candidates.values())


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
    return total // max(1, _leading(candidates)) if per_candidate else total


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

    Returns:
      ``[C, M]`` float32 NumPy per-example NLL (NaN where invalid), and stats if asked.
    """
    check_adapter(base.config, candidates)
    dense = is_dense(candidates)
    n_cand = _leading(candidates)
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

    out = np.empty((n_cand, m), np.float32)
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
            )
        else:
            nll = _candidate_nll_jit(
                base,
                chunk,
                chunk_scale,
                *chunk_rows,
                max_labels=max_labels,
                vocab_chunk=vocab_chunk,
            )
        out[lo:hi] = sharding.fetch(nll)[: hi - lo]
    out[~example_valid] = np.nan
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


# ------------------------------------------------------------------ adapters


def as_single_adapter(adapter, scale=None):
    """Normalise an adapter argument to ``(params or None, scale)``.

    Accepts None; a factor dict ``{module: {"A": [L, r, d_in], "B": [L, d_out, r]}}``
    with `scale` (required); a dense dict ``{module: {"delta": [L, d_out, d_in]}}``; a
    ``(params, scale)`` tuple; or an object with ``params`` (leading axis of 1, e.g. an
    `AdapterLibrary` of one adapter) and ``scale``.
    """
    if adapter is None:
        return None, 1.0
    if isinstance(adapter, tuple) and len(adapter) == 2:
        adapter, scale = adapter
    if hasattr(adapter, "params") and hasattr(adapter, "scale"):
        n = _leading(adapter.params)
        if n != 1:
            raise ValueError(f"expected a single adapter, got a library of {n}")
        return jax.tree.map(lambda x: x[0], adapter.params), float(np.asarray(adapter.scale)[0])
    if is_dense(adapter):
        return adapter, 1.0
    if scale is None:
        raise ValueError("a factor-form adapter needs its scale (alpha / r)")
    return adapter, scale


def check_adapter_for_base(base, library) -> None:
    """Raise ValueError if an adapter library was made for another base model.

    Shapes (layers, d_in, d_out of every module) must match; and if the library records
    a ``base_model`` it must name the same model as ``base.name`` or ``base.source``
    (compared by the last path component, case-insensitive, so a local copy of the same
    repo matches).
    """
    recorded = getattr(library, "base_model", None)
    if recorded and base.name:
        norm = lambda s: Path(str(s).rstrip("/")).name.lower().removesuffix(".gguf")
        if norm(recorded) not in {norm(base.name), norm(base.source)}:
            raise ValueError(
                f"the adapter was trained for base model {recorded!r}, but the base model is "
                f"{base.name!r} ({base.source})"
            )
    try:
        check_adapter(base.config, library.params)
    except ValueError as err:
        raise ValueError(f"the adapter does not fit base model {base.name!r}: {err}") from None


# ------------------------------------------------------------------ generation


def _stop_ids(tokenizer) -> tuple[int, ...]:
    ids = {int(tokenizer.eos_token_id)}
    end = tokenizer.get_vocab().get("<|endoftext|>")
    if end is not None:
        ids.add(int(end))
    return tuple(sorted(ids))


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "stop_ids"))
def _generate_tokens(base, adapter, scale, tokens, valid, *, max_new_tokens, stop_ids):
    """Greedy decoding of left-padded prompts ``tokens [B, P]`` (``valid`` marks real
    tokens) with a KV cache; returns ``[B, max_new_tokens]`` (stop id repeated after a
    stop)."""
    model = getattr(base, "model", base)
    c = model.config
    b, p = tokens.shape
    s = p + max_new_tokens
    dtype = model.embed[...].dtype
    cache_shape = (c.num_layers, b, s, c.num_kv_heads, c.head_dim)
    cache = (jnp.zeros(cache_shape, dtype), jnp.zeros(cache_shape, dtype))
    key_valid = jnp.concatenate([valid, jnp.ones((b, max_new_tokens), bool)], axis=1)
    slots = jnp.arange(s)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    mask = key_valid[:, None, :] & (slots[None, None, :] <= jnp.arange(p)[None, :, None])
    hidden, cache = forward_hidden(
        model,
        tokens,
        adapter=adapter,
        scale=scale,
        positions=positions,
        mask=mask,
        cache=cache,
        cache_index=0,
    )
    first = jnp.argmax(logits_from_hidden(model, hidden[:, -1]), axis=-1).astype(jnp.int32)
    n_valid = valid.sum(axis=1).astype(jnp.int32)
    stops = jnp.asarray(stop_ids, jnp.int32)
    out = jnp.full((b, max_new_tokens), stop_ids[0], jnp.int32)

    def cond(state):
        step, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, nxt, done, out = state
        out = out.at[:, step].set(jnp.where(done, stop_ids[0], nxt))
        done = done | jnp.isin(nxt, stops)
        slot = p + step
        step_mask = key_valid[:, None, :] & (slots <= slot)[None, None, :]
        h, cache = forward_hidden(
            model,
            nxt[:, None],
            adapter=adapter,
            scale=scale,
            positions=(n_valid + step)[:, None],
            mask=step_mask,
            cache=cache,
            cache_index=slot,
        )
        nxt = jnp.argmax(logits_from_hidden(model, h[:, 0]), axis=-1).astype(jnp.int32)
        return step + 1, cache, nxt, done, out

    state = (jnp.asarray(0, jnp.int32), cache, first, jnp.zeros((b,), bool), out)
    *_, out = jax.lax.while_loop(cond, body, state)
    return out


def generate(
    base,
    adapter,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    chat_template: bool = True,
    *,
    scale: float | None = None,
    batch_size: int = 16,
    bucket: int = DEFAULT_BUCKET,
) -> list[str]:
    """Batched greedy generation with a KV cache; stops at eos (or ``<|endoftext|>``).

    Args:
      base: `BaseModel`.
      adapter: None, or an adapter as accepted by `as_single_adapter` (factor form
        needs `scale`).
      prompts: user messages (``chat_template=True``: wrapped as one user turn with
        the tokenizer's chat template and tokenized without special tokens) or raw
        text (``chat_template=False``: tokenized with ``add_special_tokens=True``).
      max_new_tokens: generation length limit.
      batch_size: prompts per jitted call (prompts are left-padded to a bucket).

    Returns the decoded continuations (special tokens skipped; not stripped).
    """
    params, scale = as_single_adapter(adapter, scale)
    if params is not None:
        check_adapter(base.config, params)
    tok = base.tokenizer
    if chat_template:
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
        ids = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    else:
        ids = tok(list(prompts), add_special_tokens=True)["input_ids"] if prompts else []
    stop_ids = _stop_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]
    results: list[str] = []
    for lo in range(0, len(ids), batch_size):
        group = ids[lo : lo + batch_size]
        longest = max(len(x) for x in group)
        if longest + max_new_tokens > base.config.max_position_embeddings:
            raise ValueError(
                f"prompt of {longest} tokens + {max_new_tokens} new tokens exceed the context "
                f"of {base.config.max_position_embeddings}"
            )
        p_len = round_up(longest, bucket)
        rows = len(group)
        b = batch_size if len(ids) > batch_size else rows  # fixed batch shape across groups
        tokens = np.full((b, p_len), pad, np.int32)
        valid = np.zeros((b, p_len), bool)
        for i in range(b):
            x = group[min(i, rows - 1)]
            tokens[i, p_len - len(x) :] = x
            valid[i, p_len - len(x) :] = True
        out = np.asarray(
            _generate_tokens(
                base,
                params,
                jnp.asarray(scale, jnp.float32),
                tokens,
                valid,
                max_new_tokens=max_new_tokens,
                stop_ids=stop_ids,
            )
        )
        for row in out[:rows]:
            row = list(row)
            cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
            results.append(tok.decode(row[:cut], skip_special_tokens=True))
    return results
