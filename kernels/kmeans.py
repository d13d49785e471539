"""Parameter-space clustering math: kernel K-Means (k-means++, restarts) and MBC features.

Clustering adapters by their parameters needs inner products of task vectors, not
the vectors themselves: for dense deltas the Gram matrix is computed exactly from
the LoRA factors (`delta_gram`), which never materialises ``[N, d_out, d_in]``.
Given ``G [N, N]`` every K-Means quantity follows, with ``M [N, K]`` the one-hot
assignment and ``c [K]`` the cluster sizes:

    ||x_i - mu_k||^2 = G_ii - 2 (G M)_ik / c_k + (M^T G M)_kk / c_k^2      (euclidean)
    cos(x_i, mu_k)   = (G M)_ik / sqrt(G_ii (M^T G M)_kk)                  (cosine)

Restarts are vmapped over PRNG keys; every function is jittable with `k`,
`num_iters` and `metric` static.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def delta_gram(a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """Exact inner products of dense LoRA deltas, from factors.

    With ``delta_n = scale_n * B_n @ A_n`` per layer, ``<delta_n, delta_m>_F =
    scale_n scale_m * sum((B_n^T B_m) * (A_n A_m^T))`` summed over layers.

    Args:
      a: ``[N, L, r, d_in]``; b: ``[N, L, d_out, r]``; scale: ``[N]``.
    Returns:
      ``[N, N]`` float32.
    """

    def per_layer(total, layer):
        a_l, b_l = layer  # [N, r, d_in], [N, d_out, r]
        btb = jnp.einsum("nor,mos->nmrs", b_l, b_l)
        aat = jnp.einsum("nri,msi->nmrs", a_l, a_l)
        return total + jnp.einsum("nmrs,nmrs->nm", btb, aat), None

    n = a.shape[0]
    total, _ = jax.lax.scan(
        per_layer, jnp.zeros((n, n), jnp.float32), (jnp.swapaxes(a, 0, 1), jnp.swapaxes(b, 0, 1))
    )
    return total * scale[:, None] * scale[None, :]


def _scores(gram: jax.Array, assign: jax.Array, k: int, metric: str) -> jax.Array:
    """Distance-like score ``[N, K]`` of each point to each cluster centre (lower is closer)."""
    onehot = jax.nn.one_hot(assign, k, dtype=gram.dtype)  # [N, K]
    counts = onehot.sum(0)  # [K]
    gm = gram @ onehot  # [N, K]
    mgm = jnp.einsum("nk,nk->k", onehot, gm)  # [K]
    safe = jnp.maximum(counts, 1.0)
    if metric == "euclidean":
        score = jnp.diag(gram)[:, None] - 2 * gm / safe + mgm / safe**2
    else:
        norms = jnp.sqrt(jnp.maximum(jnp.diag(gram)[:, None] * mgm[None, :], 1e-30))
        score = -gm / norms
    return jnp.where(counts[None, :] > 0, score, jnp.inf)


def _fill_empty(gram: jax.Array, assign: jax.Array, k: int, metric: str) -> jax.Array:
    """Give every empty cluster the point farthest from its own centre (from a cluster of >= 2)."""

    def fill(j, assign):
        counts = jnp.bincount(assign, length=k)
        own = jnp.take_along_axis(_scores(gram, assign, k, metric), assign[:, None], 1)[:, 0]
        movable = counts[assign] > 1
        far = jnp.argmax(jnp.where(movable, own, -jnp.inf))
        return jnp.where(counts[j] == 0, assign.at[far].set(j), assign)

    return jax.lax.fori_loop(0, k, fill, assign)


def _plus_plus_init(gram: jax.Array, key: jax.Array, k: int) -> jax.Array:
    """k-means++ seeding in feature space; returns the assignment to the nearest seed."""
    n = gram.shape[0]
    diag = jnp.diag(gram)
    sq_dist = diag[:, None] + diag[None, :] - 2 * gram  # [N, N]
    keys = jax.random.split(key, k)
    first = jax.random.randint(keys[0], (), 0, n)
    centers = jnp.zeros((k,), jnp.int32).at[0].set(first)
    nearest = jnp.maximum(sq_dist[first], 0.0)

    def pick(j, carry):
        centers, nearest = carry
        probs = jnp.where(nearest.sum() > 0, nearest / nearest.sum(), jnp.ones(n) / n)
        c = jax.random.choice(keys[j], n, p=probs)
        return centers.at[j].set(c), jnp.minimum(nearest, jnp.maximum(sq_dist[c], 0.0))

    centers, _ = jax.lax.fori_loop(1, k, pick, (centers, nearest))
    assign = jnp.argmin(sq_dist[:, centers], axis=1)
    # Seeds are their own clusters even when two seeds coincide.
    return assign.at[centers].set(jnp.arange(k))


@partial(jax.jit, static_argnames=("k", "num_iters", "metric"))
def kmeans_single(
    gram: jax.Array, key: jax.Array, k: int, num_iters: int = 100, metric: str = "euclidean"
) -> tuple[jax.Array, jax.Array]:
    """One K-Means run from a k-means++ seed: ``(assign [N] int32, inertia [])``.

    Every cluster is non-empty (requires ``k <= N``). For `metric="cosine"` the
    objective is the sum of (1 - cosine to the centre).
    """
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    assign = _fill_empty(gram, _plus_plus_init(gram, key, k), k, metric)

    def step(carry):
        assign, _, i = carry
        new = _fill_empty(gram, jnp.argmin(_scores(gram, assign, k, metric), axis=1), k, metric)
        return new, jnp.any(new != assign), i + 1

    def not_done(carry):
        _, changed, i = carry
        return changed & (i < num_iters)

    assign, _, _ = jax.lax.while_loop(not_done, step, (assign, jnp.array(True), 0))
    own = jnp.take_along_axis(_scores(gram, assign, k, metric), assign[:, None], 1)[:, 0]
    inertia = own.sum() if metric == "euclidean" else (1.0 + own).sum()
    return assign.astype(jnp.int32), inertia


@partial(jax.jit, static_argnames=("k", "num_restarts", "num_iters", "metric"))
def kmeans(
    gram: jax.Array,
    key: jax.Array,
    k: int,
    num_restarts: int = 10,
    num_iters: int = 100,
    metric: str = "euclidean",
) -> tuple[jax.Array, jax.Array]:
    """Best of `num_restarts` vmapped K-Means runs: ``(assign [N], inertia [])``."""
    keys = jax.random.split(key, num_restarts)
    assigns, inertias = jax.vmap(
        lambda key: kmeans_single(gram, key, k, num_iters=num_iters, metric=metric)
    )(keys)
    best = jnp.argmin(inertias)
    return assigns[best], inertias[best]


def top_fraction(x: jax.Array, fraction: float) -> jax.Array:
    """Keep each row's `fraction` largest-magnitude entries, zero the rest. ``[N, D] -> [N, D]``."""
    keep = max(1, int(round(fraction * x.shape[1])))
    threshold = jax.lax.top_k(jnp.abs(x), keep)[0][:, -1:]
    return jnp.where(jnp.abs(x) >= threshold, x, 0.0)


def svd_embed(x: jax.Array, dims: int) -> jax.Array:
    """Rows of ``x [N, D]`` in the top-`dims` singular basis: ``U_k S_k``, ``[N, min(dims, N)]``.

    Computed from the ``[N, N]`` Gram matrix (cheap when N << D); centring is not
    applied, as in truncated SVD.
    """
    eigvals, eigvecs = jnp.linalg.eigh(x @ x.T)  # ascending
    dims = min(dims, x.shape[0])
    top_vals, top_vecs = eigvals[::-1][:dims], eigvecs[:, ::-1][:, :dims]
    return top_vecs * jnp.sqrt(jnp.maximum(top_vals, 0.0))[None, :]
