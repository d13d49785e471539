"""Batched model-merging kernels: TIES, linear, task arithmetic, DARE, DELLA,
breadcrumbs, magnitude prune, and the subspace merges (TSV-M, Iso-C / Iso-CTS, KnOTS).

Everything here is pure array math over pytrees whose leaves carry the adapter
axis N first; `d2c_jax.merging` only plans (member lists, groups of rows) and
calls these. A batch of C clusters (or candidates) is given by its members:
``index [C, S]`` into the library with ``valid [C, S]`` marking the slots in use,
so a merge reduces over a cluster's S members, not over the library, with no
Python loop over adapters or clusters.

Two stages, because sparsifying depends only on each adapter, never on the cluster:

1. *prepare* (once per adapter library and config): each sparsification of the
   registry `SPARSIFIERS` finds a small state per matrix (a magnitude threshold,
   a band, a PRNG key, a packed mask). Factor space applies it to A and B at once
   (`prepare_factors`); delta space keeps only the state (`prepare_delta_state`),
   never the dense deltas.
2. *combine* (per member list, cheap): weighted sum, or the TIES sign election
   and disjoint mean, then a per-cluster factor ``lambda / D_c``. Delta space
   streams (`merge_member_deltas`): each member's delta is recomputed from its
   factors, sparsified by its state and added to running sums (`member_sums`,
   `add_sums`, `finish_sums`); factor space gathers the sparsified factors
   (`merge_member_factors`); subspace methods merge whole member matrices
   (`merge_member_subspace`).

Which method sparsifies how, votes on signs or not, and divides by what by
default is the registry `kernels.merge_methods.MERGE_METHODS`; the kernels dispatch
on those fields, never on a method's name.

Semantics (``x_n`` = sparsified tensor of adapter n, ``w_n`` = its weight; sums
run over the members of cluster c):

- Sparsifications: ``magnitude`` keeps the top ``density`` fraction by |x| (TIES,
  magnitude prune), ``dare`` keeps each entry with probability ``density`` and
  rescales by ``1 / density``, ``della`` and ``breadcrumbs`` as
  `kernels.merge_methods` says; ``none`` keeps everything.
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

- delta space (`prepare_delta_state`, `merge_member_deltas`): the task vector of
  adapter n is its dense ``scale_n * B_n @ A_n`` per module (``[N, L, d_out,
  d_in]``); truncating the result back to rank r is `kernels.lowrank`'s job.
- factor space (`prepare_factors`, `merge_member_factors`): PEFT
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
(no sorting). Thresholds are per matrix (`trim_thresholds`), so a caller can keep
them instead of the trimmed tensors and trim any member again on the fly
(`apply_thresholds`); DARE's masks are likewise redrawn per matrix from the
matrix's key (`matrix_keys`). Entries tied with the k-th largest magnitude are all
kept, which only differs from top-k when magnitudes repeat exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from kernels import lowrank
from kernels.merge_methods import DIVISORS, PARAM_DEFAULTS, MergeMethod, get_method

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
      gamma: breadcrumbs: fraction of the largest magnitudes dropped (default 0.01).
      epsilon: DELLA: spread of the keep probabilities around ``density``
        (default 0.15; ``density +- epsilon`` must lie in (0, 1) unless density is 1).
      common_fraction: Iso-CTS: fraction of ``min(d_out, d_in)`` given to the
        common subspace (default 0.8).
      sv_fraction: TSV-M: fraction of ``min(d_out, d_in)`` singular vectors each
        member keeps; None (default) is 1 / (the cluster's member count).
      The last four are None unless the method reads them (`MergeMethod.params`);
      None resolves to the method's default on construction.
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
    gamma: float | None = None
    epsilon: float | None = None
    common_fraction: float | None = None
    sv_fraction: float | None = None

    def __post_init__(self):
        spec = get_method(self.method)
        self._check_params(spec)
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
            low_ok = self.density > 0 if spec.sparsify in ("dare", "della") else self.density >= 0
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
        if spec.is_subspace:
            if self.space != "delta":
                raise ValueError(
                    f"{self.method!r} merges whole matrices in a subspace: space must be 'delta'"
                )
            if spec.subspace != "knots" and self.divisor != "none":
                raise ValueError(f"{self.method!r} takes no divisor; leave it unset")
            if spec.subspace == "knots" and self.trim != "per-tensor":
                raise ValueError(
                    "knots trims its coefficients per matrix (the aligned basis is per cluster "
                    "and layer): trim must be 'per-tensor'"
                )
        if spec.sparsify == "della" and self.density < 1:
            if not (0 < self.density - self.epsilon and self.density + self.epsilon < 1):
                raise ValueError(
                    f"epsilon must keep density +- epsilon in (0, 1); got density "
                    f"{self.density}, epsilon {self.epsilon}"
                )
        if self.space == "factor" and self.is_ties and self.divisor == "weight":
            raise ValueError(
                "divisor 'weight' for TIES is defined in delta space only (in factor space the "
                "per-side weights carry the LoRA scale); use divisor 'count' or 'none'"
            )

    def _check_params(self, spec: MergeMethod) -> None:
        """Fill in the defaults of the method's extra parameters; refuse the others."""
        for name, default in PARAM_DEFAULTS.items():
            value = getattr(self, name)
            if name not in spec.params:
                if value is not None:
                    raise ValueError(
                        f"{name} does not apply to method {self.method!r}; leave it unset"
                    )
                continue
            value = default if value is None else float(value)
            if value is not None:
                low_open = name in ("sv_fraction",)
                if not math.isfinite(value) or not (
                    (value > 0 if low_open else value >= 0) and value <= 1
                ):
                    interval = "(0, 1]" if low_open else "[0, 1]"
                    raise ValueError(f"{name} must be in {interval}, got {value}")
            object.__setattr__(self, name, value)

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
    by interpolating the count between lo and hi (regula falsi, Illinois variant),
    with every `BISECT_EVERY`-th step a bisection (typically 8 to 18 passes).
    Needs ``1 <= k < sum of block sizes``.
    """

    def count(t):
        return sum(jnp.sum(b >= t, dtype=jnp.int32) for b in bits)

    def searching(state):
        lo, hi, count_lo = state[:3]
        return (count_lo != k) & (hi - lo > 1)

    def step(state):
        lo, hi, count_lo, count_hi, excess_lo, excess_hi, moved_lo, i = state
        width = hi - lo
        offset = jnp.floor(width.astype(jnp.float32) * excess_lo / (excess_lo - excess_hi))
        offset = jnp.clip(offset, 1, width - 1).astype(jnp.int32)
        mid = jnp.where(i % BISECT_EVERY == BISECT_EVERY - 1, lo + width // 2, lo + offset)
        count_mid = count(mid)
        enough = count_mid >= k
        excess_mid = (count_mid - k).astype(jnp.float32)
        # Illinois: an end kept twice in a row has its weight halved, so the
        # interpolation stops creeping from one side when the count is curved.
        return (
            jnp.where(enough, mid, lo),
            jnp.where(enough, hi, mid),
            jnp.where(enough, count_mid, count_lo),
            jnp.where(enough, count_hi, count_mid),
            jnp.where(enough, excess_mid, jnp.where(moved_lo, excess_lo, excess_lo / 2)),
            jnp.where(enough, jnp.where(moved_lo, excess_hi / 2, excess_hi), excess_mid),
            enough,
            i + 1,
        )

    lo = functools.reduce(jnp.minimum, [b.min() for b in bits])
    hi = functools.reduce(jnp.maximum, [b.max() for b in bits]) + 1
    total = sum(b.size for b in bits)
    excess = (jnp.float32(total - k), jnp.float32(-k))
    state = (lo, hi, jnp.int32(total), jnp.int32(0), *excess, jnp.bool_(False), jnp.int32(0))
    return jax.lax.while_loop(searching, step, state)[0]


# Every BISECT_EVERY-th step of the threshold search halves the bracket, bounding the
# search at 31 * BISECT_EVERY counting passes whatever the magnitudes.
BISECT_EVERY = 8


def _row_thresholds_k(blocks: list[jax.Array], k: int) -> jax.Array:
    """``[R]`` int32 thresholds on magnitude bit patterns keeping the top `k` (static)
    entries of each row of `blocks` (keep ``bits >= threshold``).

    `blocks` are ``[R, M_j]`` magnitude bit patterns (`_magnitude_bits`) sharing the
    row axis; each row keeps k entries across all its blocks.
    """
    rows = blocks[0].shape[0]
    total = sum(b.shape[1] for b in blocks)
    if k >= total:
        return jnp.zeros((rows,), jnp.int32)  # every bit pattern of |x| is >= 0
    if k <= 0:
        return jnp.full((rows,), KEEP_NONE, jnp.int32)

    def row_threshold(row_blocks):
        return _top_k_threshold(row_blocks, k)

    if rows == 1:  # no map: it would add a size-1 axis to every counting pass
        return row_threshold([b[0] for b in blocks])[None]
    rows_per_step = max(1, TRIM_BLOCK_BYTES // (4 * total))
    return jax.lax.map(row_threshold, blocks, batch_size=min(rows_per_step, rows))


# Above the bit pattern of every finite float32 magnitude and of inf: keeps nothing.
KEEP_NONE = np.iinfo(np.int32).max


def trim_thresholds(tree: Tree, density: float, scope: Literal["global", "per-tensor"]) -> Tree:
    """Magnitude-trimming thresholds, one per matrix: leaves ``[N, ...]`` (the leaf's
    shape without its last two axes), int32 bit patterns of |x| (keep ``bits >= t``).

    Trimming depends only on the adapter, so a library's thresholds are found once
    and a merge can recompute any member's trimmed tensor from its factors
    (`apply_thresholds`) instead of holding every trimmed dense delta.

    Args:
      tree: pytree of ``[N, ..., m, n]`` leaves (adapter axis first, matrix last).
      density: fraction kept, in [0, 1]; ``k = int(density * size)`` entries are kept.
      scope: "per-tensor" trims each ``[m, n]`` matrix on its own; "global" trims
        per adapter over all entries of all leaves together (every matrix of an
        adapter then shares its threshold).
    """
    return _scoped_thresholds(tree, scope, lambda total: int(density * total))


def _scoped_thresholds(tree: Tree, scope: str, top_k) -> Tree:
    """Per-matrix thresholds keeping the ``top_k(entries)`` largest magnitudes of each
    matrix ("per-tensor") or of each adapter ("global"); see `trim_thresholds`."""
    _choice("trim", scope, TRIMS)
    leaves, treedef = jax.tree.flatten(tree)
    n = _leading_size(tree)
    for leaf in leaves:
        if leaf.ndim < 3:
            raise ValueError(f"trimming needs [N, ..., m, n] leaves, got {leaf.shape}")
    # Bit patterns before the reshape: XLA then computes them once per matrix
    # instead of in every counting pass (1.3x faster trimming of dense deltas).
    shapes = [leaf.shape for leaf in leaves]
    leaves = [_magnitude_bits(leaf) for leaf in leaves]
    if scope == "global":
        blocks = [leaf.reshape(n, -1) for leaf in leaves]
        per_adapter = _row_thresholds_k(blocks, top_k(sum(b.shape[1] for b in blocks)))
        thresholds = [
            jnp.broadcast_to(per_adapter.reshape((n,) + (1,) * (len(shape) - 3)), shape[:-2])
            for shape in shapes
        ]
    else:
        thresholds = [
            _row_thresholds_k(
                [leaf.reshape(-1, leaf.shape[-2] * leaf.shape[-1])],
                top_k(leaf.shape[-2] * leaf.shape[-1]),
            ).reshape(leaf.shape[:-2])
            for leaf in leaves
        ]
    return jax.tree.unflatten(treedef, thresholds)


def breadcrumb_counts(total: int, density: float, gamma: float) -> tuple[int, int]:
    """``(k_low, k_high)`` of Model Breadcrumbs over `total` entries (mergekit
    ``magnitude_outliers``): keep the ``k_low`` largest magnitudes except the
    ``k_high`` largest.

    mergekit keeps ``target = int(density * total)`` entries after dropping the
    ``int(gamma * total)`` largest, dropping fewer outliers when both do not fit;
    ``density >= 1`` keeps everything (outliers included).
    """
    if density >= 1:
        return total, 0
    target, top = int(density * total), int(gamma * total)
    bottom = max(0, total - target - top)
    return total - bottom, total - bottom - target


def band_thresholds(
    tree: Tree, density: float, gamma: float, scope: Literal["global", "per-tensor"]
) -> Tree:
    """Model Breadcrumbs thresholds, one pair per matrix: leaves ``[N, ..., 2]`` int32
    bit patterns ``(low, high)``; keep ``low <= bits < high`` (`apply_band`).

    Args:
      tree: pytree of ``[N, ..., m, n]`` leaves.
      density: fraction kept after the outliers are dropped (`breadcrumb_counts`).
      gamma: fraction of the largest magnitudes dropped.
      scope: "per-tensor" (mergekit) or "global" (per adapter), as `trim_thresholds`.
    """
    low = _scoped_thresholds(tree, scope, lambda t: breadcrumb_counts(t, density, gamma)[0])
    high = _scoped_thresholds(tree, scope, lambda t: breadcrumb_counts(t, density, gamma)[1])
    # Keeping the top 0 gives KEEP_NONE, above every finite magnitude: no outlier
    # is dropped then, since the upper bound is exclusive.
    return jax.tree.map(lambda lo, hi: jnp.stack([lo, hi], axis=-1), low, high)


def apply_band(x: jax.Array, thresholds: jax.Array) -> jax.Array:
    """Keep-mask of ``x [..., m, n]`` under per-matrix `band_thresholds` ``[..., 2]``."""
    bits = _magnitude_bits(x)
    return (bits >= thresholds[..., 0, None, None]) & (bits < thresholds[..., 1, None, None])


def apply_thresholds(x: jax.Array, thresholds: jax.Array) -> jax.Array:
    """Keep-mask of ``x [..., m, n]`` under per-matrix `thresholds` ``[...]``."""
    return _magnitude_bits(x) >= thresholds[..., None, None]


def trim_masks(tree: Tree, density: float, scope: Literal["global", "per-tensor"]) -> Tree:
    """Keep-masks of magnitude trimming, same structure and shapes as `tree`
    (see `trim_thresholds` for the arguments)."""
    return jax.tree.map(apply_thresholds, tree, trim_thresholds(tree, density, scope))


def matrix_keys(keys: jax.Array, tree: Tree) -> Tree:
    """The PRNG key of every matrix of `tree`: leaves ``[N, ...]`` uint32 key data.

    Matrix `i` (flat index over a leaf's axes between the adapter axis and the
    matrix) of leaf `j` (position in `jax.tree` flattening order) of adapter n draws
    from ``fold_in(fold_in(keys[n], j), i)``: it depends on nothing but the
    adapter's key and the matrix's place, so an adapter's masks are the same in any
    library or subset it sits in.

    Args:
      keys: ``[N]`` typed PRNG keys (``jax.random.key``), one per adapter.
      tree: pytree of ``[N, ..., m, n]`` leaves (only their shapes are read).
    """
    leaves, treedef = jax.tree.flatten(tree)
    n = _leading_size(tree)
    if keys.shape != (n,) or not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        raise ValueError(
            f"keys must be {n} typed PRNG keys (jax.random.key), got {keys.shape} {keys.dtype}"
        )
    out = []
    for j, leaf in enumerate(leaves):
        if leaf.ndim < 3:
            raise ValueError(f"random masks need [N, ..., m, n] leaves, got {leaf.shape}")
        count = math.prod(leaf.shape[1:-2])

        def fold(key, j=j, count=count):
            leaf_key = jax.random.fold_in(key, j)
            return jax.vmap(lambda i: jax.random.fold_in(leaf_key, i))(jnp.arange(count))

        folded = jax.vmap(fold)(keys)  # [N, count]
        out.append(jax.random.key_data(folded.reshape(leaf.shape[:-2])))
    return jax.tree.unflatten(treedef, out)


def _draws(key_data: jax.Array, draw) -> jax.Array:
    """``draw(key)`` for each matrix key of ``key_data [..., 2]``: ``[..., *shape]``."""
    keys = jax.random.wrap_key_data(key_data)
    out = jax.vmap(draw)(keys.reshape(-1))
    return out.reshape(keys.shape + out.shape[1:])


def dare_masks(keys: jax.Array, tree: Tree, density: float) -> Tree:
    """DARE keep-masks: each entry kept independently with probability `density`.

    Args:
      keys: ``[N]`` typed PRNG keys, one per adapter (`matrix_keys` gives each
        ``[m, n]`` matrix its own stream).
      tree: pytree of ``[N, ..., m, n]`` leaves.
      density: keep probability in (0, 1].

    Returns:
      Boolean masks with the structure and shapes of `tree`.
    """
    return jax.tree.map(
        lambda x, k: _dare_keep(k, x.shape[-2:], density), tree, matrix_keys(keys, tree)
    )


def _dare_keep(key_data: jax.Array, shape, density: float) -> jax.Array:
    return _draws(key_data, lambda k: jax.random.bernoulli(k, density, tuple(shape)))


def della_probabilities(x: jax.Array, density: float, epsilon: float) -> jax.Array:
    """DELLA MagPrune keep probabilities of ``x [..., m, n]`` (mergekit ``della_magprune``).

    Each row's entries are ranked by |x| ascending (1 .. n, ties in index order),
    and entry j keeps with probability ``density - epsilon + 2 epsilon (rank_j - 1)
    / (n - 1)``: the largest magnitudes are the likeliest kept.
    """
    magnitudes = jnp.abs(x)
    ranks = jnp.argsort(jnp.argsort(magnitudes, axis=-1, stable=True), axis=-1, stable=True)
    n = x.shape[-1]
    rank_norm = jnp.clip(ranks.astype(jnp.float32) / max(n - 1, 1), 0.0, 1.0)
    return (density - epsilon) + rank_norm * (2 * epsilon)


def della_uniform(key_data: jax.Array, shape) -> jax.Array:
    """Uniform draws ``[..., *shape]`` in [0, 1) deciding DELLA's masks, one matrix
    per key of ``key_data [..., 2]`` (from `matrix_keys`)."""
    return _draws(key_data, lambda k: jax.random.uniform(k, tuple(shape), jnp.float32))


# mergekit's ``rescaled_masked_tensor``: no rescaling when either L1 norm is below this.
RESCALE_EPS = 1e-7


def della_sparsify(
    x: jax.Array, uniform: jax.Array, density: float, epsilon: float
) -> tuple[jax.Array, jax.Array]:
    """DELLA on ``x [..., m, n]`` given its draws ``uniform [..., m, n]`` in [0, 1).

    Returns ``(keep [..., m, n] bool, rescale [...])``: an entry is kept where
    ``uniform < della_probabilities`` (what ``torch.bernoulli`` does), and each
    matrix is then multiplied by ``||x||_1 / ||x * keep||_1`` (mergekit's default
    ``rescale``: L1 norm; 1 where either norm is below `RESCALE_EPS`). ``density >= 1``
    keeps everything unscaled.
    """
    if density >= 1:
        return jnp.ones(x.shape, bool), jnp.ones(x.shape[:-2], x.dtype)
    keep = uniform < della_probabilities(x, density, epsilon)
    before = jnp.sum(jnp.abs(x), axis=(-2, -1))
    after = jnp.sum(jnp.where(keep, jnp.abs(x), 0.0), axis=(-2, -1))
    small = (before < RESCALE_EPS) | (after < RESCALE_EPS)
    return keep, jnp.where(small, 1.0, before / jnp.where(small, 1.0, after))


# --------------------------------------------------------------------------- sparsifiers
#
# Every sparsification is two functions, so each is written once for both spaces
# and for the streamed merge:
#
#   prepare(tree, key_data, config) -> state: once per library. `tree` has leaves
#     [N, ..., m, n]; `key_data` is `matrix_keys` of it (random sparsifiers, else
#     None); the state has `tree`'s structure with, in place of each leaf, arrays
#     leading with its matrix axes [N, ...] (a threshold, a band, a key, a packed
#     mask: never a dense tensor).
#   apply(x, state, config, rows) -> x sparsified: x [..., R, n] holds output rows
#     ``rows = (start, R)`` of matrices whose state (leaves [...]) is given.
#
# Factor space applies them to the library's A and B once (`sparsify`); delta space
# prepares from each adapter's dense delta a few at a time (`prepare_delta_state`)
# and applies them to each member's recomputed delta in the stream (`member_deltas`).


@dataclasses.dataclass(frozen=True)
class Sparsifier:
    """One entry of `SPARSIFIERS` (see the comment above for `prepare` and `apply`).

    Attributes:
      scoped: its state depends on `MergeConfig.trim` ("global": a whole adapter).
      random: it draws from per-matrix PRNG keys.
      reads_tensors: `prepare` reads the tensors (not only their shapes and keys).
      whole_rows: `apply` needs every row of a matrix at once.
    """

    prepare: Callable[[Tree, Tree | None, MergeConfig], Tree]
    apply: Callable[[jax.Array, Any, MergeConfig, tuple], jax.Array]
    scoped: bool = False
    random: bool = False
    reads_tensors: bool = True
    whole_rows: bool = False


def _rows(x: jax.Array, rows: tuple) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, rows[0], rows[1], axis=-2)


def _della_prepare(tree, key_data, config):
    def one(x, k):
        keep, rescale = della_sparsify(
            x, della_uniform(k, x.shape[-2:]), config.density, config.epsilon
        )
        # 8 entries a byte: DELLA's ranks need a sort too costly to redo per member
        # and merge, so its masks are drawn once and kept (1/32 of the deltas' bytes).
        return jnp.packbits(keep, axis=-1), rescale

    return jax.tree.map(one, tree, key_data)


def _della_apply(x, state, config, rows):
    packed, rescale = state
    keep = jnp.unpackbits(_rows(packed, rows), axis=-1, count=x.shape[-1]).astype(bool)
    return jnp.where(keep, x * rescale[..., None, None], 0.0)


SPARSIFIERS = {
    "none": Sparsifier(
        prepare=lambda tree, key_data, config: jax.tree.map(lambda _: (), tree),
        apply=lambda x, state, config, rows: x,
        reads_tensors=False,
    ),
    "magnitude": Sparsifier(
        prepare=lambda tree, key_data, config: trim_thresholds(tree, config.density, config.trim),
        apply=lambda x, t, config, rows: jnp.where(apply_thresholds(x, t), x, 0.0),
        scoped=True,
    ),
    "breadcrumbs": Sparsifier(
        prepare=lambda tree, key_data, config: band_thresholds(
            tree, config.density, config.gamma, config.trim
        ),
        apply=lambda x, bands, config, rows: jnp.where(apply_band(x, bands), x, 0.0),
        scoped=True,
    ),
    "dare": Sparsifier(
        prepare=lambda tree, key_data, config: key_data,
        apply=lambda x, k, config, rows: jnp.where(
            _dare_keep(k, x.shape[-2:], config.density), x / config.density, 0.0
        ),
        random=True,
        reads_tensors=False,
        whole_rows=True,
    ),
    "della": Sparsifier(prepare=_della_prepare, apply=_della_apply, random=True),
}


def sparsifier(config: MergeConfig) -> Sparsifier:
    """The `SPARSIFIERS` entry of the config's method."""
    return SPARSIFIERS[config.spec.sparsify]


def _key_data(spec: Sparsifier, tree: Tree, config: MergeConfig, keys: jax.Array | None):
    if not spec.random:
        return None
    if keys is None:
        raise ValueError(f"method {config.method!r} needs PRNG keys for its random masks")
    return matrix_keys(keys, tree)


def sparsify(tree: Tree, config: MergeConfig, keys: jax.Array | None = None) -> Tree:
    """Each adapter's tensors sparsified whole: leaves ``[N, ..., m, n]`` in and out
    (trimmed / masked and rescaled, unweighted).

    Args:
      tree: pytree of ``[N, ..., m, n]`` leaves.
      config: the merge; reads method, density, trim and the method's parameters.
      keys: ``[N]`` typed PRNG keys, required by the random sparsifiers.
    """
    spec = sparsifier(config)
    state = spec.prepare(tree, _key_data(spec, tree, config, keys), config)
    return jax.tree.map(lambda x, s: spec.apply(x, s, config, (0, x.shape[-2])), tree, state)


def prepare_factors(
    factors: Mapping[str, Mapping[str, jax.Array]],
    config: MergeConfig,
    keys: jax.Array | None = None,
) -> dict[str, dict[str, jax.Array]]:
    """Sparsify each adapter's A and B (once per library): factor-space stage 1.

    Args:
      factors: ``{module: {"A": [N, L, r, d_in], "B": [N, L, d_out, r]}}`` (unscaled).
      config: the merge; reads method, density, trim.
      keys: ``[N]`` typed PRNG keys, required by the random sparsifiers.

    Returns:
      The same structure, trimmed / DARE-masked; global trimming runs separately
      over all A's and over all B's of each adapter.
    """
    modules = sorted(factors)
    for m in modules:
        if set(factors[m]) != {"A", "B"}:
            raise ValueError(f"{m}: expected factors {{'A', 'B'}}, got {sorted(factors[m])}")
    if sparsifier(config).random:  # one tree: A and B of a module draw distinct streams
        return sparsify({m: dict(factors[m]) for m in modules}, config, keys)
    sides = {side: sparsify({m: factors[m][side] for m in modules}, config, keys) for side in "AB"}
    return {m: {side: sides[side][m] for side in "AB"} for m in modules}


# Dense deltas whose sparsifier state is found together when preparing a library:
# adapters for global trimming, single matrices otherwise (so a step's deltas stay
# in cache). They are the only dense [.., d_out, d_in] arrays preparing holds.
PREPARE_BATCH = 4


def prepare_delta_state(
    factors: Mapping[str, Mapping[str, jax.Array]],
    scale: jax.Array,
    config: MergeConfig,
    keys: jax.Array | None = None,
) -> dict[str, Any]:
    """Delta-space stage 1 without the dense deltas: the sparsifier's state of every
    adapter's ``scale_n * B_n @ A_n``, each delta formed only while its state is found.

    Args:
      factors: ``{module: {"A": [N, L, r, d_in], "B": [N, L, d_out, r]}}``.
      scale: ``[N]`` LoRA scales.
      config: the merge (static).
      keys: ``[N]`` typed PRNG keys, required by the random sparsifiers.

    Returns:
      ``{module: state}`` with state leaves ``[N, L, ...]`` (see `SPARSIFIERS`).
    """
    spec = sparsifier(config)
    shapes = {
        m: jax.ShapeDtypeStruct(f["B"].shape[:-1] + f["A"].shape[-1:], jnp.float32)
        for m, f in factors.items()
    }
    key_data = _key_data(spec, shapes, config, keys)
    if not spec.reads_tensors:
        return spec.prepare(shapes, key_data, config)

    def state_of(f, s, k):  # one adapter (global scope) or one matrix, as a batch of one
        deltas = {m: lowrank.factors_to_delta(x["A"], x["B"], s)[None] for m, x in f.items()}
        k = None if k is None else jax.tree.map(lambda d: d[None], k)
        return jax.tree.map(lambda t: t[0], spec.prepare(deltas, k, config))

    def each(f, s, k):
        return jax.lax.map(lambda args: state_of(*args), (f, s, k), batch_size=PREPARE_BATCH)

    if spec.scoped and config.trim == "global":
        return each(dict(factors), scale, key_data)
    out = {}
    for m, x in factors.items():
        n, layers = x["A"].shape[:2]
        matrices = {side: f.reshape(n * layers, *f.shape[2:]) for side, f in x.items()}
        matrix_keys_ = None if key_data is None else {m: key_data[m].reshape(n * layers, -1)}
        found = each({m: matrices}, jnp.repeat(scale, layers), matrix_keys_)[m]
        out[m] = jax.tree.map(
            lambda t, n=n, layers=layers: t.reshape(n, layers, *t.shape[1:]), found
        )
    return out


# --------------------------------------------------------------------------- combine


def member_sums(
    x: jax.Array, valid: jax.Array, weights: jax.Array, config: MergeConfig
) -> dict[str, jax.Array]:
    """Sums over the member axis that determine the combine: ``x [C, S, ...]`` ->
    ``{statistic: [C, ...]}``.

    They add up over any split of the members (`add_sums`), so a caller may
    stream a large cluster's members a few at a time and `finish_sums` once.
    Weighted sums keep ``"sum"`` (``sum_n w_n x_n``). TIES keeps the weighted sums of
    the positive and negative votes (``"pos"``, ``"neg"``), the total vote
    (``"vote"``, majority "total"), the agreeing counts (``"pos_n"``, ``"neg_n"``:
    majority "frequency" or divisor "count") and the agreeing weights (``"pos_w"``,
    ``"neg_w"``: divisor "weight").

    Args:
      x: ``[C, S, ...]`` prepared tensors of the members.
      valid: ``[C, S]`` member slots in use.
      weights: ``[C, S]`` the members' weights.
      config: the merge (static).
    """
    valid = valid.astype(bool)
    member_weights = jnp.where(valid, weights, 0.0)

    def expand(v):  # [C, S] -> broadcastable against x [C, S, ...]
        return v.reshape(v.shape + (1,) * (x.ndim - 2)).astype(x.dtype)

    w = expand(member_weights)
    if not config.is_ties:
        return {"sum": jnp.sum(w * x, axis=1)}
    weighted_vote = config.sign_vote == "weighted"
    signed = x * (jnp.sign(w) if weighted_vote else expand(valid))  # 0 on padding
    pos, neg = (signed > 0).astype(x.dtype), (signed < 0).astype(x.dtype)
    stats = {"pos": jnp.sum(w * x * pos, axis=1), "neg": jnp.sum(w * x * neg, axis=1)}
    if config.majority == "total":
        stats["vote"] = jnp.sum((w if weighted_vote else expand(valid)) * x, axis=1)
    if config.majority == "frequency" or config.divisor == "count":
        stats["pos_n"], stats["neg_n"] = jnp.sum(pos, axis=1), jnp.sum(neg, axis=1)
    if config.divisor == "weight":
        stats["pos_w"], stats["neg_w"] = jnp.sum(w * pos, axis=1), jnp.sum(w * neg, axis=1)
    return stats


def num_sums(config: MergeConfig) -> int:
    """How many statistics `member_sums` keeps under `config`."""
    one = jnp.ones((1, 1))
    return len(jax.eval_shape(functools.partial(member_sums, config=config), one, one, one))


def add_sums(a: dict[str, jax.Array], b: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """`member_sums` of the union of two disjoint member sets."""
    return {name: a[name] + b[name] for name in a}


def finish_sums(stats: dict[str, jax.Array], config: MergeConfig) -> jax.Array:
    """The combined tensor ``[C, ...]`` from `member_sums` (before the per-cluster
    factor): the weighted sum, or TIES's disjoint mean over the members agreeing
    with the elected sign (positive where the vote is >= 0)."""
    if not config.is_ties:
        return stats["sum"]
    vote = stats["vote"] if config.majority == "total" else stats["pos_n"] - stats["neg_n"]
    up = vote >= 0
    merged = jnp.where(up, stats["pos"], stats["neg"])
    if config.divisor == "count":
        merged = merged / jnp.maximum(jnp.where(up, stats["pos_n"], stats["neg_n"]), 1.0)
    elif config.divisor == "weight":
        total = jnp.where(up, stats["pos_w"], stats["neg_w"])
        merged = merged / jnp.where(total == 0, 1.0, total)
    return merged


def _combine_members(tree: Tree, valid: jax.Array, weights: jax.Array, config: MergeConfig):
    """``{leaf: [C, S, ...]} -> {leaf: [C, ...]}``: weighted sum or TIES disjoint mean
    over each row's valid members (``valid [C, S]``, member weights ``[C, S]``).

    Per-cluster factors (lambda / D_c) are applied by the callers.
    """
    return jax.tree.map(lambda x: finish_sums(member_sums(x, valid, weights, config), config), tree)


def cluster_factor(valid: jax.Array, weights: jax.Array, config: MergeConfig) -> jax.Array:
    """``[C]`` factor ``lambda / D_c`` applied to each merged cluster.

    Args:
      valid: ``[C, S]`` member slots in use.
      weights: ``[C, S]`` member weights.

    ``D_c`` is the weighted-sum methods' divisor (1, member count, or sum of member
    weights; an empty cluster gets 1 and merges to zero); TIES divides per entry
    inside the combine, so its factor is lambda alone.
    """
    valid = valid.astype(jnp.float32)
    if config.is_ties or config.divisor == "none":
        denominator = jnp.ones(valid.shape[0], jnp.float32)
    elif config.divisor == "count":
        denominator = valid.sum(axis=1)
    else:
        denominator = (valid * weights).sum(axis=1)
    return config.lam / jnp.where(denominator == 0, 1.0, denominator)


def _scaled(x: jax.Array, factor: jax.Array) -> jax.Array:
    return x * factor.reshape((-1,) + (1,) * (x.ndim - 1))


def combine_factor_members(
    members: Mapping[str, Mapping[str, jax.Array]],
    scale: jax.Array,
    valid: jax.Array,
    weights: jax.Array,
    config: MergeConfig,
) -> dict[str, dict[str, jax.Array]]:
    """Merge gathered prepared LoRA factors of each cluster (PEFT semantics):
    factor-space stage 2.

    Args:
      members: ``{module: {"A": [C, S, L, r, d_in], "B": [C, S, L, d_out, r]}}``
        prepared factors of each cluster's members.
      scale: ``[C, S]`` the members' LoRA scales (alpha / r, or alpha / sqrt(r)).
      valid: ``[C, S]`` bool.
      weights: ``[C, S]`` the members' weights.
      config: the merge (static).

    Returns:
      ``{module: {"A": [C, L, r, d_in], "B": [C, L, d_out, r]}}`` with scale 1.
    """
    scaled = weights * scale
    root = jnp.sqrt(jnp.abs(scaled))
    side_weights = {"A": jnp.where(scaled >= 0, root, -root), "B": root}
    factor = cluster_factor(valid, weights, config)
    factor_root = jnp.sqrt(jnp.abs(factor))
    side_factor = {"A": jnp.where(factor >= 0, factor_root, -factor_root), "B": factor_root}
    merged = {}
    for side in "AB":
        tree = {m: members[m][side] for m in members}
        out = _combine_members(tree, valid, side_weights[side], config)
        merged[side] = {m: _scaled(x, side_factor[side]) for m, x in out.items()}
    return {m: {side: merged[side][m] for side in "AB"} for m in members}


def keep_single_members(merged: Tree, first: Tree, valid: jax.Array) -> Tree:
    """Clusters with exactly one member take that member unchanged.

    Args:
      merged: combined tensors, leaves ``[C, ...]``.
      first: the same structure and shapes: each cluster's first member's own
        (unmerged) tensors.
      valid: ``[C, S]`` member slots in use.
    """
    single = valid.astype(jnp.int32).sum(axis=-1) == 1
    return jax.tree.map(
        lambda m, o: jnp.where(single.reshape((-1,) + (1,) * (m.ndim - 1)), o.astype(m.dtype), m),
        merged,
        first,
    )


# --------------------------------------------------------------------------- streamed merges
#
# The engine's merges of C clusters given by their members ``index [C, S]`` (into
# the library's N adapters, each row's members first) and ``valid [C, S]``:
# `merge_member_deltas` (delta space), `merge_member_factors` (factor space) and
# `merge_member_subspace` (TSV-M, Iso, KnOTS). In delta space no dense delta of the
# library exists: for one block of output rows of one layer at a time, each
# member's delta is recomputed from its factors, sparsified by its stored state
# (`SPARSIFIERS`) and added to running `member_sums`, so work is O(C x S) per layer
# and temporaries are a few row blocks of C matrices, whatever N is.

# Bytes of the running member sums of one block of output rows: the blocks are
# sized so that the sums stay in cache while every member is added to them.
STREAM_BLOCK_BYTES = 8 << 20


def block_rows(config: MergeConfig, clusters: int, d_out: int, d_in: int) -> int:
    """Output rows merged together: the largest divisor of `d_out` whose running
    sums fit `STREAM_BLOCK_BYTES` (a sparsifier that draws whole matrices: all rows)."""
    if sparsifier(config).whole_rows:
        return d_out
    fit = max(1, STREAM_BLOCK_BYTES // (4 * num_sums(config) * clusters * d_in))
    return max(r for r in range(1, min(fit, d_out) + 1) if d_out % r == 0)


def member_deltas(a: jax.Array, b: jax.Array, scale: jax.Array, rows: tuple) -> jax.Array:
    """``[C, R, d_in]`` unmerged deltas (scale folded in) of one member per row:
    ``a [C, r, d_in]``, ``b [C, d_out, r]``, ``scale [C]``; output rows
    ``rows = (start, R)``."""
    return lowrank.factors_to_delta(a, _rows(b, rows), scale)


def _merge_block(library, index, valid, weights, module, layer, rows, config):
    """``[C, R, d_in]`` merged rows ``rows = (start, R)`` of one layer's matrix: the
    members are added one slot at a time to running `member_sums`, so no
    ``[C, S, ...]`` member array exists and the work stops at the last slot in use."""
    factors, scale, state = library
    f, spec = factors[module], sparsifier(config)

    def member(slot):
        members = index[:, slot]
        delta = member_deltas(f["A"][members, layer], f["B"][members, layer], scale[members], rows)
        own = jax.tree.map(lambda s: s[members, layer], state[module])
        return delta, spec.apply(delta, own, config, rows)

    def add(slot, stats):
        new = member_sums(
            member(slot)[1][:, None], valid[:, slot, None], weights[:, slot, None], config
        )
        return add_sums(stats, new)

    first, first_sparse = member(0)
    stats = member_sums(first_sparse[:, None], valid[:, :1], weights[:, :1], config)
    used = jnp.max(jnp.sum(valid, axis=1))  # members come first in each row
    stats = jax.lax.fori_loop(1, used, add, stats)
    merged = finish_sums(stats, config) * cluster_factor(valid, weights, config)[:, None, None]
    if config.singletons == "keep":
        merged = keep_single_members(merged, first, valid)
    return merged


def merge_member_deltas(
    factors: Mapping[str, Mapping[str, jax.Array]],
    scale: jax.Array,
    state: Mapping[str, Any],
    weights: jax.Array,
    index: jax.Array,
    valid: jax.Array,
    config: MergeConfig,
) -> dict[str, jax.Array]:
    """Delta-space merge of each cluster's members, streamed (see the section comment).

    Args:
      factors: the library ``{module: {"A": [N, L, r, d_in], "B": [N, L, d_out, r]}}``.
      scale: ``[N]`` LoRA scales.
      state: `prepare_delta_state` of the library under `config`.
      weights: ``[N]`` per-adapter weights.
      index: ``[C, S]`` int members of each cluster, members first in each row.
      valid: ``[C, S]`` bool slots in use.
      config: the merge (static).

    Returns:
      ``{module: [C, L, d_out, d_in]}`` merged dense deltas (untruncated, scale 1).
    """
    index, valid = jnp.asarray(index), jnp.asarray(valid, bool)
    library, member_weights = (factors, scale, state), weights[index]
    out = {}
    for module in sorted(factors):
        _, layers, d_out, _ = factors[module]["B"].shape
        size = block_rows(config, index.shape[0], d_out, factors[module]["A"].shape[-1])
        matrix = functools.partial(
            _merge_matrix, library, index, valid, member_weights, module, size=size, config=config
        )
        out[module] = jnp.moveaxis(jax.lax.map(matrix, jnp.arange(layers)), 0, 1)
    return out


def _merge_matrix(library, index, valid, weights, module, layer, size, config):
    """``[C, d_out, d_in]`` merged matrix of one module at `layer`, `size` output rows
    at a time (`_merge_block`)."""
    f = library[0][module]
    d_out, d_in = f["B"].shape[-2], f["A"].shape[-1]
    blocks = jax.lax.map(
        lambda start: _merge_block(
            library, index, valid, weights, module, layer, (start, size), config
        ),
        jnp.arange(0, d_out, size),
    )  # [d_out / R, C, R, d_in]
    return jnp.moveaxis(blocks, 0, 1).reshape(index.shape[0], d_out, d_in)


def merge_member_factors(
    factors: Mapping[str, Mapping[str, jax.Array]],
    sparse: Mapping[str, Mapping[str, jax.Array]],
    scale: jax.Array,
    weights: jax.Array,
    index: jax.Array,
    valid: jax.Array,
    config: MergeConfig,
) -> dict[str, dict[str, jax.Array]]:
    """Factor-space merge of each cluster's members (PEFT semantics).

    Args:
      factors: the library's own factors (one-member clusters under
        ``singletons="keep"`` take them unmerged).
      sparse: `prepare_factors` of them.
      scale, weights: ``[N]``; index, valid: ``[C, S]``; config: as `merge_member_deltas`.

    Returns:
      ``{module: {"A": [C, L, r, d_in], "B": [C, L, d_out, r]}}`` with scale 1.
    """
    index, valid = jnp.asarray(index), jnp.asarray(valid, bool)
    members = jax.tree.map(lambda x: x[index], dict(sparse))
    member_scale = scale[index]
    merged = combine_factor_members(members, member_scale, valid, weights[index], config)
    if config.singletons == "keep":
        # The first member unmerged, its scale split over A and B as the combine does.
        root = jnp.sqrt(jnp.abs(member_scale[:, 0])).reshape(-1, 1, 1, 1)
        sign = jnp.sign(member_scale[:, 0]).reshape(-1, 1, 1, 1)
        first = {
            m: {"A": f["A"][index[:, 0]] * sign * root, "B": f["B"][index[:, 0]] * root}
            for m, f in factors.items()
        }
        merged = keep_single_members(merged, first, valid)
    return merged


# --------------------------------------------------------------------------- subspace merges
#
# TSV-M, Iso-C, Iso-CTS and KnOTS need every member's whole matrix at once (SVDs of
# each member, of their sum or of their concatenation), so they are not member sums:
# `subspace_members` merges one module-layer of each cluster from its members'
# factors. Every member delta is ``c_n B_n A_n`` of rank <= r, so every SVD is taken
# in factored form (thin QRs of the stacked factors, then the SVD of a small core),
# which is exact and costs O(d (S r)^2) instead of O(d^3) per cluster.
#
# The references (FusionBench's ``TSVM_utils.compute_and_sum_svd_mem_reduction``,
# ``iso_utils.iso_c`` / ``iso_cts``, KnOTS's ``SVDMerger``) take full SVDs of dense,
# full-rank task matrices. On LoRA deltas those SVDs also return an arbitrary basis
# of the null space (singular value 0) that TSV-M and Iso-CTS would concatenate and
# orthogonalise with the rest; here only the directions the members span are used:
# a direction whose singular value is at most `SUPPORT_RTOL` times the largest is
# dropped. On full-rank matrices nothing is dropped and the methods are the
# references' (tests/test_merge.py checks both against transcriptions).

# Singular values at most this fraction of the largest are float32 noise of an
# exactly rank-deficient product: such directions are outside the members' span.
SUPPORT_RTOL = 1e-5

# KnOTS keeps the components of the joint SVD with a singular value above this
# (the KnOTS repository's ``apply_svd``: ``s > 1e-5``).
KNOTS_EPS = 1e-5


def factored_svd(b: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Thin SVD of ``b @ a`` without forming it.

    Args:
      b: ``[..., d_out, R]``.
      a: ``[..., R, d_in]``.

    Returns:
      ``(u [..., d_out, k], s [..., k], vt [..., k, d_in])`` with ``k = min(d_out,
      d_in, R)``, singular values descending: ``b @ a = u diag(s) vt``.
    """
    qb, rb = jnp.linalg.qr(b)  # [.., d_out, k1], [.., k1, R]
    qa, ra = jnp.linalg.qr(jnp.swapaxes(a, -1, -2))  # [.., d_in, k2], [.., k2, R]
    uc, s, vct = jnp.linalg.svd(rb @ jnp.swapaxes(ra, -1, -2), full_matrices=False)
    return qb @ uc, s, vct @ jnp.swapaxes(qa, -1, -2)


def polar(m: jax.Array) -> jax.Array:
    """Orthogonal polar factor ``P Q^T`` of ``m [..., p, q] = P S Q^T`` (the nearest
    matrix with orthonormal columns, Procrustes); zero columns stay zero when the
    others are linearly independent."""
    p, _, qt = jnp.linalg.svd(m, full_matrices=False)
    return p @ qt


def _per_count(values) -> jax.Array:
    """A host table indexed by the member count T (entry 0 unused)."""
    return jnp.asarray(np.asarray(values, np.int32))


def tsv_keep_counts(slots: int, min_dim: int, sv_fraction: float | None) -> jax.Array:
    """``[slots + 1]``: singular vectors each of T members keeps, FusionBench's
    ``int(min_dim * sv_reduction)`` with ``sv_reduction = 1 / T`` by default."""
    return _per_count([0] + [int(min_dim * (sv_fraction or 1 / t)) for t in range(1, slots + 1)])


def iso_cts_counts(slots: int, min_dim: int, common_fraction: float) -> tuple[jax.Array, ...]:
    """``([slots + 1], [slots + 1])``: Iso-CTS's common-subspace size and directions
    per member for T members (FusionBench ``iso_cts``: the task-specific part is
    rounded to a multiple of T and the common part takes the rest)."""
    common, per_task = [0], [0]
    for t in range(1, slots + 1):
        size = int(min_dim * common_fraction)
        specific = round((min_dim - size) / t) * t
        common.append(min_dim - specific)
        per_task.append(specific // t)
    return _per_count(common), _per_count(per_task)


def _columns(x: jax.Array) -> jax.Array:
    """``[S, d, k] -> [d, S k]``: members' column blocks side by side."""
    return jnp.moveaxis(x, 0, -2).reshape(x.shape[1], -1)


def _select(u, s, vt, value, keep: int) -> jax.Array:
    """``[d_out, d_in]`` from the `keep` directions with the largest `s` (pairs of
    columns of ``u [d_out, k]`` and rows of ``vt [k, d_in]``), each given singular
    value `value` (``[k]``)."""
    order = jnp.argsort(-s)[: min(keep, s.shape[0])]
    return (u[:, order] * value[order]) @ vt[order]


def _tsv(a, b, coef, valid, keep, config):
    """TSV-M of one cluster: ``a [S, r, d_in]``, ``b [S, d_out, r]``, ``coef [S]``."""
    min_dim = min(b.shape[-2], a.shape[-1])
    u, s, vt = factored_svd(b * coef[:, None, None], a)  # [S, d_out, k], [S, k], [S, k, d_in]
    count = tsv_keep_counts(valid.shape[0], min_dim, config.sv_fraction)[valid.sum()]
    column = jnp.arange(s.shape[-1])
    kept = (
        valid[:, None] & (column < count) & (s > SUPPORT_RTOL * jnp.max(s, axis=-1, keepdims=True))
    )
    s = jnp.where(kept, s, 0.0)
    pu = polar(_columns(u * kept[:, None, :]))  # [d_out, S k]
    pv = polar(_columns(jnp.swapaxes(vt, -1, -2) * kept[:, None, :]))  # [d_in, S k]
    s = s.reshape(-1)
    # Orthonormal pu, pv: the singular values of the merge are exactly s, so the top
    # `keep` of them are its best rank-`keep` truncation.
    return _select(pu, s, pv.T, s, keep)


def _iso_c(a, b, coef, valid, keep, config):
    """Iso-C of one cluster (arguments as `_tsv`)."""
    del valid, config
    min_dim = min(b.shape[-2], a.shape[-1])
    u, s, vt = factored_svd(_columns(b * coef[:, None, None]), a.reshape(-1, a.shape[-1]))
    support = s > SUPPORT_RTOL * s[0]
    # The reference's mean runs over all min(d_out, d_in) singular values.
    mean = jnp.sum(s) / min_dim
    return _select(u, s, vt, jnp.where(support, mean, 0.0), keep)


def _iso_cts(a, b, coef, valid, keep, config):
    """Iso-CTS of one cluster (arguments as `_tsv`)."""
    slots, min_dim = valid.shape[0], min(b.shape[-2], a.shape[-1])
    weighted = b * coef[:, None, None]
    u0, s0, vt0 = factored_svd(_columns(weighted), a.reshape(-1, a.shape[-1]))
    common_counts, task_counts = iso_cts_counts(slots, min_dim, config.common_fraction)
    members = valid.sum()
    floor = SUPPORT_RTOL * s0[0]
    common = (jnp.arange(s0.shape[0]) < common_counts[members]) & (s0 > floor)
    uc = u0 * common
    # Each member without the common subspace: (I - Uc Uc^T) c B A, still factored.
    specific = weighted - uc @ (uc.T @ weighted)
    u, s, vt = factored_svd(specific, a)
    kept = valid[:, None] & (jnp.arange(s.shape[-1]) < task_counts[members]) & (s > floor)
    u_all = jnp.concatenate([_columns(u * kept[:, None, :]), uc], axis=1)
    v_all = jnp.concatenate(
        [_columns(jnp.swapaxes(vt, -1, -2) * kept[:, None, :]), vt0.T * common], axis=1
    )
    s_all = jnp.concatenate([jnp.where(kept, s, 0.0).reshape(-1), jnp.where(common, s0, 0.0)])
    mean = jnp.sum(s_all) / min_dim
    return _select(polar(u_all), s_all, polar(v_all).T, jnp.where(s_all > 0, mean, 0.0), keep)


def _dynamic_threshold(bits: jax.Array, k: jax.Array) -> jax.Array:
    """`_top_k_threshold` of a 1-D row for a traced count k (any value)."""
    total = bits.size
    found = _top_k_threshold([bits], jnp.clip(k, 1, max(total - 1, 1)))
    return jnp.where(k >= total, 0, jnp.where(k <= 0, KEEP_NONE, found))


def knots_coefficients(a, b, scale, valid):
    """KnOTS alignment of one cluster: the SVD of the members' concatenated deltas
    ``[c_1 B_1 A_1, ..., c_S B_S A_S] = U diag(s) [Vt_1, ..., Vt_S]``.

    Args:
      a: ``[S, r, d_in]``; b: ``[S, d_out, r]``; scale: ``[S]`` LoRA scales;
      valid: ``[S]`` slots in use (others contribute zero).

    Returns:
      ``(u [d_out, k], x [S, k, d_in], support [k])``: the shared basis and each
      member's coefficients ``x_n = diag(s) Vt_n`` (KnOTS's ``s_on_V``), so member
      n's delta is ``u @ x_n``; components with ``s <= KNOTS_EPS`` (or float32 noise)
      are zero.
    """
    slots, rank = a.shape[0], a.shape[1]
    coef = jnp.where(valid, scale, 0.0)
    qb, rb = jnp.linalg.qr(_columns(b * coef[:, None, None]))  # [d_out, k1], [k1, S r]
    qa, ra = jnp.linalg.qr(jnp.swapaxes(a, -1, -2))  # [S, d_in, r2], [S, r2, r]
    # [c B_1 A_1, ...] = qb rb blockdiag(ra_n^T) blockdiag(qa_n^T): SVD the core.
    core = jnp.einsum("ksj,sij->ksi", rb.reshape(-1, slots, rank), ra).reshape(rb.shape[0], -1)
    uk, s, vkt = jnp.linalg.svd(core, full_matrices=False)
    support = s > jnp.maximum(KNOTS_EPS, SUPPORT_RTOL * s[0])
    sv = (jnp.where(support, s, 0.0)[:, None] * vkt).reshape(s.shape[0], slots, -1)
    x = jnp.einsum("ksi,sdi->skd", sv, qa)
    return qb @ uk, x, support


def _knots(a, b, scale, weights, valid, config):
    """KnOTS of one cluster: align (`knots_coefficients`), sparsify and combine the
    coefficients with the method's consensus and divisor, map back by ``u``."""
    u, x, support = knots_coefficients(a, b, scale, valid)
    if config.spec.sparsify == "magnitude":
        # The reference trims among the supported components only, and its
        # ``topk_values_mask`` keeps |x| >= the (n - int(density n))-th smallest
        # magnitude: int(density n) + 1 entries (density < 1).
        k = jnp.floor(config.density * support.sum() * x.shape[-1]).astype(jnp.int32)
        k = k + (config.density < 1)
        bits = _magnitude_bits(x).reshape(x.shape[0], -1)
        thresholds = jax.vmap(_dynamic_threshold, in_axes=(0, None))(bits, k)
        x = jnp.where(apply_thresholds(x, thresholds), x, 0.0)
    stats = member_sums(x[None], valid[None], weights[None], config)
    merged = finish_sums(stats, config) * cluster_factor(valid[None], weights[None], config)[0]
    return u @ merged[0]


def subspace_members(
    a: jax.Array,
    b: jax.Array,
    scale: jax.Array,
    valid: jax.Array,
    weights: jax.Array,
    config: MergeConfig,
    keep: int,
) -> jax.Array:
    """Merge one module-layer of each cluster with a subspace method (TSV-M, Iso-C,
    Iso-CTS, KnOTS; `config.spec.subspace`).

    Args:
      a: ``[C, S, r, d_in]`` the members' A factors (slot s of row c is a member
        where ``valid[c, s]``).
      b: ``[C, S, d_out, r]`` the members' B factors.
      scale: ``[C, S]`` the members' LoRA scales.
      valid: ``[C, S]`` bool.
      weights: ``[C, S]`` the members' weights: TSV-M and Iso scale each member's
        task matrix by its weight before merging (FusionBench's per-task alpha);
        KnOTS weights the coefficients in its combine.
      config: the merge (static); ``config.lam`` multiplies the result.
      keep: TSV-M, Iso-C and Iso-CTS return only their `keep` strongest directions
        (by singular value before Iso flattens the spectrum: the truncation of an
        isotropic matrix is otherwise arbitrary); the engine passes the rank r, so
        the usual truncation back to rank r is then exact. KnOTS returns its full
        merge (rank up to ``S r``), which that truncation cuts to rank r.

    Returns:
      ``[C, d_out, d_in]`` dense merged deltas.
    """
    valid = valid.astype(bool)
    subspace = config.spec.subspace
    if subspace == "knots":
        merged = jax.vmap(functools.partial(_knots, config=config))(a, b, scale, weights, valid)
        return merged
    coef = jnp.where(valid, scale * weights, 0.0)
    one = {"tsv": _tsv, "iso_c": _iso_c, "iso_cts": _iso_cts}[subspace]
    merged = jax.vmap(lambda *args: one(*args, keep=keep, config=config))(a, b, coef, valid)
    return merged * config.lam


def merge_member_subspace(
    factors: Mapping[str, Mapping[str, jax.Array]],
    scale: jax.Array,
    weights: jax.Array,
    index: jax.Array,
    valid: jax.Array,
    config: MergeConfig,
    rank: int,
) -> dict[str, jax.Array]:
    """Subspace merge (`subspace_members`) of each cluster's members, one layer at a
    time from their factors; arguments as `merge_member_deltas`, `rank` the `keep`
    of `subspace_members` (the library's rank r).

    Returns:
      ``{module: [C, L, d_out, d_in]}`` merged dense deltas, for the usual
      truncation back to rank r (TSV-M and Iso already keep only r directions).
    """
    index, valid = jnp.asarray(index), jnp.asarray(valid, bool)
    member_scale, member_weights = scale[index], weights[index]
    out = {}
    for module in sorted(factors):
        f = factors[module]

        def layer_merge(layer, f=f):
            a, b = f["A"][index, layer], f["B"][index, layer]  # [C, S, r, i], [C, S, o, r]
            merged = subspace_members(a, b, member_scale, valid, member_weights, config, rank)
            if config.singletons == "keep":
                first = lowrank.factors_to_delta(a[:, 0], b[:, 0], member_scale[:, 0])
                merged = keep_single_members(merged, first, valid)
            return merged

        out[module] = jnp.moveaxis(jax.lax.map(layer_merge, jnp.arange(f["A"].shape[1])), 0, 1)
    return out
