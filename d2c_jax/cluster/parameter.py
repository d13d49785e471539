"""Data-free clustering baselines: random, K-Means on adapter parameters, and MBC.

* `RandomClustering`: a seeded uniform assignment with every cluster non-empty.
* `KMeansClustering`: K-Means on the flattened dense deltas ``scale * B @ A`` of all
  target modules and layers. It runs on their exact Gram matrix, computed from the
  factors (`kernels.kmeans.delta_gram`), which is the same clustering as on the
  flattened deltas without ever materialising ``[N, L, d_out, d_in]``.
* `MBCClustering`: model-based clustering of Ostapenko et al. 2024 ("Towards
  Modular LLMs by Building and Reusing a Library of LoRAs"): each adapter's
  flattened LoRA parameters (A and B of every module and layer) are sparsified to
  their top `keep_fraction` by magnitude, embedded by truncated SVD into `svd_dims`
  dimensions, and clustered by K-Means with cosine similarity.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from d2c_jax.cluster.base import ClusteringResult
from d2c_jax.library import AdapterLibrary
from kernels.kmeans import delta_gram, kmeans, svd_embed, top_fraction


@contextlib.contextmanager
def _announced(what: str):
    """One line on stderr before a step and its time after: the restarts run as one
    vmapped compiled call, so there is no per-restart progress to show."""
    print(f"{what}...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"{what}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def random_assignment(n: int, k: int, seed: int) -> np.ndarray:
    """Uniformly random ``[N]`` assignment in which every one of the k clusters is used."""
    rng = np.random.default_rng(seed)
    assign = np.concatenate([np.arange(k), rng.integers(0, k, size=n - k)])
    return rng.permutation(assign).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class RandomClustering:
    name: ClassVar[str] = "random"

    def fit(self, library: AdapterLibrary, k: int, seed: int, objective: Any = None):
        return ClusteringResult(self.name, random_assignment(library.num_adapters, k, seed), k)


def library_delta_gram(library: AdapterLibrary) -> jax.Array:
    """``[N, N]`` inner products of the adapters' dense deltas over all modules and layers."""
    return sum(delta_gram(f["A"], f["B"], library.scale) for f in library.params.values())


@dataclasses.dataclass(frozen=True)
class KMeansClustering:
    """K-Means (k-means++, `num_restarts` restarts) on flattened dense deltas."""

    name: ClassVar[str] = "kmeans"
    num_restarts: int = 10
    num_iters: int = 100

    def fit(self, library: AdapterLibrary, k: int, seed: int, objective: Any = None):
        what = (
            f"K-Means: {self.num_restarts} restarts on the delta Gram matrix of "
            f"N={library.num_adapters} adapters, K={k}"
        )
        with _announced(what):
            gram = library_delta_gram(library)
            assign, inertia = kmeans(
                gram,
                jax.random.key(seed),
                k=k,
                num_restarts=self.num_restarts,
                num_iters=self.num_iters,
            )
            assign, inertia = jax.block_until_ready((assign, inertia))
        return ClusteringResult(
            self.name, np.asarray(assign, np.int32), k, info={"inertia": float(inertia)}
        )


def flat_lora_parameters(library: AdapterLibrary) -> jax.Array:
    """``[N, D]``: each adapter's A and B factors of every module and layer, concatenated."""
    parts = []
    for module in library.target_modules:
        for factor in "AB":
            x = library.params[module][factor]
            parts.append(x.reshape(x.shape[0], -1))
    return jnp.concatenate(parts, axis=1)


@dataclasses.dataclass(frozen=True)
class MBCClustering:
    """MBC: top-`keep_fraction` sparsification, SVD to `svd_dims`, cosine K-Means."""

    name: ClassVar[str] = "mbc"
    keep_fraction: float = 0.2
    svd_dims: int = 64
    num_restarts: int = 10
    num_iters: int = 100

    def fit(self, library: AdapterLibrary, k: int, seed: int, objective: Any = None):
        what = (
            f"MBC: sparsify and SVD-embed N={library.num_adapters} adapters, then "
            f"{self.num_restarts} cosine K-Means restarts, K={k}"
        )
        with _announced(what):
            features = svd_embed(
                top_fraction(flat_lora_parameters(library), self.keep_fraction), self.svd_dims
            )
            assign, inertia = kmeans(
                features @ features.T,
                jax.random.key(seed),
                k=k,
                num_restarts=self.num_restarts,
                num_iters=self.num_iters,
                metric="cosine",
            )
            assign, inertia = jax.block_until_ready((assign, inertia))
        return ClusteringResult(
            self.name, np.asarray(assign, np.int32), k, info={"cosine_inertia": float(inertia)}
        )
