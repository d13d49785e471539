"""kernels.lowrank: factors <-> dense delta, truncated SVD with a symmetric split."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.lowrank import delta_to_factors, factors_to_delta


def test_factors_to_delta_matches_numpy_with_per_adapter_scale():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 2, 4, 7)).astype(np.float32)
    b = rng.standard_normal((3, 2, 5, 4)).astype(np.float32)
    scale = np.array([0.5, 2.0, -1.0], np.float32)
    out = factors_to_delta(jnp.asarray(a), jnp.asarray(b), jnp.asarray(scale))
    expected = scale[:, None, None, None] * (b @ a)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(factors_to_delta(a[0, 0], b[0, 0]), b[0, 0] @ a[0, 0], rtol=1e-5)


def test_rank_r_delta_round_trips_and_split_is_symmetric():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 3, 9)).astype(np.float32)
    b = rng.standard_normal((2, 6, 3)).astype(np.float32)
    delta = b @ a
    a2, b2 = delta_to_factors(jnp.asarray(delta), 3)
    assert a2.shape == (2, 3, 9) and b2.shape == (2, 6, 3)
    np.testing.assert_allclose(b2 @ a2, delta, rtol=1e-4, atol=1e-4)
    # sqrt(S) on both sides: row norms of A equal column norms of B
    np.testing.assert_allclose(
        jnp.linalg.norm(a2, axis=-1), jnp.linalg.norm(b2, axis=-2), rtol=1e-4
    )


def test_truncation_is_the_best_rank_r_approximation():
    rng = np.random.default_rng(2)
    delta = rng.standard_normal((4, 12, 10)).astype(np.float32)
    a, b = jax.jit(delta_to_factors, static_argnums=1)(jnp.asarray(delta), 2)
    u, s, vh = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    best = (u[..., :2] * s[..., None, :2]) @ vh[..., :2, :]
    np.testing.assert_allclose(b @ a, best, rtol=1e-4, atol=1e-4)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="disagree"):
        factors_to_delta(jnp.zeros((2, 4, 5)), jnp.zeros((3, 6, 4)))
    with pytest.raises(ValueError, match="prefix"):
        factors_to_delta(jnp.zeros((2, 4, 5)), jnp.zeros((2, 6, 4)), jnp.ones(3))
    with pytest.raises(ValueError, match="rank"):
        delta_to_factors(jnp.zeros((6, 5)), 6)


def test_zero_and_low_rank_deltas_give_finite_factors():
    a, b = delta_to_factors(jnp.zeros((3, 6, 5)), 2)
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and not np.any(b @ a)
    rank_one = np.outer(np.arange(1.0, 7.0), np.ones(5)).astype(np.float32)
    a, b = delta_to_factors(jnp.asarray(rank_one), 3)  # rank 3 asked of a rank-1 delta
    np.testing.assert_allclose(b @ a, rank_one, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
