"""d2c_jax.merging: delta-space TIES against a plain NumPy reference, and merge properties.

The reference below is the TIES algorithm written out entry by entry on dense
deltas in float64 (trim by sorting, elect, disjoint mean), followed by a rank-r
truncated SVD; we compare dense products B @ A since singular vectors have
arbitrary signs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d2c_jax import merging
from kernels import merge as km
from kernels.lowrank import factors_to_delta
from kernels.merge import MergeConfig
from kernels.merge_methods import METHODS, get_method
from tests.merge_reference import masked_merge_deltas, masked_merge_factors

N, L, R, D_IN = 5, 2, 2, 8
D_OUT = {"q_proj": 8, "v_proj": 4}
NAMES = tuple(f"task{i}" for i in range(N))


def random_library(seed: int, n: int = N):
    rng = np.random.default_rng(seed)
    params = {
        m: {
            "A": rng.standard_normal((n, L, R, D_IN)).astype(np.float32),
            "B": rng.standard_normal((n, L, d_out, R)).astype(np.float32),
        }
        for m, d_out in D_OUT.items()
    }
    scale = rng.uniform(0.5, 2.0, n).astype(np.float32)
    return params, scale


def dense(params, scale):
    return {
        m: scale[:, None, None, None] * (f["B"].astype(np.float64) @ f["A"].astype(np.float64))
        for m, f in params.items()
    }


def np_trim(deltas, density, scope):
    """Keep the top int(density * size) |x| per matrix or per adapter (by sorting)."""
    out = {m: np.zeros_like(x) for m, x in deltas.items()}
    for n in range(N):
        if scope == "global":
            groups = [[(m, layer) for m in sorted(deltas) for layer in range(L)]]
        else:
            groups = [[(m, layer)] for m in sorted(deltas) for layer in range(L)]
        for group in groups:
            flat = np.concatenate([deltas[m][n, layer].ravel() for m, layer in group])
            k = int(density * flat.size)
            keep = np.zeros(flat.size, bool)
            keep[np.argsort(-np.abs(flat), kind="stable")[:k]] = True
            start = 0
            for m, layer in group:
                size = deltas[m][n, layer].size
                out[m][n, layer] = np.where(
                    keep[start : start + size], flat[start : start + size], 0
                ).reshape(deltas[m][n, layer].shape)
                start += size
    return out


def np_ties(deltas, members, weights, config):
    """TIES on dense deltas for one cluster, entry by entry: {m: [L, d_out, d_in]}."""
    trimmed = np_trim(deltas, config.density, config.trim)
    out = {}
    for m, x in trimmed.items():
        merged = np.zeros(x.shape[1:])
        for idx in np.ndindex(*x.shape[1:]):
            values = [x[(n,) + idx] for n in members]
            votes = [
                weights[n] * v if config.sign_vote == "weighted" else v
                for n, v in zip(members, values, strict=True)
            ]
            if config.majority == "total":
                elected = 1 if sum(votes) >= 0 else -1
            else:
                elected = 1 if sum(np.sign(votes)) >= 0 else -1
            agree = [n for n, v in zip(members, votes, strict=True) if np.sign(v) == elected]
            total = sum(weights[n] * x[(n,) + idx] for n in agree)
            if config.divisor == "count":
                total /= max(len(agree), 1)
            elif config.divisor == "weight" and agree:
                total /= sum(weights[n] for n in agree)
            merged[idx] = config.lam * total
        out[m] = merged
    return out


def np_truncate(delta, rank):
    u, s, vh = np.linalg.svd(delta, full_matrices=False)
    return (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]


TIES_CONFIGS = [
    MergeConfig("ties", density=0.4),
    MergeConfig("ties", density=0.4, trim="global"),
    MergeConfig("ties", density=0.3, majority="frequency", lam=1.5),
    MergeConfig("ties", density=0.5, sign_vote="weighted", divisor="weight", trim="global"),
    MergeConfig("ties", density=0.5, sign_vote="weighted", divisor="none"),
]


@pytest.mark.parametrize(
    "config", TIES_CONFIGS, ids=lambda c: f"{c.trim}-{c.majority}-{c.sign_vote}-{c.divisor}"
)
def test_delta_ties_equals_numpy_reference_then_svd(config):
    params, scale = random_library(0)
    weights = (1.0, 0.5, 2.0, 0.7, 1.3)
    config = MergeConfig(**{**config.to_dict(), "weights": weights})
    clusters = [(0, 1, 2), (3, 4), (0, 2, 3, 4)]
    membership = np.zeros((len(clusters), N), np.float32)
    for c, members in enumerate(clusters):
        membership[c, list(members)] = 1
    out = merging.merge(params, scale, membership, config, names=NAMES, return_delta=True)
    deltas = dense(params, scale)
    for c, members in enumerate(clusters):
        ref = np_ties(deltas, members, weights, config)
        for m in D_OUT:
            np.testing.assert_allclose(out.delta[m]["delta"][c], ref[m], rtol=1e-4, atol=1e-4)
            a, b = out.params[m]["A"][c], out.params[m]["B"][c]
            assert a.shape == (L, R, D_IN) and b.shape == (L, D_OUT[m], R)
            np.testing.assert_allclose(b @ a, np_truncate(ref[m], R), rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(out.scale, np.ones(len(clusters)))


def _config(method, space, density=0.5, **kwargs):
    spec = get_method(method)
    if space == "factor" and spec.consensus == "ties" and spec.default_divisor == "weight":
        kwargs.setdefault("divisor", "count")  # DELLA's weight divisor is delta space only
    sparse = spec.needs_density
    return MergeConfig(method, space=space, density=density if sparse else None, **kwargs)


# The task-arithmetic family (any space, a one-member cluster at density 1 is its
# adapter); the subspace methods are delta-space only and tested in
# tests/test_merge_references.py.
TA_METHODS = tuple(m for m in METHODS if not get_method(m).is_subspace)

PROPERTY_SETTINGS = settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(
    method=st.sampled_from(TA_METHODS),
    space=st.sampled_from(["delta", "factor"]),
    trim=st.sampled_from(["global", "per-tensor"]),
    density=st.sampled_from([0.3, 1.0]),
    member=st.integers(0, N - 1),
    seed=st.integers(0, 2**16),
)
def test_single_member_cluster_is_that_adapter_when_kept(
    method, space, trim, density, member, seed
):
    """``singletons="keep"``: at any density; ``"merge"``: at density 1 (nothing trimmed)."""
    params, scale = random_library(seed)
    membership = np.zeros((2, N), np.float32)
    membership[0, member] = 1
    membership[1] = 1  # a full cluster in the same call is merged as usual
    expected = dense(params, scale)
    out = {
        mode: merging.merge(
            params,
            scale,
            membership,
            _config(method, space, density=density, trim=trim, singletons=mode),
            names=NAMES,
            return_delta=True,
        )
        for mode in ("keep", "merge")
    }
    for mode in ("keep", "merge") if density == 1.0 else ("keep",):
        for m in D_OUT:
            np.testing.assert_allclose(
                out[mode].delta[m]["delta"][0], expected[m][member], rtol=1e-4, atol=1e-5
            )
            deployed = out[mode].params[m]["B"][0] @ out[mode].params[m]["A"][0]  # rank r
            np.testing.assert_allclose(deployed, expected[m][member], rtol=1e-3, atol=1e-4)
    for m in D_OUT:
        np.testing.assert_array_equal(
            out["keep"].delta[m]["delta"][1], out["merge"].delta[m]["delta"][1]
        )


@PROPERTY_SETTINGS
@given(
    method=st.sampled_from(TA_METHODS),
    space=st.sampled_from(["delta", "factor"]),
    majority=st.sampled_from(["total", "frequency"]),
    permutation=st.permutations(range(N)),
    seed=st.integers(0, 2**16),
)
def test_member_order_does_not_matter(method, space, majority, permutation, seed):
    params, scale = random_library(seed)
    weights = (1.0, 0.5, 2.0, 0.7, 1.3)
    config = _config(method, space, majority=majority, weights=weights)
    membership = np.asarray([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], np.float32)
    out = merging.merge(params, scale, membership, config, names=NAMES, return_delta=True)
    p = list(permutation)
    permuted = merging.merge(
        jax.tree.map(lambda x: x[p], params),
        scale[p],
        membership[:, p],
        MergeConfig(**{**config.to_dict(), "weights": tuple(weights[i] for i in p)}),
        names=[NAMES[i] for i in p],
        return_delta=True,
    )
    for m in D_OUT:
        np.testing.assert_allclose(
            permuted.delta[m]["delta"], out.delta[m]["delta"], rtol=1e-4, atol=1e-5
        )


@PROPERTY_SETTINGS
@given(
    method=st.sampled_from(TA_METHODS),
    space=st.sampled_from(["delta", "factor"]),
    rows=st.lists(st.lists(st.booleans(), min_size=N, max_size=N), min_size=2, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_batched_membership_equals_each_cluster_alone(method, space, rows, seed):
    params, scale = random_library(seed)
    config = _config(method, space)
    membership = np.asarray(rows, np.float32)
    prepared = merging.prepare(params, scale, config, names=NAMES)
    batched = merging.merged_factors(prepared, membership, return_delta=True)
    for c in range(len(rows)):
        alone = merging.merge(
            params, scale, membership[c : c + 1], config, names=NAMES, return_delta=True
        )
        for m in D_OUT:
            np.testing.assert_allclose(
                batched.delta[m]["delta"][c], alone.delta[m]["delta"][0], rtol=1e-5, atol=1e-6
            )
            np.testing.assert_allclose(
                batched.params[m]["B"][c] @ batched.params[m]["A"][c],
                alone.params[m]["B"][0] @ alone.params[m]["A"][0],
                rtol=1e-4,
                atol=1e-5,
            )


def test_empty_cluster_merges_to_zero():
    params, scale = random_library(0)
    for config in (_config("ties", "delta"), _config("linear", "factor")):
        out = merging.merge(params, scale, np.zeros((1, N)), config, names=NAMES, return_delta=True)
        for m in D_OUT:
            assert not np.any(out.delta[m]["delta"])


def test_merged_deltas_is_untruncated_and_factor_delta_is_exact():
    params, scale = random_library(1)
    membership = np.asarray([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]], np.float32)
    prepared = merging.prepare(params, scale, _config("ties", "delta"), names=NAMES)
    deltas = merging.merged_deltas(prepared, membership)
    factors = merging.merged_factors(prepared, membership, return_delta=True)
    for m in D_OUT:
        np.testing.assert_allclose(deltas[m]["delta"], factors.delta[m]["delta"], rtol=1e-6)
        assert np.linalg.matrix_rank(np.asarray(deltas[m]["delta"][0, 0])) > R  # untruncated
        np.testing.assert_allclose(
            factors.params[m]["B"] @ factors.params[m]["A"],
            np_truncate(np.asarray(deltas[m]["delta"], np.float64), R),
            rtol=1e-3,
            atol=1e-4,
        )
    prepared = merging.prepare(params, scale, _config("ties", "factor"), names=NAMES)
    factors = merging.merged_factors(prepared, membership, return_delta=True)
    for m in D_OUT:
        np.testing.assert_allclose(
            factors.delta[m]["delta"],
            factors.params[m]["B"] @ factors.params[m]["A"],
            rtol=1e-5,
            atol=1e-6,
        )


def test_dare_mask_depends_on_name_and_seed_not_on_the_library():
    """An adapter's DARE-masked delta (a one-member merge under singletons="merge") is
    the same in any library it sits in, and changes with the seed."""
    params, scale = random_library(2)
    config = _config("dare_linear", "delta", density=0.5, seed=7, singletons="merge")
    subset = [3, 1]

    def alone(config, params, scale, names, position):
        prepared = merging.prepare(params, scale, config, names=names)
        membership = np.eye(len(names), dtype=np.float32)[position : position + 1]
        return merging.merged_deltas(prepared, membership)

    full = alone(config, params, scale, NAMES, 3)
    sub = alone(
        config,
        jax.tree.map(lambda x: x[subset], params),
        scale[subset],
        [NAMES[i] for i in subset],
        0,
    )
    for m in D_OUT:
        np.testing.assert_array_equal(sub[m]["delta"], full[m]["delta"])
    reseeded = alone(dataclasses.replace(config, seed=8), params, scale, NAMES, 3)
    assert not np.array_equal(reseeded["q_proj"]["delta"], full["q_proj"]["delta"])


@PROPERTY_SETTINGS
@given(
    method=st.sampled_from(TA_METHODS),
    space=st.sampled_from(["delta", "factor"]),
    trim=st.sampled_from(["per-tensor", "global"]),
    singletons=st.sampled_from(["keep", "merge"]),
    rows=st.lists(st.lists(st.booleans(), min_size=N, max_size=N), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_gathered_merge_equals_the_masked_kernel_merge(method, space, trim, singletons, rows, seed):
    """The engine's merge (members gathered into buckets, deltas recomputed from the
    factors and sparsified by their stored state) equals the masked reference
    (`tests.merge_reference`) over every dense sparsified adapter."""
    params, scale = random_library(seed)
    config = _config(method, space, trim=trim, singletons=singletons, seed=seed)
    membership = np.asarray(rows, np.float32)
    ours = merging.merged_deltas(merging.prepare(params, scale, config, names=NAMES), membership)
    jparams = jax.tree.map(jnp.asarray, params)
    weights = jnp.ones(N)
    keys = merging.adapter_keys(NAMES, seed)
    if space == "delta":
        deltas = {
            m: factors_to_delta(f["A"], f["B"], jnp.asarray(scale)) for m, f in jparams.items()
        }
        masked = masked_merge_deltas(deltas, membership, weights, config, keys)
        single = deltas
    else:
        merged = masked_merge_factors(
            jparams, jnp.asarray(scale), membership, weights, config, keys
        )
        masked = {m: factors_to_delta(f["A"], f["B"]) for m, f in merged.items()}
        single = {
            m: factors_to_delta(f["A"], f["B"], jnp.asarray(scale)) for m, f in jparams.items()
        }
    for c, row in enumerate(membership):
        members = np.flatnonzero(row)
        for m in D_OUT:
            expected = masked[m][c]
            if singletons == "keep" and len(members) == 1:
                expected = single[m][members[0]]
            np.testing.assert_allclose(ours[m]["delta"][c], expected, rtol=1e-5, atol=1e-5)


def test_member_lists_are_padded_to_few_bucket_sizes():
    membership = np.zeros((3, 40), bool)
    membership[0, [1, 5, 7]] = True
    membership[1, 10:15] = True
    index, valid = merging.member_plan(membership, 40)
    assert index.shape == (3, 6)  # largest row 5 -> bucket 6
    assert index[0, :3].tolist() == [1, 5, 7] and valid.sum(axis=1).tolist() == [3, 5, 0]
    assert [merging.member_plan(np.ones((1, 40)), 40)[0].shape[1]] == [40]  # capped at N
    sizes = {merging.member_plan((np.arange(40) < s)[None], 40)[0].shape[1] for s in range(1, 41)}
    assert sizes == {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40}


def test_prepared_library_holds_no_dense_delta():
    """Memory grows with the factors: no leaf as large as one adapter's dense delta."""
    params, scale = random_library(0)
    for method in METHODS:
        prepared = merging.prepare(params, scale, _config(method, "delta"), names=NAMES)
        for leaf in jax.tree.leaves(prepared):
            assert leaf.size <= N * L * max(D_OUT.values()) * R * 2, (method, leaf.shape)


def test_shape_and_argument_errors():
    params, scale = random_library(0)
    config = _config("linear", "delta")
    with pytest.raises(ValueError, match="names has 4 entries"):
        merging.merge(params, scale, np.ones((1, N)), config, names=NAMES[:4])
    with pytest.raises(ValueError, match=r"membership must be a \[C, N=5\]"):
        merging.merge(params, scale, np.ones((1, 4)), config, names=NAMES)
    with pytest.raises(ValueError, match="weights has 2 values but there are 5 adapters"):
        merging.merge(
            params, scale, np.ones((1, N)), _config("linear", "delta", weights=(1, 2)), names=NAMES
        )
    bad = {**params, "v_proj": {"A": params["v_proj"]["A"][:4], "B": params["v_proj"]["B"]}}
    with pytest.raises(ValueError, match="v_proj"):
        merging.merge(bad, scale, np.ones((1, N)), config, names=NAMES)
    with pytest.raises(ValueError, match="must have keys 'A' and 'B'"):
        merging.merge(
            {"q_proj": {"A": params["q_proj"]["A"]}}, scale, np.ones((1, N)), config, names=NAMES
        )


def test_prepared_library_is_a_pytree_for_jit():
    params, scale = random_library(0)
    prepared = merging.prepare(params, scale, _config("ties", "delta"), names=NAMES)
    leaves = jax.tree.leaves(prepared)
    # the A, B factors and trim thresholds per module; scale; weights
    assert len(leaves) == 3 * len(D_OUT) + 2
    doubled = jax.jit(lambda p: jax.tree.map(lambda x: 2 * x, p))(prepared)
    assert doubled.config == prepared.config and doubled.rank == R
    assert jnp.allclose(doubled.scale, 2 * prepared.scale)


def test_rows_of_different_sizes_merge_in_groups_in_row_order(monkeypatch):
    """Small and large clusters go to separate calls (bounded member slots), and the
    result comes back in row order, equal to merging each row alone."""
    monkeypatch.setattr(merging, "MAX_SLOTS", 4)
    params, scale = random_library(3)
    membership = np.asarray(
        [[1, 1, 1, 1, 1], [0, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], np.float32
    )
    groups = merging.merge_groups(membership, N, rows_multiple=2)
    assert sorted(np.concatenate(groups).tolist()) == [0, 1, 2, 3] and len(groups) > 1
    prepared = merging.prepare(params, scale, _config("ties", "delta"), names=NAMES)
    together = merging.merged_deltas(prepared, membership, rows_multiple=2)
    for c in range(len(membership)):
        alone = merging.merged_deltas(prepared, membership[c : c + 1])
        for m in D_OUT:
            np.testing.assert_allclose(
                together[m]["delta"][c], alone[m]["delta"][0], rtol=1e-6, atol=1e-6
            )


@pytest.mark.parametrize(
    "config",
    [
        TIES_CONFIGS[0],
        TIES_CONFIGS[2],
        MergeConfig("dare_ties", density=0.5),
        MergeConfig("linear"),
    ],
    ids=lambda c: f"{c.method}-{c.majority}",
)
def test_merging_blocks_of_rows_equals_whole_matrices(config, monkeypatch):
    """Running sums kept for a few output rows at a time (`STREAM_BLOCK_BYTES`)
    change nothing but the order of work."""
    params, scale = random_library(3)
    membership = np.array([[1, 1, 0, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1]], np.float32)
    prepared = merging.prepare(params, scale, config, names=NAMES)
    whole = merging.merged_deltas(prepared, membership)
    monkeypatch.setattr(km, "STREAM_BLOCK_BYTES", 1)
    merging._merged_deltas_jit.clear_cache()  # traced under the old block size
    assert km.block_rows(prepared.config, 3, 8, D_IN) == (8 if config.method == "dare_ties" else 1)
    blocked = merging.merged_deltas(prepared, membership)
    for m in D_OUT:
        np.testing.assert_allclose(blocked[m]["delta"], whole[m]["delta"], rtol=1e-6, atol=1e-6)
