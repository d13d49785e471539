"""K-Merge: the data-free online clustering of the same group as D2C (arXiv 2510.13537).

Adapters arrive one at a time, in a seeded random order (K-Merge's shuffled arrival).
The first K each open a cluster. Every later adapter joins the cluster whose current
merged adapter is most similar to it, the similarity being the cosine between the
two dense deltas ``B @ A`` averaged over every (module, layer), and that cluster's
adapter becomes the running mean of its members: PEFT's factor-space ``linear`` merge
of (cluster, newcomer) with weights ``(1 - 1/s, 1/s)``, s the cluster's new size, which
scales A and B each by the square root of weight x LoRA scale (read from the authors'
code: `run_experiments.py` and `merge.py`, ``--lora_merge_strategy kmerge``).

Only the assignment is kept: as for every method in this engine, the clusters are
then merged with the configured merge (`d2c_jax.merging`), so methods differ only in
how they group. Clusters are processed together (``[K, L, r, d_in]`` stacks); the
loop is over arrivals, which is the algorithm's own sequential order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from d2c_jax.cluster.base import ClusteringResult
from d2c_jax.library import AdapterLibrary
from kernels.lowrank import factor_cosine


@jax.jit
def _similarities(cluster_factors, new_factors) -> jax.Array:
    """Mean over modules and layers of the delta cosine: clusters ``{m: (A [K, L, r, d_in],
    B [K, L, d_out, r])}`` against one adapter ``{m: (A [L, r, d_in], B [L, d_out, r])}``
    -> ``[K]``."""
    per_module = [
        factor_cosine(new_factors[m][0][None], new_factors[m][1][None], *cluster_factors[m])
        for m in sorted(cluster_factors)
    ]  # each [K, L]
    return jnp.mean(jnp.stack(per_module, axis=1), axis=(1, 2))


@dataclasses.dataclass(frozen=True)
class KMergeClustering:
    """K-Merge's online rule (module docstring); `seed` fixes the arrival order."""

    name: ClassVar[str] = "kmerge"

    def fit(self, library: AdapterLibrary, k: int, seed: int, objective: Any = None):
        n = library.num_adapters
        order = np.random.default_rng(seed).permutation(n)
        root_scale = np.sqrt(np.asarray(library.scale, np.float32))
        # Each adapter's factors with sqrt(scale) on A and B: B @ A is its dense delta.
        scaled = {
            m: (
                jnp.asarray(f["A"]) * root_scale[:, None, None, None],
                jnp.asarray(f["B"]) * root_scale[:, None, None, None],
            )
            for m, f in library.params.items()
        }
        assign = np.full(n, -1, np.int32)
        assign[order[:k]] = np.arange(k)
        clusters = {m: (a[order[:k]], b[order[:k]]) for m, (a, b) in scaled.items()}
        sizes = np.ones(k)
        for i in order[k:]:
            new = {m: (a[i], b[i]) for m, (a, b) in scaled.items()}
            c = int(jnp.argmax(_similarities(clusters, new)))
            sizes[c] += 1
            keep, add = np.sqrt(1 - 1 / sizes[c]), np.sqrt(1 / sizes[c])
            clusters = {
                m: (
                    a.at[c].set(keep * a[c] + add * new[m][0]),
                    b.at[c].set(keep * b[c] + add * new[m][1]),
                )
                for m, (a, b) in clusters.items()
            }
            assign[i] = c
        return ClusteringResult(self.name, assign, k, info={"arrival_order": order.tolist()})
