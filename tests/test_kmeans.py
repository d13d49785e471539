"""Kernel K-Means and the exact delta Gram matrix, against plain NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.kmeans import delta_gram, kmeans


def test_delta_gram_equals_dense_inner_products():
    rng = np.random.default_rng(0)
    n, layers, r, d_in, d_out = 5, 3, 2, 7, 4
    a = rng.normal(size=(n, layers, r, d_in)).astype(np.float32)
    b = rng.normal(size=(n, layers, d_out, r)).astype(np.float32)
    scale = rng.uniform(0.5, 2, size=n).astype(np.float32)
    dense = (scale[:, None, None, None] * b @ a).reshape(n, -1)
    np.testing.assert_allclose(delta_gram(a, b, scale), dense @ dense.T, rtol=1e-4, atol=1e-3)


def numpy_inertia(x, assign, k):
    return sum(((x[assign == j] - x[assign == j].mean(0)) ** 2).sum() for j in range(k))


def test_recovers_separated_blobs_and_inertia_matches_numpy():
    rng = np.random.default_rng(1)
    centers = rng.normal(scale=20, size=(4, 6))
    truth = np.repeat(np.arange(4), 6)
    x = (centers[truth] + rng.normal(size=(24, 6))).astype(np.float32)
    assign, inertia = kmeans(jnp.asarray(x @ x.T), jax.random.key(0), k=4)
    assign = np.asarray(assign)
    # same partition as the truth, up to label permutation
    pairs = {(int(t), int(a)) for t, a in zip(truth, assign, strict=True)}
    assert len(pairs) == 4 and len({a for _, a in pairs}) == 4
    assert float(inertia) == pytest.approx(numpy_inertia(x, assign, 4), rel=1e-3)


def test_cosine_metric_groups_by_direction_not_length():
    rng = np.random.default_rng(2)
    dirs = np.eye(3)[[0, 0, 0, 1, 1, 1, 2, 2, 2]]
    lengths = np.array([1, 10, 100] * 3)[:, None]
    x = (dirs * lengths + 0.01 * rng.normal(size=(9, 3))).astype(np.float32)
    assign, _ = kmeans(jnp.asarray(x @ x.T), jax.random.key(0), k=3, metric="cosine")
    assign = np.asarray(assign)
    assert all(len(set(assign[i : i + 3])) == 1 for i in (0, 3, 6))
    assert len(set(assign)) == 3


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 12),
    k_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    metric=st.sampled_from(["euclidean", "cosine"]),
)
def test_every_cluster_nonempty_and_seed_reproducible(n, k_frac, seed, metric):
    k = 1 + int(k_frac * (n - 1))
    rng = np.random.default_rng(seed)
    # duplicated points stress the empty-cluster repair
    x = rng.normal(size=(n, 3)).astype(np.float32)
    x[: n // 2] = x[0]
    gram = jnp.asarray(x @ x.T)
    a1, _ = kmeans(gram, jax.random.key(seed), k=k, num_restarts=3, metric=metric)
    a2, _ = kmeans(gram, jax.random.key(seed), k=k, num_restarts=3, metric=metric)
    assert set(np.asarray(a1).tolist()) == set(range(k))
    np.testing.assert_array_equal(a1, a2)
