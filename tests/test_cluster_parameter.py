"""Budgets and the data-free clustering methods (random, kmeans, mbc) on planted libraries."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from d2c_jax.cluster.base import check_assignment, membership_mask, resolve_budget
from d2c_jax.cluster.parameter import (
    KMeansClustering,
    MBCClustering,
    RandomClustering,
    library_delta_gram,
)
from d2c_jax.library import AdapterLibrary


def planted_library(groups=(0, 0, 0, 1, 1, 1, 2, 2, 2), seed=0, noise=0.05, scales=None):
    """Adapters whose factors are a per-group prototype plus small noise."""
    rng = np.random.default_rng(seed)
    n, layers, r = len(groups), 2, 2
    shapes = {"q_proj": (8, 8), "v_proj": (4, 8)}
    params = {}
    for module, (d_out, d_in) in shapes.items():
        proto_a = rng.normal(size=(max(groups) + 1, layers, r, d_in))
        proto_b = rng.normal(size=(max(groups) + 1, layers, d_out, r))
        a = proto_a[list(groups)] + noise * rng.normal(size=(n, layers, r, d_in))
        b = proto_b[list(groups)] + noise * rng.normal(size=(n, layers, d_out, r))
        params[module] = {"A": jnp.asarray(a, jnp.float32), "B": jnp.asarray(b, jnp.float32)}
    scale = np.ones(n) if scales is None else np.asarray(scales)
    return AdapterLibrary(
        names=tuple(f"task{i}" for i in range(n)),
        params=params,
        scale=jnp.asarray(scale, jnp.float32),
        rank=r,
        ranks=(r,) * n,
        target_modules=tuple(shapes),
        base_model="tiny",
    )


def same_partition(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return all((a[i] == a[j]) == (b[i] == b[j]) for i in range(len(a)) for j in range(len(a)))


def test_resolve_budget():
    lib = planted_library()  # N = 9
    assert resolve_budget("3", lib) == 3
    assert resolve_budget(9, lib) == 9
    assert resolve_budget("33.4%", lib) == 3
    assert resolve_budget("12.5%", planted_library(groups=tuple(range(5)) * 8)) == 5
    per_adapter = lib.adapter_bytes()
    assert resolve_budget(f"{2 * per_adapter + 1}B", lib) == 2
    with pytest.raises(ValueError, match="exceeds the library's N=9"):
        resolve_budget("10", lib)
    with pytest.raises(ValueError, match="at least 1"):
        resolve_budget("0", lib)
    with pytest.raises(ValueError, match="rounds to K=0"):
        resolve_budget("5%", lib)
    with pytest.raises(ValueError, match="not understood"):
        resolve_budget("-2", lib)
    with pytest.raises(ValueError, match="at least 1"):
        resolve_budget("10B", lib)


def test_one_adapter_library_gives_one_cluster():
    lib = planted_library(groups=(0,))
    assert resolve_budget("100%", lib) == 1
    for method in (RandomClustering(), KMeansClustering(), MBCClustering()):
        np.testing.assert_array_equal(method.fit(lib, 1, seed=0).assign, [0])


def test_gram_equals_flattened_dense_deltas():
    lib = planted_library(scales=np.linspace(0.5, 2, 9))
    flat = np.concatenate(
        [
            np.asarray(lib.scale[:, None, None, None] * f["B"] @ f["A"]).reshape(9, -1)
            for f in lib.params.values()
        ],
        axis=1,
    )
    np.testing.assert_allclose(library_delta_gram(lib), flat @ flat.T, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("method", [KMeansClustering(), MBCClustering()])
def test_parameter_methods_recover_planted_groups(method):
    lib = planted_library()
    result = method.fit(lib, 3, seed=0)
    assert same_partition(result.assign, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(result.assign, method.fit(lib, 3, seed=0).assign)


def test_mbc_is_invariant_to_adapter_norm_kmeans_is_not():
    # Same directions, very different norms: cosine (MBC) ignores the norm.
    groups = (0, 0, 0, 1, 1, 1)
    lib = planted_library(groups=groups, noise=0.01)
    big = {
        m: {"A": f["A"] * jnp.asarray([1, 1, 30, 1, 1, 30.0])[:, None, None, None], "B": f["B"]}
        for m, f in lib.params.items()
    }
    lib = AdapterLibrary(**{**lib.__dict__, "params": big})
    assert same_partition(MBCClustering().fit(lib, 2, seed=0).assign, groups)
    assert not same_partition(KMeansClustering().fit(lib, 2, seed=0).assign, groups)


def test_random_is_seeded_and_uses_every_cluster():
    lib = planted_library(groups=tuple(range(5)) * 4)
    a = RandomClustering().fit(lib, 7, seed=3).assign
    np.testing.assert_array_equal(a, RandomClustering().fit(lib, 7, seed=3).assign)
    assert not np.array_equal(a, RandomClustering().fit(lib, 7, seed=4).assign)
    check_assignment(a, 7)


def test_assignment_checks_and_mask():
    with pytest.raises(ValueError, match="every cluster"):
        check_assignment(np.array([0, 0, 2]), 3)
    mask = membership_mask(np.array([1, 0, 1]), 2)
    np.testing.assert_array_equal(mask, [[False, True, False], [True, False, True]])
