"""kernels.lowrank: factors <-> dense delta, truncated SVD with a symmetric split."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.lowrank import delta_to_factors, factors_to_delta, randomized_delta_to_factors


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


def merged_like(rng, batch: int, d_out: int, d_in: int, members: int = 6, rank: int = 4):
    """Sums of trimmed random rank-`rank` deltas: a slowly decaying spectrum, as
    after a TIES merge."""
    a = rng.standard_normal((batch, members, rank, d_in))
    b = rng.standard_normal((batch, members, d_out, rank))
    d = b @ a
    threshold = np.quantile(np.abs(d), 0.8, axis=(-2, -1), keepdims=True)
    return np.where(np.abs(d) >= threshold, d, 0.0).sum(axis=1).astype(np.float32)


@pytest.mark.parametrize("shape", [(40, 48), (48, 16), (16, 48)])
def test_randomized_truncation_is_near_the_exact_svd_residual(shape):
    """Residual within 2% of the exact (NumPy SVD) truncation's with two power
    iterations, worse without them; B @ A is a projection (never worse than 0)."""
    rng = np.random.default_rng(3)
    delta = merged_like(rng, 5, *shape)
    rank = 4
    s = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    best = np.sqrt(np.sum(s[..., rank:] ** 2, axis=-1))  # Eckart-Young residual

    def residual(**kwargs):
        a, b = randomized_delta_to_factors(jnp.asarray(delta), rank, **kwargs)
        assert a.shape == (5, rank, shape[1]) and b.shape == (5, shape[0], rank)
        return np.linalg.norm(delta - np.asarray(b @ a, np.float64), axis=(-2, -1))

    sharpened, plain = residual(), residual(power_iterations=0, oversample=0)
    assert np.all(sharpened >= best * (1 - 1e-4))
    assert np.all(sharpened <= best * 1.02)
    assert np.mean(plain) > np.mean(sharpened)
    assert np.all(sharpened <= np.linalg.norm(delta, axis=(-2, -1)))


def test_randomized_truncation_recovers_a_low_rank_delta_exactly():
    rng = np.random.default_rng(4)
    delta = (rng.standard_normal((3, 20, 3)) @ rng.standard_normal((3, 3, 30))).astype(np.float32)
    a, b = jax.jit(randomized_delta_to_factors, static_argnums=1)(jnp.asarray(delta), 3)
    np.testing.assert_allclose(b @ a, delta, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(jnp.linalg.norm(a, axis=-1), jnp.linalg.norm(b, axis=-2), rtol=1e-3)
    a, b = randomized_delta_to_factors(jnp.zeros((2, 6, 5)), 2)
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and not np.any(b @ a)
