"""Batched model-merging kernels: TIES, linear, task arithmetic, DARE, magnitude prune.

Everything here is pure array math over pytrees whose leaves carry the adapter
axis N first. Cluster membership is a mask ``membership [C, N]`` (row c = the
members of cluster or candidate c, float or bool), so clusters of any size merge
in one call as masked reductions (matrix products over N), with no Python loop
over adapters or clusters and no recompilation when the membership changes.

Two stages, because trimming depends only on each adapter, never on the cluster:

1. *prepare* (once per adapter library and config): sparsify each adapter's task
   tensors: TIES / magnitude prune keep the top ``density`` fraction by magnitude,
   DARE keeps each entry with probability ``density`` and rescales by
   ``1 / density``; linear and task arithmetic keep everything.
2. *combine* (per membership mask, cheap): weighted sum, or the TIES sign
   election and disjoint mean, then a per-cluster factor ``lambda / D_c``.

Semantics (``x_n`` = prepared tensor of adapter n, ``w_n`` = its weight; sums
run over the members of cluster c):

Which method sparsifies how, votes on signs or not, and divides by what by
default is the registry `kernels.merge_methods.MERGE_METHODS`; the kernels dispatch
on those fields, never on a method's name.

- Weighted-sum methods (sign consensus "none": linear, task_arithmetic,
  magnitude_prune, dare_linear): ``merged_c = lambda / D_c * sum_n w_n x_n`` with
  ``D_c`` = 1 (divisor "none"), the member count ("count") or ``sum_n w_n`` ("weight").
- TIES methods (sign consensus "ties": ties, dare_ties): vote values ``v_n = x_n``
  ("unweighted", PEFT) or ``w_n x_n`` ("weighted", mergekit); elected sign ``e = +1`` where
  ``sum_n v_n >= 0`` ("total") or ``sum_n sign(v_n) >= 0`` ("frequency"), else
  -1; agreeing entries are those with ``sign(v_n) == e`` (zeros never agree);
  ``merged = lambda * sum_agree w_n x_n / D`` with ``D`` per entry = 1 ("none"),
  the number of agreeing members ("count", PEFT and the TIES paper; at least 1)
  or ``sum_agree w_n`` ("weight", mergekit; delta space only).

Spaces:

- delta space (`prepare_deltas`, `combine_deltas`): the task vector of adapter n
  is its dense ``scale_n * B_n @ A_n`` per module (``{module: [N, L, d_out, d_in]}``);
  truncating the result back to rank r is `kernels.lowrank`'s job.
- factor space (`prepare_factors`, `combine_factors`): PEFT
  ``add_weighted_adapter`` semantics (peft 0.21 ``_generalized_task_arithmetic_
  weighted_adapter``). A and B are merged as separate task tensors per module and
  layer: the weight of adapter n becomes ``sign(w_n s_n) sqrt(|w_n s_n|)`` on A
  and ``sqrt(|w_n s_n|)`` on B (s = LoRA scale); the per-cluster factor
  ``g = lambda / D_c`` is split the same way, so ``B @ A`` scales by g. The result
  has the input rank and scale 1 (PEFT writes ``lora_alpha = r``). Per-tensor
  trimming is per A or B matrix (PEFT); global trimming is per adapter over all
  modules and layers, separately for A and for B (their magnitudes are not
  comparable).

One-member clusters: with ``singletons="keep"`` (the default, PEFT's rule: its
``add_weighted_adapter`` switches a one-adapter merge to ``linear``) a cluster of
one adapter is that adapter, unchanged (`keep_single_members`); with ``"merge"``
(mergekit) it goes through the method like any cluster, so TIES trims it.

Trimming keeps ``k = int(density * size)`` entries (PEFT's rounding): the
largest magnitudes, selected by a threshold searched on the float bit patterns
(no sorting). Entries tied with the k-th largest magnitude are all kept, which
only differs from top-k when magnitudes repeat exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp

from kernels.merge_methods import DIVISORS, MergeMethod, get_method

SINGLETONS = ("keep", "merge")
SPACES = ("delta", "factor")
TRIMS = ("global", "per-tensor")
MAJORITIES = ("total", "frequency")
SIGN_VOTES = ("weighted", "unweighted")

Tree = Any  # a pytree of arrays


def _choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(options)}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """Every choice of a merge. Frozen and hashable: pass it as a static jit argument.

    Attributes:
      method: a name in `kernels.merge_methods.MERGE_METHODS` (ties, linear,
        task_arithmetic, dare_ties, dare_linear, magnitude_prune).
      space: "delta" (merge dense scale*B@A per module, then truncate to rank r) or
        "factor" (merge A and B separately, PEFT ``add_weighted_adapter`` semantics).
      density: fraction of entries kept: top-|x| for ties / magnitude_prune
        (in [0, 1]), keep probability for DARE (in (0, 1]). Required by those
        methods and must be None for linear / task_arithmetic.
      trim: scope of magnitude trimming: "per-tensor" (each module-layer matrix;
        PEFT, mergekit) or "global" (per adapter over all modules and layers; the
        TIES paper's code). Used by ties and magnitude_prune.
      majority: TIES sign election: "total" (sign of the sum of vote values) or
        "frequency" (sign of the count of positive minus negative entries).
      sign_vote: TIES vote values: "unweighted" (x_n, PEFT) or "weighted"
        (w_n x_n, mergekit); agreement is judged on the same values.
      divisor: "none", "count" or "weight" (see the module docstring); None picks
        the method's default (`MergeMethod.default_divisor`) and is resolved on construction,
        so a constructed config always holds the divisor it uses.
      lam: lambda, multiplies the merged task vector (B @ A in factor space).
      weights: per-adapter weights w_n (length N, in library order) or None for
        all ones. Divisor "weight" needs positive weights.
      seed: PRNG seed for DARE's random masks.
      singletons: "keep" (a one-member cluster is its adapter unchanged; PEFT) or
        "merge" (merged like any cluster, e.g. trimmed by TIES; mergekit).
    """

    method: str
    space: Literal["delta", "factor"] = "delta"
    density: float | None = None
    trim: Literal["global", "per-tensor"] = "per-tensor"
    majority: Literal["total", "frequency"] = "total"
    sign_vote: Literal["weighted", "unweighted"] = "unweighted"
    divisor: Literal["none", "count", "weight"] | None = None
    lam: float = 1.0
    weights: tuple[float, ...] | None = None
    seed: int = 0
    singletons: Literal["keep", "merge"] = "keep"

    def __post_init__(self):
        spec = get_method(self.method)
        _choice("singletons", self.singletons, SINGLETONS)
        _choice("space", self.space, SPACES)
        _choice("trim", self.trim, TRIMS)
        _choice("majority", self.majority, MAJORITIES)
        _choice("sign_vote", self.sign_vote, SIGN_VOTES)
        if self.divisor is None:
            object.__setattr__(self, "divisor", spec.default_divisor)
        _choice("divisor", self.divisor, DIVISORS)
        if self.sparsifies:
            if self.density is None:
                raise ValueError(f"density is required for method {self.method!r}")
            low_ok = self.density > 0 if spec.sparsify == "dare" else self.density >= 0
            if not (low_ok and self.density <= 1):
                raise ValueError(
                    f"density must be in {spec.density_interval} for {self.method!r}, "
                    f"got {self.density}"
                )
            object.__setattr__(self, "density", float(self.density))
        elif self.density is not None:
            raise ValueError(f"density does not apply to method {self.method!r}; leave it unset")
        if not math.isfinite(self.lam):
            raise ValueError(f"lambda must be finite, got {self.lam}")
        if self.weights is not None:
            weights = tuple(float(w) for w in self.weights)
            if not weights or not all(math.isfinite(w) for w in weights):
                raise ValueError(
                    f"weights must be a non-empty list of finite numbers, got {self.weights}"
                )
            if self.divisor == "weight" and min(weights) <= 0:
                raise ValueError(f"divisor 'weight' needs positive weights, got {list(weights)}")
            object.__setattr__(self, "weights", weights)
        if self.space == "factor" and self.is_ties and self.divisor == "weight":
            raise ValueError(
                "divisor 'weight' for TIES is defined in delta space only (in factor space the "
                "per-side weights carry the LoRA scale); use divisor 'count' or 'none'"
            )

    @property
    def spec(self) -> MergeMethod:
        """The registered method (`kernels.merge_methods`): sparsification, consensus."""
        return get_method(self.method)

    @property
    def is_ties(self) -> bool:
        return self.spec.consensus == "ties"

    @property
    def sparsifies(self) -> bool:
        return self.spec.needs_density

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly record of every field (for logs and result files)."""
        record = dataclasses.asdict(self)
        record["weights"] = list(self.weights) if self.weights is not None else None
        return record


# --------------------------------------------------------------------------- prepare


def _leading_size(tree: Tree) -> int:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError("expected a non-empty pytree of arrays")
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        shapes = [leaf.shape for leaf in leaves]
        raise ValueError(
            f"every leaf must have the same leading adapter axis N; got shapes {shapes}"
        )
    return sizes.pop()


# Trimming searches a threshold for each row (one matrix, or one adapter for global
# scope) with several counting passes; rows are processed a few at a time so those
# passes run in cache. Target bytes of the rows processed together:
TRIM_BLOCK_BYTES = 1 << 17


def _magnitude_bits(x: jax.Array) -> jax.Array:
    """int32 bit patterns of |x| as float32; they order exactly like the magnitudes."""
    return jax.lax.bitcast_convert_type(jnp.abs(x).astype(jnp.float32), jnp.int32)


def _top_k_threshold(bits: list[jax.Array], k: int) -> jax.Array:
    """A threshold t on the 1-D bit-pattern blocks `bits` of one row: keep ``bits >= t``.

    t keeps exactly k entries when some threshold does; otherwise (magnitudes tied
    at the boundary) t is the k-th largest value and all its ties are kept. Found
    without sorting by a bracket ``count(>= lo) >= k > count(>= hi)`` that shrinks
    by interpolating the count between lo and hi, with every fourth step a bisection
    so that it at least halves every four counting passes (typically 5 to 15 passes).
    Needs ``1 <= k < sum of block sizes``.
    """

    def count(t):
        return sum(jnp.sum(b >= t, dtype=jnp.int32) for b in bits)

    def searching(state):
        lo, hi, count_lo, _, _ = state
        return (count_lo != k) & (hi - lo > 1)

    def step(state):
        lo, hi, count_lo, count_hi, i = state
        width = hi - lo
        fraction = (count_lo - k).astype(jnp.float32) / (count_lo - count_hi).astype(jnp.float32)
        offset = jnp.clip(jnp.floor(width.astype(jnp.float32) * fraction), 1, width - 1)
        mid = jnp.where(i % 4 == 3, lo + width // 2, lo + offset.astype(jnp.int32))
        count_mid = count(mid)
        enough = count_mid >= k
        return (
            jnp.where(enough, mid, lo),
            jnp.where(enough, hi, mid),
            jnp.where(enough, count_mid, count_lo),
            jnp.where(enough, count_hi, count_mid),
            i + 1,
        )

    lo = functools.reduce(jnp.minimum, [b.min() for b in bits])
    hi = functools.reduce(jnp.maximum, [b.max() for b in bits]) + 1
    total = sum(b.size for b in bits)
    state = (lo, hi, jnp.int32(total), jnp.int32(0), jnp.int32(0))
    return jax.lax.while_loop(searching, step, state)[0]


def _keep_top(blocks: list[jax.Array], density: float) -> list[jax.Array]:
    """Boolean masks keeping the top `density` fraction of |x| in each row of `blocks`.

    `blocks` are ``[R, M_j]`` arrays sharing the row axis; each row keeps
    ``k = int(density * sum M_j)`` entries across all its blocks.
    """
    total = sum(b.shape[1] for b in blocks)
    k = int(density * total)
    if k >= total:
        return [jnp.ones(b.shape, bool) for b in blocks]
    if k == 0:
        return [jnp.zeros(b.shape, bool) for b in blocks]

    def row_masks(row_blocks):
        bits = [_magnitude_bits(b) for b in row_blocks]
        threshold = _top_k_threshold(bits, k)
        return [b >= threshold for b in bits]

    rows_per_step = max(1, TRIM_BLOCK_BYTES // (4 * total))
    return jax.lax.map(row_masks, blocks, batch_size=min(rows_per_step, blocks[0].shape[0]))


def trim_masks(tree: Tree, density: float, scope: Literal["global", "per-tensor"]) -> Tree:
    """Keep-masks of magnitude trimming, same structure and shapes as `tree`.

    Args:
      tree: pytree of ``[N, ..., m, n]`` leaves (adapter axis first, matrix last).
      density: fraction kept, in [0, 1]; ``k = int(density * size)`` entries are kept.
      scope: "per-tensor" trims each ``[m, n]`` matrix on its own; "global" trims
        per adapter over all entries of all leaves together.
    """
    _choice("trim", scope, TRIMS)
    leaves, treedef = jax.tree.flatten(tree)
    n = _leading_size(tree)
    if scope == "global":
        masks = _keep_top([leaf.reshape(n, -1) for leaf in leaves], density)
    else:
        for leaf in leaves:
            if leaf.ndim < 3:
                raise ValueError(
                    f"per-tensor trimming needs [N, ..., m, n] leaves, got {leaf.shape}"
                )
        masks = [
            _keep_top([leaf.reshape(-1, leaf.shape[-2] * leaf.shape[-1])], density)[0]
            for leaf in leaves
        ]
    masks = [mask.reshape(leaf.shape) for mask, leaf in zip(masks, leaves, strict=True)]
    return jax.tree.unflatten(treedef, masks)


def dare_masks(keys: jax.Array, tree: Tree, density: float) -> Tree:
    """DARE keep-masks: each entry kept independently with probability `density`.

    Args:
      keys: ``[N]`` typed PRNG keys (``jax.random.key``), one per adapter, so an
        adapter's mask depends on its own key only, not on the other adapters.
      tree: pytree of ``[N, ...]`` leaves. Adapter n draws one Bernoulli stream
        from ``keys[n]`` covering all its entries, split across the leaves in
        `jax.tree` flattening order (one draw per adapter keeps compilation cheap).
      density: keep probability in (0, 1].

    Returns:
      Boolean masks with the structure and shapes of `tree`.
    """
    leaves, treedef = jax.tree.flatten(tree)
    n = _leading_size(tree)
    if keys.shape != (n,) or not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        raise ValueError(
            f"keys must be {n} typed PRNG keys (jax.random.key), got {keys.shape} {keys.dtype}"
        )
    sizes = [math.prod(leaf.shape[1:]) for leaf in leaves]
    stream = jax.vmap(lambda key: jax.random.bernoulli(key, density, (sum(sizes),)))(keys)
    offsets = itertools.accumulate(sizes, initial=0)
    masks = [
        stream[:, start : start + size].reshape(leaf.shape)
        for start, size, leaf in zip(offsets, sizes, leaves, strict=False)
    ]
    return jax.tree.unflatten(treedef, masks)


def _sparsify(tree: Tree, config: MergeConfig, keys: jax.Array | None) -> Tree:
    if config.spec.sparsify == "magnitude":
        masks = trim_masks(tree, config.density, config.trim)
        return jax.tree.map(lambda x, m: jnp.where(m, x, 0), tree, masks)
    if config.spec.sparsify == "dare":
        if keys is None:
            raise ValueError(f"method {config.method!r} needs PRNG keys for its random masks")
        masks = dare_masks(keys, tree, config.density)
        return jax.tree.map(lambda x, m: jnp.where(m, x / config.density, 0), tree, masks)
    return tree


def prepare_deltas(
    deltas: Mapping[str, jax.Array], config: MergeConfig, keys: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Sparsify each adapter's dense task vector (once per library): delta-space stage 1.

    Args:
      deltas: ``{module: [N, L, d_out, d_in]}``, LoRA scale folded in.
      config: the merge; reads method, density, trim.
      keys: ``[N]`` typed PRNG keys, required by DARE methods.

    Returns:
      ``{module: [N, L, d_out, d_in]}``, trimmed / DARE-masked and unweighted.
    """
    return _sparsify(dict(deltas), config, keys)


def prepare_factors(
    factors: Mapping[str, Mapping[str, jax.Array]],
    config: MergeConfig,
    keys: jax.Array | None = None,
) -> dict[str, dict[str, jax.Array]]:
    """Sparsify each adapter's A and B (once per library): factor-space stage 1.

    Args:
      factors: ``{module: {"A": [N, L, r, d_in], "B": [N, L, d_out, r]}}`` (unscaled).
      config: the merge; reads method, density, trim.
      keys: ``[N]`` typed PRNG keys, required by DARE methods.

    Returns:
      The same structure, trimmed / DARE-masked; global trimming runs separately
      over all A's and over all B's of each adapter.
    """
    modules = sorted(factors)
    for m in modules:
        if set(factors[m]) != {"A", "B"}:
            raise ValueError(f"{m}: expected factors {{'A', 'B'}}, got {sorted(factors[m])}")
    if config.spec.sparsify == "dare":
        return _sparsify({m: dict(factors[m]) for m in modules}, config, keys)
    sides = {side: _sparsify({m: factors[m][side] for m in modules}, config, keys) for side in "AB"}
    return {m: {side: sides[side][m] for side in "AB"} for m in modules}


# --------------------------------------------------------------------------- combine


def _check_membership(membership: jax.Array, weights: jax.Array, n: int) -> jax.Array:
    if membership.ndim != 2 or membership.shape[1] != n:
        raise ValueError(f"membership must be [C, N] with N={n}, got shape {membership.shape}")
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {weights.shape}")
    return membership.astype(jnp.float32)


# TIES combines a [N, block] column slab at a time so that its temporaries (sign
# masks, positive and negative parts) stay in cache instead of costing several
# passes over [N, E] in memory; the target size of one slab in bytes:
TIES_BLOCK_BYTES = 1 << 18


def _ties_block(
    flat: jax.Array,
    membership: jax.Array,
    member_weights: jax.Array,
    vote_sign: jax.Array,
    config: MergeConfig,
) -> jax.Array:
    """TIES elect + disjoint mean of ``flat [N, E]`` for each row of ``membership [C, N]``."""
    signed = flat * vote_sign[:, None]  # sign(signed) == sign(vote value)
    pos = (signed > 0).astype(flat.dtype)
    neg = (signed < 0).astype(flat.dtype)
    if config.majority == "total":
        vote_weights = member_weights if config.sign_vote == "weighted" else membership
        vote = vote_weights @ flat
    else:
        vote = membership @ (pos - neg)
    elect_pos = vote >= 0  # [C, E]
    merged = jnp.where(elect_pos, member_weights @ (flat * pos), member_weights @ (flat * neg))
    if config.divisor == "count":
        count = jnp.where(elect_pos, membership @ pos, membership @ neg)
        merged = merged / jnp.maximum(count, 1.0)
    elif config.divisor == "weight":
        total = jnp.where(elect_pos, member_weights @ pos, member_weights @ neg)
        merged = merged / jnp.where(total == 0, 1.0, total)
    return merged


def _by_column_blocks(fn, flat: jax.Array, num_out: int, block: int) -> jax.Array:
    """``fn([N, b]) -> [C, b]`` applied to column blocks of ``flat [N, E]``; returns [C, E]."""
    e = flat.shape[1]
    if e <= block:
        return fn(flat)
    full = e // block

    def body(i, out):
        chunk = jax.lax.dynamic_slice_in_dim(flat, i * block, block, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(out, fn(chunk), i * block, axis=1)

    out = jax.lax.fori_loop(0, full, body, jnp.zeros((num_out, e), flat.dtype))
    if full * block < e:
        out = out.at[:, full * block :].set(fn(flat[:, full * block :]))
    return out


def _combine(tree: Tree, membership: jax.Array, weights: jax.Array, config: MergeConfig) -> Tree:
    """``{leaf: [N, ...]} -> {leaf: [C, ...]}``: weighted sum or TIES disjoint mean.

    Per-cluster factors (lambda / D_c) are applied by the callers.
    """
    member_weights = membership * weights[None, :]  # [C, N]
    num_out = membership.shape[0]

    def weighted_sum(x):
        return jnp.einsum("cn,n...->c...", member_weights, x)

    def ties(x):
        vote_sign = jnp.sign(weights) if config.sign_vote == "weighted" else jnp.ones_like(weights)
        block = max(128, TIES_BLOCK_BYTES // (x.dtype.itemsize * (x.shape[0] + num_out)))
        merged = _by_column_blocks(
            lambda chunk: _ties_block(chunk, membership, member_weights, vote_sign, config),
            x.reshape(x.shape[0], -1),
            num_out,
            block,
        )
        return merged.reshape((num_out,) + x.shape[1:])

    return jax.tree.map(ties if config.is_ties else weighted_sum, tree)


def cluster_factor(membership: jax.Array, weights: jax.Array, config: MergeConfig) -> jax.Array:
    """``[C]`` factor ``lambda / D_c`` applied to each merged cluster.

    ``D_c`` is the weighted-sum methods' divisor (1, member count, or sum of member
    weights; an empty cluster gets 1 and merges to zero); TIES divides per entry
    inside the combine, so its factor is lambda alone.
    """
    membership = _check_membership(membership, weights, weights.shape[0])
    if config.is_ties or config.divisor == "none":
        denominator = jnp.ones(membership.shape[0], jnp.float32)
    elif config.divisor == "count":
        denominator = membership.sum(axis=1)
    else:
        denominator = membership @ weights
    return config.lam / jnp.where(denominator == 0, 1.0, denominator)


def combine_deltas(
    prepared: Mapping[str, jax.Array],
    membership: jax.Array,
    weights: jax.Array,
    config: MergeConfig,
) -> dict[str, jax.Array]:
    """Merge prepared dense task vectors for every cluster: delta-space stage 2.

    Args:
      prepared: ``{module: [N, L, d_out, d_in]}`` from `prepare_deltas`.
      membership: ``[C, N]`` mask, row c = members of cluster c.
      weights: ``[N]`` per-adapter weights.
      config: the merge (static).

    Returns:
      ``{module: [C, L, d_out, d_in]}`` merged dense deltas (untruncated, scale 1).
    """
    n = _leading_size(prepared)
    membership = _check_membership(membership, weights, n)
    merged = _combine(dict(prepared), membership, weights, config)
    factor = cluster_factor(membership, weights, config)
    return {m: x * factor.reshape((-1,) + (1,) * (x.ndim - 1)) for m, x in merged.items()}


def combine_factors(
    prepared: Mapping[str, Mapping[str, jax.Array]],
    scale: jax.Array,
    membership: jax.Array,
    weights: jax.Array,
    config: MergeConfig,
) -> dict[str, dict[str, jax.Array]]:
    """Merge prepared LoRA factors for every cluster (PEFT semantics): factor-space stage 2.

    Args:
      prepared: ``{module: {"A": [N, L, r, d_in], "B": [N, L, d_out, r]}}`` from
        `prepare_factors`.
      scale: ``[N]`` LoRA scales (alpha / r, or alpha / sqrt(r) for rsLoRA).
      membership: ``[C, N]`` mask.
      weights: ``[N]`` per-adapter weights.
      config: the merge (static).

    Returns:
      ``{module: {"A": [C, L, r, d_in], "B": [C, L, d_out, r]}}`` with scale 1.
    """
    n = _leading_size(prepared)
    membership = _check_membership(membership, weights, n)
    if scale.shape != (n,):
        raise ValueError(f"scale must have shape ({n},), got {scale.shape}")
    scaled = weights * scale
    root = jnp.sqrt(jnp.abs(scaled))
    side_weights = {"A": jnp.where(scaled >= 0, root, -root), "B": root}
    factor = cluster_factor(membership, weights, config)
    factor_root = jnp.sqrt(jnp.abs(factor))
    side_factor = {"A": jnp.where(factor >= 0, factor_root, -factor_root), "B": factor_root}
    merged = {}
    for side in "AB":
        tree = {m: prepared[m][side] for m in prepared}
        out = _combine(tree, membership, side_weights[side], config)
        merged[side] = {
            m: x * side_factor[side].reshape((-1,) + (1,) * (x.ndim - 1)) for m, x in out.items()
        }
    return {m: {side: merged[side][m] for side in "AB"} for m in prepared}


def keep_single_members(merged: Tree, members: Tree, membership: jax.Array) -> Tree:
    """Rows of ``membership [C, N]`` with exactly one member take that member unchanged.

    Args:
      merged: combined tensors, leaves ``[C, ...]``.
      members: the same structure and shapes: each row's member's own (unmerged)
        tensors, e.g. gathered at `first_member`.
      membership: ``[C, N]`` mask.
    """
    single = (membership != 0).sum(axis=-1) == 1
    return jax.tree.map(
        lambda m, o: jnp.where(single.reshape((-1,) + (1,) * (m.ndim - 1)), o.astype(m.dtype), m),
        merged,
        members,
    )


def first_member(membership: jax.Array) -> jax.Array:
    """``[C]`` index of the first member of each row of ``membership [C, N]``."""
    return jnp.argmax(membership != 0, axis=-1)
