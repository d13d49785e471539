"""K-Merge's online clustering against a plain NumPy transcription on dense deltas."""

from __future__ import annotations

import numpy as np
import pytest

from d2c_jax.cluster import METHODS, KMergeClustering
from kernels.lowrank import factor_cosine
from tests.test_cluster_parameter import planted_library, same_partition


def kmerge_reference(library, k, seed):
    """K-Merge with dense deltas: cosine of flattened per-(module, layer) deltas, averaged;
    the cluster adapter's factors are PEFT's linear running mean (sqrt weights)."""
    n = library.num_adapters
    order = np.random.default_rng(seed).permutation(n)
    scale = np.asarray(library.scale, np.float64)
    factors = {
        m: (np.asarray(f["A"], np.float64), np.asarray(f["B"], np.float64))
        for m, f in library.params.items()
    }
    clusters, sizes, assign = [], [], np.full(n, -1)
    for step, i in enumerate(order):
        new = {
            m: (np.sqrt(scale[i]) * a[i], np.sqrt(scale[i]) * b[i]) for m, (a, b) in factors.items()
        }
        if step < k:
            clusters.append(new)
            sizes.append(1)
            assign[i] = step
            continue
        sims = []
        for cl in clusters:
            cos = []
            for m in sorted(new):
                for layer in range(new[m][0].shape[0]):
                    x = (new[m][1][layer] @ new[m][0][layer]).ravel()
                    y = (cl[m][1][layer] @ cl[m][0][layer]).ravel()
                    cos.append(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
            sims.append(np.mean(cos))
        c = int(np.argmax(sims))
        sizes[c] += 1
        w = 1 / sizes[c]
        clusters[c] = {
            m: tuple(
                np.sqrt(1 - w) * old + np.sqrt(w) * add
                for old, add in zip(clusters[c][m], new[m], strict=True)
            )
            for m in new
        }
        assign[i] = c
    return assign


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scales", [None, [0.5, 2.0, 1.0, 1.5, 1.0, 0.7, 1.0, 3.0, 1.0]])
def test_matches_dense_reference(seed, scales):
    library = planted_library(noise=0.8, seed=seed, scales=scales)
    result = KMergeClustering().fit(library, 3, seed)
    np.testing.assert_array_equal(result.assign, kmerge_reference(library, 3, seed))
    assert sorted(set(result.assign.tolist())) == [0, 1, 2]


def test_recovers_planted_groups_when_the_first_arrivals_open_one_each():
    groups = (0, 0, 0, 1, 1, 1, 2, 2, 2)
    library = planted_library(groups=groups, noise=0.05)
    # K-Merge cannot split a group it never opened: pick a seed whose first K
    # arrivals come from distinct groups.
    seed = next(
        s
        for s in range(100)
        if len({groups[i] for i in np.random.default_rng(s).permutation(9)[:3]}) == 3
    )
    result = METHODS["kmerge"]().fit(library, 3, seed=seed)
    assert same_partition(result.assign, groups)


def test_factor_cosine_equals_dense_cosine():
    rng = np.random.default_rng(0)
    a1, a2 = rng.normal(size=(2, 3, 2, 5))
    b1, b2 = rng.normal(size=(2, 3, 4, 2))
    got = np.asarray(factor_cosine(a1, b1, a2, b2))
    for layer in range(3):
        x, y = (b1[layer] @ a1[layer]).ravel(), (b2[layer] @ a2[layer]).ravel()
        assert got[layer] == pytest.approx(x @ y / np.linalg.norm(x) / np.linalg.norm(y), abs=1e-5)
    assert float(factor_cosine(np.zeros((2, 5)), b1[0], a2[0], b2[0])) == 0.0
