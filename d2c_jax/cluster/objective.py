"""The dev-set objective of data-driven clustering: merge member sets, score their tasks.

`DevObjective.task_losses(masks [C, N])` merges each row's members (the same
`MergeConfig` as `d2c merge`, prepared once so trimming is not repeated) and
returns, for every member task t of row c, the mean over t's dev examples of the
example NLL (mean over target tokens and eos, the scoring contract) under the
merged adapter. All C candidates go through one batched merge and one vmapped,
jitted scoring call per chunk; each candidate is scored only on its own member
tasks' examples (gathered by index from one encoded example bank).

By default candidates are scored with their *untruncated* merged delta (applied
as ``x delta^T``), which skips a rank-r SVD per module and candidate; with
``score_deployed=True`` they are truncated to rank r first, so the search scores
exactly the adapters it would deploy. `benchmarks/bench_d2c.py` measures how much
the two rankings differ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from d2c_jax import merging
from d2c_jax.library import AdapterLibrary
from d2c_jax.scoring import encode_examples, score_candidates, task_mean_nll
from kernels.merge import MergeConfig


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """How candidates are scored.

    Attributes:
      score_deployed: truncate merged deltas to rank r before scoring (exact but slower).
      candidates_per_call: candidates merged and scored per jitted call; bounds memory
        (each holds its dense deltas, about 53 MB for SmolLM2-135M q,v in float32).
    """

    score_deployed: bool = False
    candidates_per_call: int = 8


def check_examples(library: AdapterLibrary, examples: Mapping[str, Sequence[dict]]) -> None:
    """Every adapter's task needs dev examples; examples for unknown tasks are an error."""
    missing = [name for name in library.names if not examples.get(name)]
    if missing:
        raise ValueError(f"no dev examples for tasks {missing}; every adapter needs some")
    unknown = sorted(set(examples) - set(library.names))
    if unknown:
        raise ValueError(
            f"dev examples given for tasks not in the library: {unknown} "
            f"(library tasks: {list(library.names)})"
        )


class DevObjective:
    """``task_losses(masks)`` for the D2C search; see module docstring."""

    def __init__(
        self,
        base,
        library: AdapterLibrary,
        examples: Mapping[str, Sequence[dict]],
        merge_config: MergeConfig,
        config: ObjectiveConfig = ObjectiveConfig(),
    ):
        check_examples(library, examples)
        self.base = base
        self.library = library
        self.config = config
        self.num_tasks = library.num_adapters
        self.prepared = merging.prepare(
            library.params, library.scale, merge_config, names=library.names
        )
        flat, task_of = [], []
        for t, name in enumerate(library.names):
            flat.extend(examples[name])
            task_of.extend([t] * len(examples[name]))
        self.bank = encode_examples(base, flat, task_key=None)
        self.task_of = np.asarray(task_of)
        self.examples_of = [np.flatnonzero(self.task_of == t) for t in range(self.num_tasks)]
        self.evaluations = 0

    def _gather_plan(self, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per candidate, the bank indices of its member tasks' examples: ``[C, M]`` + valid."""
        rows = [np.concatenate([self.examples_of[t] for t in np.flatnonzero(m)]) for m in masks]
        width = max(len(r) for r in rows)
        # Round up so that few distinct shapes are compiled.
        per_task = max(len(e) for e in self.examples_of)
        width = int(np.ceil(width / per_task) * per_task)
        index = np.zeros((len(rows), width), np.int32)
        valid = np.zeros((len(rows), width), bool)
        for c, r in enumerate(rows):
            index[c, : len(r)] = r
            valid[c, : len(r)] = True
        return index, valid

    def candidate_adapters(self, masks: np.ndarray):
        """Merged adapters of the rows of ``masks [C, N]`` in the form that is scored."""
        membership = jnp.asarray(masks, jnp.float32)
        if self.config.score_deployed:
            merged = merging.merged_factors(self.prepared, membership)
            return merged.params, merged.scale
        return merging.merged_deltas(self.prepared, membership), None

    def task_losses(self, masks: np.ndarray) -> np.ndarray:
        """``masks [C, N]`` bool -> ``[C, N]``: mean dev NLL of each member task, 0 elsewhere."""
        masks = np.asarray(masks, bool)
        if masks.ndim != 2 or masks.shape[1] != self.num_tasks:
            raise ValueError(f"masks must be [C, N={self.num_tasks}], got {masks.shape}")
        if not masks.any(axis=1).all():
            raise ValueError("every candidate needs at least one member")
        out = np.zeros(masks.shape, np.float64)
        step = self.config.candidates_per_call
        # Merged dense deltas are large, so merge and score one chunk at a time.
        for start in range(0, len(masks), step):
            chunk = masks[start : start + step]
            # Pad to a fixed count so the jitted merge compiles once.
            padded = np.concatenate([chunk, np.repeat(chunk[:1], step - len(chunk), 0)])
            index, valid = self._gather_plan(padded)
            adapters, scale = self.candidate_adapters(padded)
            nll = score_candidates(
                self.base, adapters, self.bank, index, valid, scale=scale, chunk_size=step
            )  # [C, M], NaN where invalid
            per_task = task_mean_nll(nll, self.task_of[index], self.num_tasks)  # [C, N]
            out[start : start + len(chunk)] = np.nan_to_num(per_task[: len(chunk)], nan=0.0)
        self.evaluations += len(masks)
        return out
