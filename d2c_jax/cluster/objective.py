"""The dev-set objective of data-driven clustering: merge member sets, score their tasks.

`DevObjective.task_losses(masks [C, N])` merges each row's members (the same
`MergeConfig` as `d2c merge`, prepared once so trimming is not repeated) and
returns, for every member task t of row c, the mean over t's dev examples of the
example NLL (mean over target tokens and eos, the scoring contract) under the
merged adapter. All C candidates go through one batched merge and one vmapped,
jitted scoring call per chunk; each candidate is scored only on its own member
tasks' examples (gathered by index from one encoded example bank).

`DevObjective.task_scores(masks)` is the same pass with teacher-forced correctness
(``correctness=True`` of `d2c_jax.scoring.score_candidates`): ``[C, F, N]``, for each
field of `kernels.loss.ExampleScores` (nll, exact, accuracy, margin, soft) its mean over
a member task's dev examples; the ``exact`` and ``margin`` task losses of D2C read it.

By default candidates are scored with their *untruncated* merged delta (applied
as ``x delta^T``), which skips a rank-r SVD per module and candidate; with
``score_deployed=True`` they are truncated to rank r first, so the search scores
exactly the adapters it would deploy. `benchmarks/bench_d2c.py` measures how much
the two rankings differ.

Screening: `DevObjective.first_order_moves(assign, k)` estimates the change of
``N * J`` of every move from one forward of every task under every current merge,
one backward pass per cluster (gradient of its summed loss w.r.t. its merged
delta) and the exact merged deltas of the moved-from and moved-to sets (no forward
pass for them); the approximation is stated in `kernels.screening`. It always
uses the untruncated merged delta, also with ``score_deployed``.

Devices: the objective owns a `jax.sharding.Mesh` (`d2c_jax.sharding`). The base is
replicated once, the prepared library is split over its adapter axis, and each
chunk of candidates (membership rows, merged adapters, token rows) is split over
the devices, so the merge and the scoring of a chunk run in parallel; results do
not depend on the device count beyond float summation order.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from d2c_jax import merging, sharding
from d2c_jax.cluster.base import membership_mask
from d2c_jax.examples import DEFAULT_BUCKET, encode_examples, round_up
from d2c_jax.library import AdapterLibrary
from d2c_jax.packing import pack_examples
from d2c_jax.scoring import packed_nll, score_candidates, task_mean_nll
from kernels import screening
from kernels.loss import ExampleScores
from kernels.merge import MergeConfig

# A jitted call scores candidates whose work is within this factor of its largest
# one's, so at most a quarter of the computed rows are padding.
SIMILAR_WORK = 0.75


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """How candidates are scored.

    Attributes:
      score_deployed: truncate merged deltas to rank r before scoring (exact but slower).
      candidates_per_call: candidates merged and scored per jitted call; bounds memory
        (each holds its dense deltas, about 53 MB for SmolLM2-135M q,v in float32).
        Rounded up to a multiple of the device count.
      devices: devices to split candidates over (default: all visible devices).
    """

    score_deployed: bool = False
    candidates_per_call: int = 8
    devices: int | None = None


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
        self.mesh = sharding.make_mesh(config.devices)
        self.base = sharding.put(base, self.mesh, sharding.BASE)
        self.library = library
        self.config = config
        self.num_tasks = library.num_adapters
        self.prepared = sharding.put(
            merging.prepare(library.params, library.scale, merge_config, names=library.names),
            self.mesh,
            sharding.LIBRARY,
        )
        self.candidates_per_call = sharding.round_to_devices(config.candidates_per_call, self.mesh)
        self._set_examples(examples)

    def _set_examples(self, examples: Mapping[str, Sequence[dict]]) -> None:
        flat, task_of = [], []
        for t, name in enumerate(self.library.names):
            flat.extend(examples[name])
            task_of.extend([t] * len(examples[name]))
        self.bank = encode_examples(self.base, flat, task_key=None)
        self.task_of = np.asarray(task_of)
        self.examples_of = [np.flatnonzero(self.task_of == t) for t in range(self.num_tasks)]
        # [N] tokens of each task's examples: orders candidates by the work they need.
        self.task_tokens = np.bincount(
            self.task_of, weights=self.bank.lengths, minlength=self.num_tasks
        )
        self.evaluations = 0

    def with_examples(self, examples: Mapping[str, Sequence[dict]]) -> DevObjective:
        """The same base, prepared library, merge and devices, scoring other examples
        (e.g. held-out ones: the objective's value on data a search never saw), without
        a second copy of the prepared library."""
        check_examples(self.library, examples)
        other = copy.copy(self)
        other._set_examples(examples)
        return other

    def _chunk_size(self, count: int) -> int:
        """Candidates computed for a chunk of `count`: `merging.bucket_size`, at most
        `candidates_per_call`, rounded to a multiple of the devices. A short chunk (a
        sweep-mode visit scores about K sets) is not padded to full size."""
        size = merging.bucket_size(count)
        return sharding.round_to_devices(min(self.candidates_per_call, size), self.mesh)

    def _chunks(self, masks: np.ndarray) -> list[np.ndarray]:
        """Rows of ``masks [C, N]`` to merge and score together, one list per jitted call.

        Every candidate of a call is computed on as many packed rows as the call's
        largest, so a call groups candidates of similar work: taken largest first
        (tokens of their members' examples), a call holds at most
        `candidates_per_call` and only candidates that need at least
        `SIMILAR_WORK` of its first one's tokens. A sweep-mode visit (one source set
        ``a - i`` and K-1 destinations ``b + i`` of very different sizes) would
        otherwise compute every small set at the size of the largest."""
        tokens = masks @ self.task_tokens
        order = np.argsort(-tokens, kind="stable")
        chunks, start = [], 0
        while start < len(order):
            stop = start + 1
            while (
                stop < len(order)
                and stop - start < self.candidates_per_call
                and tokens[order[stop]] >= SIMILAR_WORK * tokens[order[start]]
            ):
                stop += 1
            chunks.append(order[start:stop])
            start = stop
        return chunks

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
        """Merged adapters of the rows of ``masks [C, N]`` in the form that is scored
        (C a multiple of the device count)."""
        if self.config.score_deployed:
            merged = merging.merged_factors(self.prepared, masks, **self._placement)
            return merged.params, merged.scale
        return merging.merged_deltas(self.prepared, masks, **self._placement), None

    @property
    def _placement(self) -> dict:
        """How merges place their member lists ``[C, S]``: split over the candidate
        axis of the mesh, C a multiple of the devices."""
        return {
            "place": lambda tree: sharding.put(tree, self.mesh, sharding.CANDIDATES),
            "rows_multiple": sharding.num_devices(self.mesh),
        }

    def task_losses(self, masks: np.ndarray) -> np.ndarray:
        """``masks [C, N]`` bool -> ``[C, N]``: mean dev NLL of each member task, 0 elsewhere."""
        return self._member_task_means(masks, correctness=False)[:, 0]

    def task_scores(self, masks: np.ndarray) -> np.ndarray:
        """``masks [C, N]`` bool -> ``[C, F, N]``: per member task, the mean over its dev
        examples of each `kernels.loss.ExampleScores` field (F = 5, in field order: nll,
        exact match, token accuracy, smallest margin, soft accuracy), 0 elsewhere. The
        NLL row equals `task_losses`."""
        return self._member_task_means(masks, correctness=True)

    def _member_task_means(self, masks: np.ndarray, correctness: bool) -> np.ndarray:
        """Shared body of `task_losses` and `task_scores`: ``[C, F, N]`` with F = 1 (NLL)
        or the `ExampleScores` fields."""
        masks = np.asarray(masks, bool)
        if masks.ndim != 2 or masks.shape[1] != self.num_tasks:
            raise ValueError(f"masks must be [C, N={self.num_tasks}], got {masks.shape}")
        if not masks.any(axis=1).all():
            raise ValueError("every candidate needs at least one member")
        fields = len(ExampleScores._fields) if correctness else 1
        out = np.zeros((masks.shape[0], fields, masks.shape[1]), np.float64)
        # Merged dense deltas are large, so merge and score one chunk at a time.
        for rows in self._chunks(masks):
            chunk = masks[rows]
            padded = np.concatenate(
                [chunk, np.repeat(chunk[:1], self._chunk_size(len(chunk)) - len(chunk), 0)]
            )
            index, valid = self._gather_plan(padded)
            adapters, scale = self.candidate_adapters(padded)
            scores = score_candidates(
                self.base,
                adapters,
                self.bank,
                index,
                valid,
                scale=scale,
                chunk_size=len(padded),
                mesh=self.mesh,
                correctness=correctness,
            )  # [C, M] (each field with correctness), NaN where invalid
            for f, per_example in enumerate(scores if correctness else (scores,)):
                per_task = task_mean_nll(per_example, self.task_of[index], self.num_tasks)
                out[rows, f] = np.nan_to_num(per_task[: len(chunk)], nan=0.0)  # [C, N]
        self.evaluations += len(masks)
        return out

    # ------------------------------------------------------------------ screening

    def _pad(self, masks: np.ndarray) -> np.ndarray:
        """Pad rows (repeating the first) to a multiple of the device count."""
        rows = sharding.round_to_devices(len(masks), self.mesh)
        return np.concatenate([masks, np.repeat(masks[:1], rows - len(masks), 0)])

    def _merged(self, masks: np.ndarray):
        return merging.merged_deltas(self.prepared, masks, **self._placement)

    def cross_losses(self, masks: np.ndarray) -> np.ndarray:
        """``masks [C, N]`` -> ``[C, N]``: mean dev NLL of *every* task under each row's
        merge (untruncated delta)."""
        padded = self._pad(np.asarray(masks, bool))
        m = self.bank.num_examples
        index = np.tile(np.arange(m), (len(padded), 1))
        nll = score_candidates(
            self.base,
            self._merged(padded),
            self.bank,
            index,
            chunk_size=self.candidates_per_call,
            mesh=self.mesh,
        )
        return task_mean_nll(nll, self.task_of[index], self.num_tasks)[: len(masks)]

    def cluster_gradients(self, masks: np.ndarray):
        """``masks [C, N]`` -> (merged deltas, gradients of ``S(row)`` w.r.t. them), both
        ``{module: {"delta": [C', L, d_out, d_in]}}`` with C' = C padded to the devices."""
        padded = self._pad(np.asarray(masks, bool))
        merged = self._merged(padded)
        index, valid = self._gather_plan(padded)
        per_task = np.asarray([len(e) for e in self.examples_of], np.float32)
        weights = np.where(valid, 1.0 / per_task[self.task_of[index]], 0.0).astype(np.float32)
        longest = int(self.bank.lengths[index][valid].max())
        packed = pack_examples(
            self.bank, index, valid, max(128, round_up(longest, DEFAULT_BUCKET)), DEFAULT_BUCKET
        )
        rows = (packed.tokens, packed.segments, packed.positions, packed.loss_mask, packed.slots)
        grads = _cluster_gradients(
            self.base,
            merged,
            *sharding.put((*rows, weights), self.mesh, sharding.CANDIDATES),
            num_examples=index.shape[1],
            max_labels=packed.max_labels,
        )
        return merged, grads

    def first_order_moves(self, assign: np.ndarray, k: int) -> np.ndarray:
        """Estimated change of ``N * J`` of every move ``i -> b``: ``[N, K]`` float64,
        ``+inf`` where b is i's cluster or the move would empty a cluster."""
        n = self.num_tasks
        masks = membership_mask(assign, k)
        cross = self.cross_losses(masks)  # [K, N]
        current, grads = self.cluster_gradients(masks)
        eye = np.eye(n, dtype=bool)
        sources = masks[assign] & ~eye  # [N, N]: row i = a(i) - i
        dests = (masks[None, :, :] | eye[:, None, :]).reshape(n * k, n)  # row i*K+b = b + i
        candidates = np.concatenate([sources, dests])
        cluster = np.concatenate([assign, np.tile(np.arange(k), n)])
        changes = np.empty(len(cluster))
        step = self.candidates_per_call
        for start in range(0, len(cluster), step):
            rows = candidates[start : start + step]
            sel = cluster[start : start + step]
            pad = step - len(rows)
            rows = np.concatenate([rows, np.repeat(rows[:1], pad, 0)])
            sel = np.concatenate([sel, np.repeat(sel[:1], pad)])
            take = lambda tree, sel=sel: jax.tree.map(lambda x: x[jnp.asarray(sel)], tree)
            change = _directional_change(take(grads), self._merged(rows), take(current))
            changes[start : start + len(rows) - pad] = sharding.fetch(change)[: step - pad]
        onehot = masks.T.astype(np.float32)
        estimate = np.asarray(
            screening.estimate_moves(onehot, cross, changes[:n], changes[n:].reshape(n, k)),
            np.float64,
        )
        estimate[masks.sum(1)[assign] == 1] = np.inf  # moving would empty the cluster
        return estimate


_directional_change = jax.jit(screening.directional_change)


@functools.partial(jax.jit, static_argnames=("num_examples", "max_labels"))
def _cluster_gradients(base, deltas, *rows_and_weights, num_examples, max_labels):
    """Per row c: gradient of ``sum_m weights[c, m] * nll[c, m]`` w.r.t. ``deltas[c]``."""

    def loss(delta, tokens, segments, positions, loss_mask, slots, weights):
        nll = packed_nll(
            base,
            delta,
            1.0,
            tokens,
            segments,
            positions,
            loss_mask,
            slots,
            num_examples=num_examples,
            max_labels=max_labels,
        )
        return jnp.sum(weights * nll)

    return jax.vmap(jax.grad(loss))(deltas, *rows_and_weights)
