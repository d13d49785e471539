"""Merging adapters of a stacked library: the one place a merge is configured.

`d2c merge` and the clustering search both go through this module, so a merge
means the same thing everywhere. It turns a `kernels.merge.MergeConfig` plus a
stacked library

    params = {module: {"A": [N, L, r, d_in], "B": [N, L, d_out, r]}},  scale = [N]

and a membership mask ``[C, N]`` into C merged rank-r adapters

    {module: {"A": [C, L, r, d_in], "B": [C, L, d_out, r]}},  scale = [C] (all 1)

and, on request, their untruncated dense deltas ``{module: {"delta": [C, L, d_out,
d_in]}}`` (for scoring candidates without paying for an SVD each).

Delta space merges ``scale_n * B_n @ A_n`` and truncates each merged module-layer
to rank r (`TRUNCATIONS`: the exact top-r singular subspace, or a randomized range
finder; `kernels.lowrank`); factor space merges A and B with PEFT's
``add_weighted_adapter`` semantics and needs no SVD. Its dense delta is exactly
``B @ A`` of the merged factors, so in factor space "untruncated" and "deployed"
coincide.

Cost grows with the clusters, not with the library. The cluster-independent part
is done once by `prepare`: in delta space only each adapter's per-matrix
sparsifier state (a trim threshold, a PRNG key, a packed mask:
`kernels.merge.prepare_delta_state`) is kept, never its dense delta, so a prepared
library weighs about what its factors weigh (1.8 MB per SmolLM2 q,v adapter
instead of 53 MB). A merge (`merged_deltas` / `merged_factors`) turns the mask into
member lists ``[C, S]`` on the host (`member_plan`: S padded to a few bucket sizes;
rows of similar sizes merged together, `merge_groups`) and hands them to the
kernels (`kernels.merge.merge_member_deltas`, which streams each member's delta
from its factors, `merge_member_factors`, `merge_member_subspace`). DARE's random
mask of an adapter depends only on ``MergeConfig.seed`` and the adapter's name, so
it is the same whichever library or subset the adapter sits in.

This module plans and truncates; every array computation of a merge is in
`kernels.merge`. The command-line flags of a merge live in
`d2c_jax.commands.merge_args`; the named merge methods in `kernels.merge_methods`.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kernels import lowrank
from kernels import merge as kmerge
from kernels.merge import MergeConfig

LoraParams = dict[str, dict[str, jax.Array]]

# The engine's default merge where a caller does not choose one: TIES in delta space
# at the TIES paper's density, with PEFT's per-tensor trim, count divisor and
# unweighted "total" sign vote.
DEFAULT_MERGE = MergeConfig("ties", space="delta", density=0.2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PreparedLibrary:
    """A library made ready for one MergeConfig; merge any member lists from it.

    Nothing here is dense: a delta-space merge recomputes each member's delta from
    its factors and sparsifies it on the fly, so memory grows with N times the
    factor size (not N times ``d_out x d_in``) and a merge costs what its clusters
    cost.

    Attributes:
      factors: the library's own factors ``{module: {"A": [N, L, r, d_in],
        "B": [N, L, d_out, r]}}``.
      sparse_factors: factor space: the factors trimmed or DARE-masked, unweighted
        (`kernels.merge.prepare_factors`); otherwise None.
      state: delta space: ``{module: state}`` of the method's sparsifier, leaves
        ``[N, L, ...]`` (`kernels.merge.prepare_delta_state`: trim thresholds
        ``[N, L]``, breadcrumbs bands ``[N, L, 2]``, DARE key data ``[N, L, 2]``,
        DELLA packed masks ``[N, L, d_out, ceil(d_in / 8)]`` and rescalings
        ``[N, L]``); subspace methods and factor space: None.
      scale: ``[N]`` LoRA scales of the inputs.
      weights: ``[N]`` per-adapter weights.
      config: the merge (static).
      rank: r of the merged adapters (the library's rank).
    """

    factors: dict
    sparse_factors: dict | None
    state: dict | None
    scale: jax.Array
    weights: jax.Array
    config: MergeConfig = dataclasses.field(metadata=dict(static=True))
    rank: int = dataclasses.field(metadata=dict(static=True))

    @property
    def num_adapters(self) -> int:
        return int(self.weights.shape[0])


@dataclasses.dataclass(frozen=True)
class MergedAdapters:
    """C merged adapters.

    Attributes:
      params: ``{module: {"A": [C, L, r, d_in], "B": [C, L, d_out, r]}}``.
      scale: ``[C]``, all ones (merged adapters carry their scale in the factors;
        save them with ``lora_alpha = r``).
      delta: ``{module: {"delta": [C, L, d_out, d_in]}}`` untruncated merged
        deltas, or None when not requested.
    """

    params: LoraParams
    scale: jax.Array
    delta: dict[str, dict[str, jax.Array]] | None = None


def _check_library(
    params: Mapping[str, Mapping[str, jax.Array]], scale: jax.Array
) -> tuple[int, int]:
    """Shape checks of a stacked library; returns (N, r)."""
    if not params:
        raise ValueError("params is empty: expected {module: {'A': ..., 'B': ...}}")
    scale = jnp.asarray(scale)
    if scale.ndim != 1:
        raise ValueError(f"scale must be [N], got shape {scale.shape}")
    n = scale.shape[0]
    ranks = set()
    for module, factors in params.items():
        if set(factors) != {"A", "B"}:
            raise ValueError(
                f"params[{module!r}] must have keys 'A' and 'B', got {sorted(factors)}"
            )
        a, b = factors["A"], factors["B"]
        if a.ndim != 4 or b.ndim != 4:
            raise ValueError(
                f"params[{module!r}]: expected A [N, L, r, d_in] and B [N, L, d_out, r], "
                f"got {a.shape} and {b.shape}"
            )
        if (
            a.shape[0] != n
            or b.shape[0] != n
            or a.shape[1] != b.shape[1]
            or a.shape[2] != b.shape[3]
        ):
            raise ValueError(
                f"params[{module!r}]: A {a.shape} and B {b.shape} disagree with each other "
                f"or with scale [N={n}] on N, L or r"
            )
        ranks.add(a.shape[2])
    if len(ranks) != 1:
        raise ValueError(f"all modules must share one rank, got {sorted(ranks)}")
    return n, ranks.pop()


def adapter_keys(names: Sequence[str], seed: int) -> jax.Array:
    """``[N]`` typed PRNG keys for DARE: ``fold_in(key(seed), crc32(name))`` per adapter."""
    hashes = jnp.asarray([zlib.crc32(name.encode()) for name in names], dtype=jnp.uint32)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), hashes)


def config_weights(config: MergeConfig, n: int) -> jax.Array:
    """``[N]`` weights from ``config.weights`` (all ones when None)."""
    if config.weights is None:
        return jnp.ones((n,), jnp.float32)
    if len(config.weights) != n:
        raise ValueError(f"weights has {len(config.weights)} values but there are {n} adapters")
    return jnp.asarray(config.weights, jnp.float32)


def _kernel_config(config: MergeConfig) -> MergeConfig:
    """`config` without the fields kernels get as arrays (weights, seed -> keys).

    Jitted functions take this as their static config, so changing weights or the
    seed does not recompile.
    """
    return dataclasses.replace(config, weights=None, seed=0)


def _for_kernels(prepared: PreparedLibrary) -> PreparedLibrary:
    return dataclasses.replace(prepared, config=_kernel_config(prepared.config))


_prepare_delta_state = jax.jit(kmerge.prepare_delta_state, static_argnames="config")
_prepare_factors = jax.jit(kmerge.prepare_factors, static_argnames="config")


def prepare(
    params: Mapping[str, Mapping[str, jax.Array]],
    scale: jax.Array,
    config: MergeConfig,
    *,
    names: Sequence[str],
) -> PreparedLibrary:
    """Make a stacked library ready to merge under `config`: the sparsifier's state
    (delta space) or the sparsified factors (factor space).

    Args:
      params: ``{module: {"A": [N, L, r, d_in], "B": [N, L, d_out, r]}}``.
      scale: ``[N]`` LoRA scales.
      config: the merge.
      names: the N adapter names (seed DARE's per-adapter masks).
    """
    n, rank = _check_library(params, scale)
    if len(names) != n:
        raise ValueError(f"names has {len(names)} entries but the library has {n} adapters")
    scale = jnp.asarray(scale, jnp.float32)
    factors = {m: {"A": jnp.asarray(f["A"]), "B": jnp.asarray(f["B"])} for m, f in params.items()}
    keys = adapter_keys(names, config.seed) if kmerge.sparsifier(config).random else None
    sparse = state = None
    if config.spec.is_subspace:
        pass  # merged from the members' own factors; KnOTS trims per cluster
    elif config.space == "factor":
        sparse = _prepare_factors(factors, _kernel_config(config), keys)
    else:
        state = _prepare_delta_state(factors, scale, _kernel_config(config), keys)
    return PreparedLibrary(
        factors=factors,
        sparse_factors=sparse,
        state=state,
        scale=scale,
        weights=config_weights(config, n),
        config=config,
        rank=rank,
    )


def bucket_size(size: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and 1.5 times
    them) that holds `size`: arrays padded to it take few distinct shapes, so few
    are compiled, and at most a quarter of one is padding."""
    bucket = 1 << max(size - 1, 0).bit_length()
    return 3 * bucket // 4 if size <= 3 * bucket // 4 else bucket


def _host_mask(membership, n: int) -> np.ndarray:
    mask = np.asarray(membership) != 0
    if mask.ndim != 2 or mask.shape[1] != n:
        raise ValueError(f"membership must be a [C, N={n}] mask, got shape {mask.shape}")
    return mask


def _first_rows(x: jax.Array, count: int) -> jax.Array:
    return x[:count]


def member_plan(membership, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``[C, N]`` mask -> ``(index [C, S], valid [C, S])`` on the host: each row's
    members in library order, padded to a bucket size S >= the largest row."""
    mask = _host_mask(membership, n)
    width = min(bucket_size(int(mask.sum(axis=1).max(initial=1))), n)
    order = np.argsort(~mask, axis=1, kind="stable")[:, :width].astype(np.int32)
    return order, np.take_along_axis(mask, order, axis=1)


# Member slots (rows x padded members) gathered by one merge call: bounds the
# gathered factors and one layer's member deltas (about 1.3 MB each for SmolLM2's q)
# whatever the clusters' sizes.
MAX_SLOTS = 256


def merge_groups(membership, n: int, rows_multiple: int = 1) -> list[np.ndarray]:
    """Rows of a ``[C, N]`` mask to merge together: rows of similar member counts,
    at most `MAX_SLOTS` member slots per group (one row alone may exceed it), so a
    mix of small and large clusters is not padded to the largest. Each group's row
    count is padded (by `_padded_rows`) to a bucket size and a multiple of
    `rows_multiple` (devices)."""
    counts = (np.asarray(membership) != 0).sum(axis=1)
    groups, current = [], []
    for row in np.argsort(counts, kind="stable"):
        width = min(bucket_size(max(int(counts[row]), 1)), n)
        if current and _padded_rows(len(current) + 1, rows_multiple) * width > MAX_SLOTS:
            groups.append(np.asarray(current))
            current = []
        current.append(row)
    return groups + [np.asarray(current)] if current else groups


def _padded_rows(rows: int, multiple: int) -> int:
    padded = bucket_size(rows)
    return -(-padded // multiple) * multiple


def _combine(prepared: PreparedLibrary, index: jax.Array, valid: jax.Array):
    """Delta space: ``{m: [C, L, o, i]}``; factor space: ``{m: {"A", "B"}}`` [C, ...]."""
    p, config = prepared, prepared.config
    if config.spec.is_subspace:
        return kmerge.merge_member_subspace(
            p.factors, p.scale, p.weights, index, valid, config, p.rank
        )
    if config.space == "delta":
        return kmerge.merge_member_deltas(
            p.factors, p.scale, p.state, p.weights, index, valid, config
        )
    return kmerge.merge_member_factors(
        p.factors, p.sparse_factors, p.scale, p.weights, index, valid, config
    )


def _as_deltas(prepared: PreparedLibrary, combined) -> dict[str, dict[str, jax.Array]]:
    if prepared.config.space == "delta":
        return {m: {"delta": d} for m, d in combined.items()}
    return {m: {"delta": lowrank.factors_to_delta(f["A"], f["B"])} for m, f in combined.items()}


# How merged deltas are truncated back to rank r: "exact" (the top-r singular
# subspace from a Gram eigendecomposition) or "randomized" (a randomized range
# finder with power iterations; `kernels.lowrank.randomized_delta_to_factors`).
TRUNCATIONS = {
    "exact": lowrank.delta_to_factors,
    "randomized": lowrank.randomized_delta_to_factors,
}


def _as_factors(prepared: PreparedLibrary, combined, truncation: str) -> LoraParams:
    if prepared.config.space == "factor":
        return combined
    truncate = TRUNCATIONS[truncation]
    factors = {m: truncate(d, prepared.rank) for m, d in combined.items()}
    return {m: {"A": a, "B": b} for m, (a, b) in factors.items()}


@jax.jit
def _merged_deltas_jit(prepared: PreparedLibrary, index: jax.Array, valid: jax.Array):
    return _as_deltas(prepared, _combine(prepared, index, valid))


@jax.jit(static_argnames=("with_delta", "truncation"))
def _merged_factors_jit(prepared: PreparedLibrary, index, valid, with_delta: bool, truncation: str):
    combined = _combine(prepared, index, valid)
    delta = _as_deltas(prepared, combined) if with_delta else None
    return _as_factors(prepared, combined, truncation), delta


def _grouped(prepared: PreparedLibrary, membership, place, rows_multiple, run):
    """``run(index, valid)`` on each group of rows (`merge_groups`), results put back
    in row order (leaves ``[C, ...]``)."""
    n = prepared.num_adapters
    mask = _host_mask(membership, n)
    outputs, order = [], []
    for rows in merge_groups(mask, n, rows_multiple):
        padded = np.zeros((_padded_rows(len(rows), rows_multiple), n), bool)
        padded[: len(rows)] = mask[rows]
        plan = member_plan(padded, n)
        out = run(*(plan if place is None else place(plan)))
        outputs.append(jax.tree.map(functools.partial(_first_rows, count=len(rows)), out))
        order.append(rows)
    if len(outputs) == 1 and np.array_equal(order[0], np.arange(len(mask))):
        return outputs[0]
    inverse = np.argsort(np.concatenate(order))
    return jax.tree.map(lambda *xs: jnp.concatenate(xs)[inverse], *outputs)


def merged_deltas(
    prepared: PreparedLibrary,
    membership,
    *,
    place: Callable | None = None,
    rows_multiple: int = 1,
) -> dict[str, dict[str, jax.Array]]:
    """Untruncated merged deltas ``{module: {"delta": [C, L, d_out, d_in]}}`` (scale folded in).

    In delta space this skips the SVD (what candidate scoring wants); in factor
    space it is exactly ``B @ A`` of the merged factors.

    Args:
      prepared: from `prepare`.
      membership: ``[C, N]`` host mask (NumPy or a fully addressable array); only
        each row's members are gathered and merged, rows of similar sizes together.
      place: places each call's ``(index [C', S], valid [C', S])`` member lists on
        devices (e.g. split over candidates, `d2c_jax.sharding`); default: as they are.
      rows_multiple: each call's row count C' is a multiple of this (the devices
        `place` splits rows over).
    """
    kernel_prepared = _for_kernels(prepared)
    return _grouped(
        prepared,
        membership,
        place,
        rows_multiple,
        lambda index, valid: _merged_deltas_jit(kernel_prepared, index, valid),
    )


def merged_factors(
    prepared: PreparedLibrary,
    membership,
    *,
    return_delta: bool = False,
    place: Callable | None = None,
    rows_multiple: int = 1,
    truncation: str = "exact",
) -> MergedAdapters:
    """C merged rank-r adapters for the ``[C, N]`` mask (delta space: truncated by
    `truncation`, a key of `TRUNCATIONS`); other arguments as `merged_deltas`."""
    _check_truncation(truncation)
    kernel_prepared = _for_kernels(prepared)
    params, delta = _grouped(
        prepared,
        membership,
        place,
        rows_multiple,
        lambda index, valid: _merged_factors_jit(
            kernel_prepared, index, valid, return_delta, truncation
        ),
    )
    rows = np.shape(membership)[0]
    return MergedAdapters(params=params, scale=jnp.ones((rows,), jnp.float32), delta=delta)


def merge(
    params: Mapping[str, Mapping[str, jax.Array]],
    scale: jax.Array,
    membership,
    config: MergeConfig,
    *,
    names: Sequence[str],
    return_delta: bool = False,
    truncation: str = "exact",
) -> MergedAdapters:
    """Merge the members of each row of `membership` into one rank-r adapter.

    Args:
      params: ``{module: {"A": [N, L, r, d_in], "B": [N, L, d_out, r]}}``.
      scale: ``[N]`` LoRA scales.
      membership: ``[C, N]`` mask (float or bool); an empty row merges to zero.
      config: the merge.
      names: the N adapter names (seed DARE's masks).
      return_delta: also return the untruncated dense deltas.
      truncation: delta space: how merged deltas return to rank r (`TRUNCATIONS`).
    """
    _check_truncation(truncation)
    prepared = prepare(params, scale, config, names=names)
    return merged_factors(prepared, membership, return_delta=return_delta, truncation=truncation)


def _check_truncation(truncation: str) -> None:
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {sorted(TRUNCATIONS)}, got {truncation!r}")
