"""The documented reference of a merge: every adapter's tensors sparsified whole, then
combined under a plain ``[C, N]`` membership mask, written out from the semantics in
`kernels.merge`'s docstring.

The engine never runs this: it gathers each cluster's members and, in delta space,
streams them (`kernels.merge.merge_member_deltas`). The tests compare it with this
reference, which holds every dense tensor and reduces over all N adapters with the
mask: no member lists, no running sums, no row blocks. It reuses only the kernels'
sparsification (`kernels.merge.sparsify`, itself tested against NumPy's top-k,
PEFT and mergekit), so a mistake in the combine or the streaming shows up here.
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels import merge as km
from kernels.merge import MergeConfig


def _expand(v, ndim):
    """``[C, N]`` -> broadcastable against ``[C, N, ...]`` of `ndim` axes."""
    return v.reshape(v.shape + (1,) * (ndim - 2))


def masked_sums(x, membership, weights, config: MergeConfig):
    """``x [N, ...]`` sparsified tensors, ``membership [C, N]``, ``weights [N]`` ->
    ``[C, ...]``: the weighted sum over each row's members, or TIES's disjoint sum over
    the members agreeing with the elected sign divided per entry by the count or the
    weight of those members (before `cluster_factor`; no one-member rule)."""
    mask = jnp.asarray(membership) != 0
    x = jnp.broadcast_to(x[None], (mask.shape[0],) + x.shape)  # [C, N, ...]
    w = _expand(jnp.where(mask, weights[None], 0.0), x.ndim)
    if not config.is_ties:
        return jnp.sum(w * x, axis=1)
    inside = _expand(mask, x.ndim)
    votes = jnp.where(inside, w * x if config.sign_vote == "weighted" else x, 0.0)
    if config.majority == "total":
        elected = jnp.where(jnp.sum(votes, axis=1) >= 0, 1.0, -1.0)
    else:
        elected = jnp.where(jnp.sum(jnp.sign(votes), axis=1) >= 0, 1.0, -1.0)
    agree = inside & (jnp.sign(votes) == elected[:, None])
    total = jnp.sum(jnp.where(agree, w * x, 0.0), axis=1)
    if config.divisor == "count":
        return total / jnp.maximum(agree.sum(axis=1), 1)
    if config.divisor == "weight":
        agreeing = jnp.sum(jnp.where(agree, w, 0.0), axis=1)
        return total / jnp.where(agreeing == 0, 1.0, agreeing)
    return total


def cluster_factor(membership, weights, config: MergeConfig):
    """``[C]`` lambda / D_c: D_c the member count or weight of the weighted-sum
    methods (1 for an empty row), 1 for TIES (which divides per entry)."""
    mask = jnp.asarray(membership) != 0
    if config.is_ties or config.divisor == "none":
        divisor = jnp.ones(mask.shape[0])
    elif config.divisor == "count":
        divisor = mask.sum(axis=1).astype(jnp.float32)
    else:
        divisor = jnp.where(mask, weights[None], 0.0).sum(axis=1)
    return config.lam / jnp.where(divisor == 0, 1.0, divisor)


def _rows_times(x, factor):
    return x * factor.reshape((-1,) + (1,) * (x.ndim - 1))


def masked_merge_deltas(deltas, membership, weights, config: MergeConfig, keys=None):
    """Delta space: ``{module: [N, L, d_out, d_in]}`` dense deltas (scale folded in)
    -> ``{module: [C, L, d_out, d_in]}``."""
    sparse = km.sparsify(dict(deltas), config, keys)
    factor = cluster_factor(membership, weights, config)
    return {
        m: _rows_times(masked_sums(x, membership, weights, config), factor)
        for m, x in sparse.items()
    }


def masked_merge_factors(factors, scale, membership, weights, config: MergeConfig, keys=None):
    """Factor space (PEFT ``add_weighted_adapter``): ``{module: {"A": [N, L, r, d_in],
    "B": [N, L, d_out, r]}}`` -> the same with C rows; A and B are combined on their
    own, adapter n weighted ``sign(w_n s_n) sqrt(|w_n s_n|)`` on A and ``sqrt(|w_n s_n|)``
    on B, and the cluster factor ``lambda / D_c`` split the same way."""
    sparse = km.prepare_factors(factors, config, keys)
    scaled = weights * scale
    root = jnp.sqrt(jnp.abs(scaled))
    side_weights = {"A": jnp.where(scaled >= 0, root, -root), "B": root}
    factor = cluster_factor(membership, weights, config)
    factor_root = jnp.sqrt(jnp.abs(factor))
    side_factor = {"A": jnp.where(factor >= 0, factor_root, -factor_root), "B": factor_root}
    return {
        m: {
            side: _rows_times(
                masked_sums(sparse[m][side], membership, side_weights[side], config),
                side_factor[side],
            )
            for side in "AB"
        }
        for m in sparse
    }
