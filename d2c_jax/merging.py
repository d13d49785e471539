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
to rank r by SVD (`kernels.lowrank`); factor space merges A and B with PEFT's
``add_weighted_adapter`` semantics and needs no SVD. Its dense delta is exactly
``B @ A`` of the merged factors, so in factor space "untruncated" and "deployed"
coincide.

The expensive, cluster-independent part (trimming / DARE masks) is done once by
`prepare`; `merged_deltas` / `merged_factors` then merge any membership mask. In
delta space the prepared library holds every adapter's dense delta: 4 bytes x N x
L x sum over modules of d_out x d_in (2.1 GB for 40 SmolLM2 q,v adapters).
DARE's random mask of an adapter depends only on ``MergeConfig.seed`` and the
adapter's name, so it is the same whichever library or subset the adapter sits in.

The command-line flags of a merge live in `d2c_jax.commands.merge_args`; the named
merge methods in `kernels.merge_methods`.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

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
    """A library sparsified for one MergeConfig; merge any membership mask from it.

    Attributes:
      tensors: delta space ``{module: [N, L, d_out, d_in]}`` (scale folded in);
        factor space ``{module: {"A": [N, L, r, d_in], "B": [N, L, d_out, r]}}``.
        Trimmed or DARE-masked, unweighted.
      factors: the library's own factors ``{module: {"A", "B"}}`` ``[N, ...]``, for
        one-member clusters under ``singletons="keep"``.
      scale: ``[N]`` LoRA scales of the inputs.
      weights: ``[N]`` per-adapter weights.
      config: the merge (static).
      rank: r of the merged adapters (the library's rank).
    """

    tensors: dict
    factors: dict
    scale: jax.Array
    weights: jax.Array
    config: MergeConfig = dataclasses.field(metadata=dict(static=True))
    rank: int = dataclasses.field(metadata=dict(static=True))


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


@jax.jit
def _library_deltas(params: LoraParams, scale: jax.Array) -> dict[str, jax.Array]:
    return {m: lowrank.factors_to_delta(f["A"], f["B"], scale) for m, f in params.items()}


def _kernel_config(config: MergeConfig) -> MergeConfig:
    """`config` without the fields kernels get as arrays (weights, seed -> keys).

    Jitted functions take this as their static config, so changing weights or the
    seed does not recompile.
    """
    return dataclasses.replace(config, weights=None, seed=0)


def _for_kernels(prepared: PreparedLibrary) -> PreparedLibrary:
    return dataclasses.replace(prepared, config=_kernel_config(prepared.config))


@jax.jit(static_argnames="config")
def _prepare_jit(tensors, keys, config: MergeConfig):
    if config.space == "delta":
        return kmerge.prepare_deltas(tensors, config, keys)
    return kmerge.prepare_factors(tensors, config, keys)


def prepare(
    params: Mapping[str, Mapping[str, jax.Array]],
    scale: jax.Array,
    config: MergeConfig,
    *,
    names: Sequence[str],
) -> PreparedLibrary:
    """Sparsify a stacked library once for `config` (trimming / DARE masks).

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
    weights = config_weights(config, n)
    keys = adapter_keys(names, config.seed) if config.spec.sparsify == "dare" else None
    if config.space == "delta":
        tensors = _library_deltas(dict(params), scale)
    else:
        tensors = {m: {"A": f["A"], "B": f["B"]} for m, f in params.items()}
    return PreparedLibrary(
        tensors=_prepare_jit(tensors, keys, _kernel_config(config)),
        factors={
            m: {"A": jnp.asarray(f["A"]), "B": jnp.asarray(f["B"])} for m, f in params.items()
        },
        scale=scale,
        weights=weights,
        config=config,
        rank=rank,
    )


def _check_membership(prepared: PreparedLibrary, membership: jax.Array) -> jax.Array:
    membership = jnp.asarray(membership)
    n = prepared.weights.shape[0]
    if membership.ndim != 2 or membership.shape[1] != n:
        raise ValueError(f"membership must be a [C, N={n}] mask, got shape {membership.shape}")
    return membership


def _combine(prepared: PreparedLibrary, membership: jax.Array):
    """Delta space: ``{m: [C, L, o, i]}``; factor space: ``{m: {"A", "B"}}`` [C, ...]."""
    config = prepared.config
    if config.space == "delta":
        combined = kmerge.combine_deltas(prepared.tensors, membership, prepared.weights, config)
    else:
        combined = kmerge.combine_factors(
            prepared.tensors, prepared.scale, membership, prepared.weights, config
        )
    if config.singletons == "keep":
        combined = kmerge.keep_single_members(
            combined, _member_tensors(prepared, membership), membership
        )
    return combined


def _member_tensors(prepared: PreparedLibrary, membership: jax.Array):
    """Each row's first member, unmerged, in the combined form (scale folded in)."""
    index = kmerge.first_member(membership)
    factors = jax.tree.map(lambda x: x[index], prepared.factors)
    scale = prepared.scale[index]
    if prepared.config.space == "delta":
        return {m: lowrank.factors_to_delta(f["A"], f["B"], scale) for m, f in factors.items()}
    # Split the scale over A and B as combine_factors does (PEFT's convention).
    root = jnp.sqrt(jnp.abs(scale)).reshape(-1, 1, 1, 1)
    sign = jnp.sign(scale).reshape(-1, 1, 1, 1)
    return {m: {"A": f["A"] * sign * root, "B": f["B"] * root} for m, f in factors.items()}


def _as_deltas(prepared: PreparedLibrary, combined) -> dict[str, dict[str, jax.Array]]:
    if prepared.config.space == "delta":
        return {m: {"delta": d} for m, d in combined.items()}
    return {m: {"delta": lowrank.factors_to_delta(f["A"], f["B"])} for m, f in combined.items()}


def _as_factors(prepared: PreparedLibrary, combined) -> LoraParams:
    if prepared.config.space == "factor":
        return combined
    factors = {m: lowrank.delta_to_factors(d, prepared.rank) for m, d in combined.items()}
    return {m: {"A": a, "B": b} for m, (a, b) in factors.items()}


@jax.jit
def _merged_deltas_jit(prepared: PreparedLibrary, membership: jax.Array):
    return _as_deltas(prepared, _combine(prepared, membership))


@jax.jit(static_argnames="with_delta")
def _merged_factors_jit(prepared: PreparedLibrary, membership: jax.Array, with_delta: bool):
    combined = _combine(prepared, membership)
    delta = _as_deltas(prepared, combined) if with_delta else None
    return _as_factors(prepared, combined), delta


def merged_deltas(
    prepared: PreparedLibrary, membership: jax.Array
) -> dict[str, dict[str, jax.Array]]:
    """Untruncated merged deltas ``{module: {"delta": [C, L, d_out, d_in]}}`` (scale folded in).

    In delta space this skips the SVD (what candidate scoring wants); in factor
    space it is exactly ``B @ A`` of the merged factors.
    """
    return _merged_deltas_jit(_for_kernels(prepared), _check_membership(prepared, membership))


def merged_factors(
    prepared: PreparedLibrary, membership: jax.Array, *, return_delta: bool = False
) -> MergedAdapters:
    """C merged rank-r adapters for the ``[C, N]`` mask (delta space: truncated SVD)."""
    membership = _check_membership(prepared, membership)
    params, delta = _merged_factors_jit(_for_kernels(prepared), membership, return_delta)
    return MergedAdapters(
        params=params, scale=jnp.ones((membership.shape[0],), jnp.float32), delta=delta
    )


def merge(
    params: Mapping[str, Mapping[str, jax.Array]],
    scale: jax.Array,
    membership: jax.Array,
    config: MergeConfig,
    *,
    names: Sequence[str],
    return_delta: bool = False,
) -> MergedAdapters:
    """Merge the members of each row of `membership` into one rank-r adapter.

    Args:
      params: ``{module: {"A": [N, L, r, d_in], "B": [N, L, d_out, r]}}``.
      scale: ``[N]`` LoRA scales.
      membership: ``[C, N]`` mask (float or bool); an empty row merges to zero.
      config: the merge.
      names: the N adapter names (seed DARE's masks).
      return_delta: also return the untruncated dense deltas.
    """
    prepared = prepare(params, scale, config, names=names)
    return merged_factors(prepared, membership, return_delta=return_delta)
