"""First-order screening of D2C moves: estimate every move's change of the objective.

Notation (see `d2c_jax.cluster.d2c`): clusters c = 0..K-1 with merged dense deltas
``D_c``; ``S(c) = sum_{t in c} nll_t(D_c)``; moving adapter i from cluster a to b
changes ``N * J`` by

    S(a - i) - S(a) + S(b + i) - S(b).

Linearising each task's loss in the merged delta around the current merges gives

    S(a - i) - S(a) ~ -nll_i(D_a) + <G_a, D(a - i) - D_a>
    S(b + i) - S(b) ~  nll_i(D_b) + <G_b, D(b + i) - D_b>

with ``G_c = d S(c) / d D_c`` (one backward pass per cluster) and ``nll_i(D_b)`` the
loss of task i under cluster b's *current* merge (one forward of every task under
every cluster). Dropped terms: the second order of every loss in ``dD``, the
first-order change of the moved task's own loss (``<g_i, dD>``: in the source the
removed task's gradient stays inside ``G_a``; in the destination its loss is taken
at ``D_b``, so the benefit of its own adapter joining the merge is not counted).

What is linear for TIES: nothing in the member set. With the elected signs fixed,
a merged entry is the mean of the agreeing members' trimmed values, so adding i
changes it by ``agree_i * (lambda x_i - D) / (count + 1)``, a function of the
count, and a sign flips where a small vote sum changes side. The estimate therefore
does not linearise the merge: ``D(a - i)`` and ``D(b + i)`` come exactly from the
batched merge kernel (which needs no forward pass), and only the loss is
linearised in ``dD``. For weighted-sum merges ``dD`` is exactly affine in the
member set anyway.

Functions (pure, jittable, vmappable):
* `directional_change(grads, new, old)` -> ``[C]``: ``<grads_c, new_c - old_c>``.
* `estimate_moves(onehot, cross_nll, source_change, dest_change)` -> ``[N, K]``.
* `spearman(x, y)`: rank correlation, the screening's reliability check.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def directional_change(grads, new, old) -> jax.Array:
    """``<grads_c, new_c - old_c>`` summed over all leaves.

    Args:
      grads, new, old: pytrees of the same structure, leaves ``[C, ...]`` (e.g.
        ``{module: {"delta": [C, L, d_out, d_in]}}``).

    Returns:
      ``[C]`` float32.
    """
    terms = jax.tree.map(
        lambda g, n, o: jnp.sum((g * (n - o)).reshape(g.shape[0], -1), axis=1), grads, new, old
    )
    return sum(jax.tree.leaves(terms))


def estimate_moves(
    onehot: jax.Array, cross_nll: jax.Array, source_change: jax.Array, dest_change: jax.Array
) -> jax.Array:
    """First-order estimate of the change of ``N * J`` for every move (module docstring).

    Args:
      onehot: ``[N, K]`` current assignment (1 where adapter i is in cluster k).
      cross_nll: ``[K, N]`` loss of task i under cluster k's current merge.
      source_change: ``[N]`` ``<G_a, D(a - i) - D_a>`` for each adapter's own cluster a.
      dest_change: ``[N, K]`` ``<G_b, D(b + i) - D_b>`` (ignored where b = a).

    Returns:
      ``[N, K]`` estimated change of ``N * J``; ``+inf`` where b is i's own cluster.
    """
    own = jnp.sum(onehot * cross_nll.T, axis=1)  # [N] nll_i(D_a)
    estimate = (source_change - own)[:, None] + cross_nll.T + dest_change
    return jnp.where(onehot > 0, jnp.inf, estimate)


def spearman(x: jax.Array, y: jax.Array) -> jax.Array:
    """Spearman rank correlation of two ``[S]`` vectors, S >= 2 (ties ranked by position)."""
    rx = jnp.argsort(jnp.argsort(x)).astype(jnp.float32)
    ry = jnp.argsort(jnp.argsort(y)).astype(jnp.float32)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return jnp.sum(rx * ry) / jnp.sqrt(jnp.sum(rx * rx) * jnp.sum(ry * ry))
