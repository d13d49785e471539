"""kernels/loss.py: streamed cross-entropy equals the full-logits computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.loss import label_positions, masked_example_nll, token_nll


def full_nll(h, head, labels):
    logits = h @ head.T
    return -jax.nn.log_softmax(logits, axis=-1)[jnp.arange(len(labels)), labels]


@pytest.mark.parametrize("chunk", [1000, 64, 37, 1])
def test_token_nll_matches_full_softmax(chunk):
    rng = np.random.default_rng(0)
    h = rng.standard_normal((20, 16)).astype(np.float32)
    head = (3 * rng.standard_normal((259, 16))).astype(np.float32)
    labels = rng.integers(0, 259, 20)
    np.testing.assert_allclose(
        token_nll(h, head, labels, chunk), full_nll(h, head, labels), rtol=1e-5, atol=1e-5
    )
    g = jax.grad(lambda h: token_nll(h, head, labels, chunk).sum())(h)
    want = jax.grad(lambda h: full_nll(h, head, labels).sum())(h)
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5)


def test_label_positions_and_compaction():
    mask = np.array([[0, 0, 1, 1, 0, 0], [0, 1, 0, 1, 1, 0]], np.float32)
    pos, valid = label_positions(mask, 3)
    np.testing.assert_array_equal(pos[0, :2], [2, 3])
    assert valid.tolist() == [[True, True, False], [True, True, True]]
    np.testing.assert_array_equal(pos[1], [1, 3, 4])

    rng = np.random.default_rng(1)
    hidden = rng.standard_normal((2, 6, 8)).astype(np.float32)
    head = rng.standard_normal((50, 8)).astype(np.float32)
    tokens = rng.integers(0, 50, (2, 6))
    full = masked_example_nll(hidden, head, tokens, mask)
    np.testing.assert_allclose(
        masked_example_nll(hidden, head, tokens, mask, max_labels=3, vocab_chunk=16),
        full,
        rtol=1e-5,
    )
    # by hand: label t predicted from position t - 1
    ref = full_nll(hidden[0, 1:3], head, tokens[0, 2:4]).mean()
    np.testing.assert_allclose(full[0], ref, rtol=1e-5)
    # an example without labels scores 0, never NaN
    assert float(masked_example_nll(hidden, head, tokens, np.zeros_like(mask))[0]) == 0.0
