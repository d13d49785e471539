"""Packing: several short examples to a row of fixed length (NumPy only).

Dev examples are short (tens of tokens) while a scoring row is 128 tokens or more,
so `d2c_jax.scoring` packs each candidate's examples (rows of ``example_idx [C, M]``
into an `EncodedExamples` bank) first-fit-decreasing into ``[C, R, T]`` rows.
Packing is exact: ``segments`` restricts attention to each example's own tokens and
``positions`` restart RoPE at every example (`d2c_jax.scoring.packed_nll` consumes
them), so a packed example computes what it computes alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from d2c_jax.examples import DEFAULT_BUCKET, EncodedExamples, round_up


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
