"""`d2c_jax.packing`: first-fit-decreasing rows, segments, positions and slots."""

from __future__ import annotations

import numpy as np
import pytest

from d2c_jax.examples import EncodedExamples
from d2c_jax.packing import pack_examples, pack_rows


def test_pack_rows_first_fit_decreasing():
    lengths = [30, 10, 20, 25, 5, 40]
    row, start, n = pack_rows(lengths, 48)
    assert n == 3
    for r in range(n):  # no overlap, nothing past the row end
        spans = sorted((start[i], start[i] + lengths[i]) for i in range(6) if row[i] == r)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
        assert spans[-1][1] <= 48
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([49], 48)


def test_pack_examples_layout():
    # three examples of lengths 4, 3, 5 (pad id 9); labels are the last two tokens of each
    lengths = np.array([4, 3, 5])
    tokens = np.full((3, 8), 9, np.int32)
    mask = np.zeros((3, 8), np.float32)
    for e, n in enumerate(lengths):
        tokens[e, :n] = 10 * (e + 1) + np.arange(n)
        mask[e, n - 2 : n] = 1
    bank = EncodedExamples(tokens=tokens, loss_mask=mask)
    idx = np.array([[0, 1, 2], [2, 2, 0]])
    valid = np.array([[True, True, True], [True, False, False]])
    packed = pack_examples(bank, idx, valid, row_len=8, bucket=4)
    assert packed.tokens.shape == (2, 2, 8) and packed.num_examples == 3
    assert packed.real_tokens == 4 + 3 + 5 + 5
    for c in range(2):
        for col in np.flatnonzero(valid[c]):
            e = idx[c, col]
            where = packed.slots[c] == col
            assert where.sum() == lengths[e]  # every token of the example, nowhere else
            r = np.flatnonzero(where.any(axis=1))
            assert len(r) == 1  # one row
            np.testing.assert_array_equal(packed.tokens[c][where], tokens[e, : lengths[e]])
            np.testing.assert_array_equal(packed.positions[c][where], np.arange(lengths[e]))
            np.testing.assert_array_equal(packed.loss_mask[c][where], mask[e, : lengths[e]])
            assert len(np.unique(packed.segments[c][where])) == 1
    # padding: segment 0, slot M, no labels; candidate 1 has only one example
    pad = packed.segments == 0
    assert (packed.slots[pad] == 3).all() and not packed.loss_mask[pad].any()
    assert (packed.segments[1, 1] == 0).all()
    # at most 2 + 2 labels per row, rounded up to the bucket, below the row length
    assert packed.max_labels == 4
    with pytest.raises(ValueError, match="does not fit"):
        pack_examples(bank, idx, valid, row_len=4)
