"""Clustering methods behind one interface (see `d2c_jax.cluster.base`).

`METHODS` maps a method name to its class; every class is a frozen dataclass of
settings with ``fit(library, k, seed, objective=None) -> ClusteringResult``.
"""

from __future__ import annotations

from d2c_jax.cluster.base import (
    ClusteringMethod,
    ClusteringResult,
    check_assignment,
    membership_mask,
    resolve_budget,
)
from d2c_jax.cluster.d2c import D2CClustering
from d2c_jax.cluster.kmerge import KMergeClustering
from d2c_jax.cluster.parameter import KMeansClustering, MBCClustering, RandomClustering

METHODS: dict[str, type] = {
    cls.name: cls
    for cls in (
        RandomClustering,
        KMeansClustering,
        MBCClustering,
        KMergeClustering,
        D2CClustering,
    )
}

__all__ = [
    "METHODS",
    "ClusteringMethod",
    "ClusteringResult",
    "D2CClustering",
    "KMeansClustering",
    "KMergeClustering",
    "MBCClustering",
    "RandomClustering",
    "check_assignment",
    "membership_mask",
    "resolve_budget",
]
