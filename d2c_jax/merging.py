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
is done once by `prepare`: in delta space only each adapter's per-matrix trim
threshold (or its DARE key) is kept, never its dense delta, so a prepared library
weighs about what its factors weigh (1.8 MB per SmolLM2 q,v adapter instead of
53 MB). A merge (`merged_deltas` / `merged_factors`) turns the mask into member
lists ``[C, S]`` on the host (`member_plan`: S padded to a few bucket sizes; rows
of similar sizes merged together, `merge_groups`),
gathers those members, and in delta space streams them: for one block of output
rows of one layer at a time, each member's delta is recomputed from its factors,
trimmed by its stored threshold and added to running sums
(`kernels.merge.member_sums`), finished once (`finish_sums`). Work is O(C x S) per
layer and temporaries a few row blocks of C matrices, whatever N is. DARE's random
mask of an adapter depends only on ``MergeConfig.seed`` and the adapter's name, so
it is the same whichever library or subset the adapter sits in.

The command-line flags of a merge live in `d2c_jax.commands.merge_args`; the named
merge methods in `kernels.merge_methods`.
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
      sparse_factors: factor space: the factors trimmed or DARE-masked, unweighted;
        delta space: None.
      thresholds: delta space with magnitude trimming: ``{module: [N, L]}`` int32
        thresholds on the bit patterns of each member delta's magnitudes
        (`kernels.merge.trim_thresholds`); with Model Breadcrumbs ``{module: [N, L,
        2]}`` (low, high) bands (`kernels.merge.band_thresholds`); otherwise None.
      keys: delta space with DARE: ``[N, 2]`` uint32 key data of each adapter's
        PRNG key (`adapter_keys`); otherwise None.
      scale: ``[N]`` LoRA scales of the inputs.
      weights: ``[N]`` per-adapter weights.
      config: the merge (static).
      rank: r of the merged adapters (the library's rank).
      masks: delta space with DELLA: ``{module: [N, L, d_out, ceil(d_in / 8)]}``
        uint8, each adapter's keep-mask packed 8 entries a byte (DELLA's keep
        probabilities follow each row's magnitude ranks, a sort too costly to redo
        per member and merge, so its masks are drawn once: 1/32 of the dense deltas'
        bytes); otherwise None.
      rescale: delta space with DELLA: ``{module: [N, L]}`` L1 rescaling of each
        masked matrix (`kernels.merge.della_sparsify`); otherwise None.
    """

    factors: dict
    sparse_factors: dict | None
    thresholds: dict | None
    keys: jax.Array | None
    scale: jax.Array
    weights: jax.Array
    config: MergeConfig = dataclasses.field(metadata=dict(static=True))
    rank: int = dataclasses.field(metadata=dict(static=True))
    masks: dict | None = None
    rescale: dict | None = None

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


# Dense deltas whose trim thresholds are found together when preparing a library:
# adapters for global trimming, single matrices for per-tensor trimming (so a step's
# deltas stay in cache). They are the only dense [.., d_out, d_in] arrays it holds.
PREPARE_BATCH = 4


@jax.jit(static_argnames="config")
def _delta_thresholds(factors, scale, config: MergeConfig):
    """``{module: [N, L]}`` trim thresholds of every adapter's dense delta, a few
    adapters (global trimming) or matrices (per-tensor) at a time."""

    def thresholds(f, s):
        deltas = {m: lowrank.factors_to_delta(x["A"], x["B"], s)[None] for m, x in f.items()}
        if config.spec.sparsify == "breadcrumbs":
            found = kmerge.band_thresholds(deltas, config.density, config.gamma, config.trim)
        else:
            found = kmerge.trim_thresholds(deltas, config.density, config.trim)
        return jax.tree.map(lambda t: t[0], found)

    def each(f, s):
        return jax.lax.map(lambda args: thresholds(*args), (f, s), batch_size=PREPARE_BATCH)

    if config.trim == "global":
        return each(factors, scale)
    out = {}
    for m, x in factors.items():
        n, layers = x["A"].shape[:2]
        matrices = {k: v.reshape(n * layers, *v.shape[2:]) for k, v in x.items()}
        found = each({m: matrices}, jnp.repeat(scale, layers))[m]
        out[m] = found.reshape(n, layers, *found.shape[1:])
    return out


@jax.jit(static_argnames="config")
def _delta_della(factors, scale, key_data, config: MergeConfig):
    """DELLA's packed keep-masks ``{module: [N, L, d_out, ceil(d_in / 8)]}`` and L1
    rescalings ``{module: [N, L]}`` of every adapter's dense delta, one matrix at a
    time; matrix (module position, layer) of an adapter draws from its key as DARE."""
    keys = jax.random.wrap_key_data(key_data)
    masks, rescale = {}, {}
    for position, m in enumerate(sorted(factors)):
        x = factors[m]
        layers = x["A"].shape[1]

        def one(args, position=position):
            a, b, s, key, layer = args
            delta = lowrank.factors_to_delta(a, b, s)
            u = kmerge.della_uniform(key[None], position, layer, delta.shape)[0]
            keep, factor = kmerge.della_sparsify(delta, u, config.density, config.epsilon)
            return jnp.packbits(keep, axis=-1), factor

        n = x["A"].shape[0]
        args = (
            x["A"].reshape(n * layers, *x["A"].shape[2:]),
            x["B"].reshape(n * layers, *x["B"].shape[2:]),
            jnp.repeat(scale, layers),
            jnp.repeat(keys, layers),
            jnp.tile(jnp.arange(layers), n),
        )
        packed, factor = jax.lax.map(one, args, batch_size=PREPARE_BATCH)
        masks[m] = packed.reshape(n, layers, *packed.shape[1:])
        rescale[m] = factor.reshape(n, layers)
    return masks, rescale


@jax.jit(static_argnames="config")
def _sparse_factors(factors, keys, config: MergeConfig):
    return kmerge.prepare_factors(factors, config, keys)


def prepare(
    params: Mapping[str, Mapping[str, jax.Array]],
    scale: jax.Array,
    config: MergeConfig,
    *,
    names: Sequence[str],
) -> PreparedLibrary:
    """Make a stacked library ready to merge under `config`: trimming thresholds or
    DARE keys (delta space), or the sparsified factors (factor space).

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
    sparsify = config.spec.sparsify
    dare = sparsify == "dare"
    keys = adapter_keys(names, config.seed) if sparsify in ("dare", "della") else None
    sparse = thresholds = key_data = masks = rescale = None
    if config.spec.is_subspace:
        pass  # merged from the members' own factors; KnOTS trims per cluster
    elif config.space == "factor":
        sparse = _sparse_factors(factors, keys, _kernel_config(config))
    elif sparsify in ("magnitude", "breadcrumbs"):
        thresholds = _delta_thresholds(factors, scale, _kernel_config(config))
    elif sparsify == "della":
        masks, rescale = _delta_della(
            factors, scale, jax.random.key_data(keys), _kernel_config(config)
        )
    elif dare:
        key_data = jax.random.key_data(keys)
    return PreparedLibrary(
        factors=factors,
        sparse_factors=sparse,
        thresholds=thresholds,
        keys=key_data,
        scale=scale,
        weights=config_weights(config, n),
        config=config,
        rank=rank,
        masks=masks,
        rescale=rescale,
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


def _raw_deltas(prepared: PreparedLibrary, index: jax.Array, module: str, layer, rows) -> jax.Array:
    """``[C, R, d_in]`` unmerged deltas (scale folded in) of the members ``index [C]``
    at `layer`, output rows ``rows = (start, R)``."""
    f = prepared.factors[module]
    b = jax.lax.dynamic_slice_in_dim(f["B"][index, layer], rows[0], rows[1], axis=-2)
    return lowrank.factors_to_delta(f["A"][index, layer], b, prepared.scale[index])


def _sparsify_members(prepared, index, module_position: int, module: str, layer, delta, rows):
    """The members' prepared (trimmed / DARE-masked) deltas, as `kernels.merge.prepare_deltas`
    would hold them; `delta` holds output rows ``rows = (start, R)`` (DARE: all rows)."""
    config = prepared.config
    if prepared.thresholds is not None:
        thresholds = prepared.thresholds[module][index, layer]
        if config.spec.sparsify == "breadcrumbs":
            return jnp.where(kmerge.apply_band(delta, thresholds), delta, 0.0)
        keep = kmerge.apply_thresholds(delta, thresholds)
        return jnp.where(keep, delta, 0.0)
    if prepared.masks is not None:
        packed = jax.lax.dynamic_slice_in_dim(
            prepared.masks[module][index, layer], rows[0], rows[1], axis=-2
        )
        keep = jnp.unpackbits(packed, axis=-1, count=delta.shape[-1]).astype(bool)
        factor = prepared.rescale[module][index, layer][:, None, None]
        return jnp.where(keep, delta * factor, 0.0)
    if prepared.keys is not None:
        keys = jax.random.wrap_key_data(prepared.keys[index])
        keep = kmerge.dare_keep(keys, module_position, layer, delta.shape[-2:], config.density)
        return jnp.where(keep, delta / config.density, 0.0)
    return delta


# Bytes of the running member sums of one block of output rows: the blocks are
# sized so that the sums stay in cache while every member is added to them.
STREAM_BLOCK_BYTES = 8 << 20


def _block_rows(prepared: PreparedLibrary, clusters: int, d_out: int, d_in: int) -> int:
    """Output rows merged together: the largest divisor of `d_out` whose running
    sums fit `STREAM_BLOCK_BYTES` (DARE draws whole matrices: all rows)."""
    if prepared.keys is not None:
        return d_out
    statistics = kmerge.num_sums(prepared.config)
    fit = max(1, STREAM_BLOCK_BYTES // (4 * statistics * clusters * d_in))
    return max(r for r in range(1, min(fit, d_out) + 1) if d_out % r == 0)


def _merge_block(prepared, index, valid, position: int, module: str, layer, rows):
    """``[C, R, d_in]`` merged rows ``rows = (start, R)`` of one layer's matrix: the
    members are added one slot at a time to running `kernels.merge.member_sums`,
    so no ``[C, S, ...]`` member array exists and the work stops at the last slot
    in use."""
    config = prepared.config
    weights = prepared.weights[index]

    def member(slot):
        delta = _raw_deltas(prepared, index[:, slot], module, layer, rows)
        return delta, _sparsify_members(
            prepared, index[:, slot], position, module, layer, delta, rows
        )

    def add(slot, stats):
        members = member(slot)[1][:, None]
        new = kmerge.member_sums(members, valid[:, slot, None], weights[:, slot, None], config)
        return kmerge.add_sums(stats, new)

    first, first_members = member(0)
    stats = kmerge.member_sums(first_members[:, None], valid[:, :1], weights[:, :1], config)
    used = jnp.max(jnp.sum(valid, axis=1))  # members come first in each row (member_plan)
    stats = jax.lax.fori_loop(1, used, add, stats)
    merged = (
        kmerge.finish_sums(stats, config)
        * kmerge.cluster_factor(valid, weights, config)[:, None, None]
    )
    if config.singletons == "keep":
        merged = kmerge.keep_single_members({module: merged}, {module: first}, valid)[module]
    return merged


def _merge_matrix(prepared, index, valid, position: int, module: str, layer, rows: int):
    """``[C, d_out, d_in]`` merged matrix of one module at `layer`, `rows` output
    rows at a time."""
    clusters, d_out = index.shape[0], prepared.factors[module]["B"].shape[-2]
    d_in = prepared.factors[module]["A"].shape[-1]
    blocks = jax.lax.map(
        lambda start: _merge_block(prepared, index, valid, position, module, layer, (start, rows)),
        jnp.arange(0, d_out, rows),
    )  # [d_out / R, C, R, d_in]
    return jnp.moveaxis(blocks, 0, 1).reshape(clusters, d_out, d_in)


def _delta_space(prepared: PreparedLibrary, index: jax.Array, valid: jax.Array):
    """``{module: [C, L, d_out, d_in]}`` merged deltas, one layer and one block of
    output rows at a time (`_merge_block`)."""
    out = {}
    for position, module in enumerate(sorted(prepared.factors)):
        _, layers, d_out, _ = prepared.factors[module]["B"].shape
        d_in = prepared.factors[module]["A"].shape[-1]
        merge = functools.partial(
            _merge_matrix,
            prepared,
            index,
            valid,
            position,
            module,
            rows=_block_rows(prepared, index.shape[0], d_out, d_in),
        )
        out[module] = jnp.moveaxis(jax.lax.map(merge, jnp.arange(layers)), 0, 1)
    return out


def _factor_space(prepared: PreparedLibrary, index: jax.Array, valid: jax.Array):
    """``{module: {"A": [C, L, r, d_in], "B": [C, L, d_out, r]}}`` merged factors."""
    config = prepared.config
    members = jax.tree.map(lambda x: x[index], prepared.sparse_factors)
    scale = prepared.scale[index]
    merged = kmerge.combine_factor_members(members, scale, valid, prepared.weights[index], config)
    if config.singletons == "keep":
        # The first member unmerged, its scale split over A and B as the combine does.
        root = jnp.sqrt(jnp.abs(scale[:, 0])).reshape(-1, 1, 1, 1)
        sign = jnp.sign(scale[:, 0]).reshape(-1, 1, 1, 1)
        first = {
            m: {"A": f["A"][index[:, 0]] * sign * root, "B": f["B"][index[:, 0]] * root}
            for m, f in prepared.factors.items()
        }
        merged = kmerge.keep_single_members(merged, first, valid)
    return merged


def _subspace_space(prepared: PreparedLibrary, index: jax.Array, valid: jax.Array):
    """``{module: [C, L, d_out, d_in]}`` merged deltas of a subspace method (TSV-M,
    Iso-C / Iso-CTS, KnOTS: `kernels.merge.subspace_members`), one layer at a time
    from the members' factors; the merge then goes through the usual truncation
    back to rank r (TSV-M and Iso already keep only their top-r directions)."""
    config = prepared.config
    scale, weights = prepared.scale[index], prepared.weights[index]
    out = {}
    for module in sorted(prepared.factors):
        f = prepared.factors[module]

        def layer_merge(layer, f=f):
            a, b = f["A"][index, layer], f["B"][index, layer]  # [C, S, r, i], [C, S, o, r]
            merged = kmerge.subspace_members(a, b, scale, valid, weights, config, prepared.rank)
            if config.singletons == "keep":
                first = lowrank.factors_to_delta(a[:, 0], b[:, 0], scale[:, 0])
                merged = kmerge.keep_single_members(merged, first, valid)
            return merged

        layers = f["A"].shape[1]
        out[module] = jnp.moveaxis(jax.lax.map(layer_merge, jnp.arange(layers)), 0, 1)
    return out


def _combine(prepared: PreparedLibrary, index: jax.Array, valid: jax.Array):
    """Delta space: ``{m: [C, L, o, i]}``; factor space: ``{m: {"A", "B"}}`` [C, ...]."""
    if prepared.config.spec.is_subspace:
        return _subspace_space(prepared, index, valid)
    if prepared.config.space == "delta":
        return _delta_space(prepared, index, valid)
    return _factor_space(prepared, index, valid)


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
