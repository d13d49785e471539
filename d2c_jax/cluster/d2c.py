"""D2C: data-driven clustering by exact reassignment search (see docs/ARCHITECTURE.md).

The objective of an assignment is

    J(assign) = mean over tasks t of  nll_t(merge(cluster of t)),

the dev-set loss of each task under the merged adapter of its cluster. Because a
cluster's merge and losses depend only on its member set, the search works with
*cluster losses* ``S(members) = sum_{t in members} f(nll_t(merge(members)))`` and
``J = sum_k S(cluster k) / N``, where ``f`` is the task loss (`TASK_LOSSES`):
``nll`` (the default, ``f(x) = x``: D2C as defined) or ``likelihood``
(``f(x) = 1 - exp(-x)``; ``exp(-x)`` is a geometric mean of target-token probabilities). Mean
NLL is unbounded: pulling a broken task from NLL 9 to 2 (still broken) pays as much
as keeping a working task from going 0.1 to 7.1, while a generation score saturates at
0. ``likelihood`` is bounded in [0, 1), so it weighs the tasks that work. The cache
holds the raw per-task NLL, so both share it.

Two task losses read teacher-forced correctness from the same forward pass
(`kernels.loss.ExampleScores`, averaged over a task's dev examples by
`DevObjective.task_scores`): ``exact`` is ``1 - em_t + TIE_BREAK * (1 - exp(-nll_t))``,
the fraction of dev examples whose target and eos are not all the strict argmax, with
the likelihood loss as a tie-break (``TIE_BREAK = 0.1`` times a value below 1 is less
than one example of a task with 10 dev examples, so within a task the tie-break never
outweighs an exactly matched example; across tasks it is a sum). ``margin`` is
``1 - soft_t``, one minus the mean over a task's target tokens (per example, then over
examples) of ``sigmoid(logit_target - max_other)``: a smooth, parameter-free surrogate of
token accuracy. These need ``task_scores`` and keep their own cache (of every score, so
``exact`` and ``margin`` share it); the sweep's loss proxy still ranks destinations by NLL.

A candidate move of adapter i from cluster a to cluster b changes J by

    dJ(i -> b) = [S(a - i) + S(b + i) - S(a) - S(b)] / N,

so scoring every move of an iteration needs at most N "source" sets ``a - i`` and
N (K-1) "destination" sets ``b + i``. All of them go to the objective in one
batched call (`Objective.task_losses` on a ``[C, N]`` membership mask, which merges
and scores them with vmapped, jitted kernels); member sets already scored are
served from a cache keyed by membership, so after a move only sets that involve
the two changed clusters are scored again.

Modes:
  * ``best``: every iteration scores all N (K-1) moves and applies the single best
    improving one.
  * ``sweep``: an iteration visits the adapters in a seeded order (a function of
    seed and iteration) and applies each adapter's best improving move at once.
  * ``lloyd`` (the D2C paper's probable rule): every iteration merges the K
    clusters, scores every task's dev examples under every merge (N x K task
    evaluations instead of N(K-1) member sets of about N/K tasks each) and moves
    each task to the cluster whose merge serves it best; the simultaneous step is
    applied only if it lowers J (else its most promising half, and so on), so J
    never increases. A move's ``delta_j`` in the log is that of the whole step.
Moves that would empty a cluster are never considered. The search stops when no
move improves J by more than `tol` or after `max_iters` iterations.

Screening (``best`` mode, ``screen_top = M > 0``, off by default): the objective's
first-order estimate of every move (`DevObjective.first_order_moves`, stated in
`kernels.screening`) ranks the candidates; only the M best-estimated moves plus a
seeded random sample of `screen_sample` moves are scored exactly. Reliability
check: if the Spearman correlation between estimate and exact change on that
sample is below `screen_min_corr`, or no exactly scored move improves J, every
move of the iteration is scored exactly (so a screened search stops only where the
exact one would). Only exactly scored moves are ever applied, so J never
increases; with M at least the number of candidates it is the exact search.

Resumability: with a checkpoint directory the state (assignment, iteration, log
and the score cache) is saved with orbax after every iteration; a resumed run
continues from the last saved iteration and reaches the same assignment as an
uninterrupted one (scores come from the same cache or the same deterministic
kernels, ties are broken by the fixed order of (adapter, cluster)). A sweep over a
large library takes many minutes, so during a sweep the score cache is also saved
every `SWEEP_SAVE_SECONDS` together with the assignment the sweep started from: a
resumed run replays the sweep's visits from the cache (no scoring) up to where
it was killed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
from tqdm.auto import tqdm

from d2c_jax.cluster.base import ClusteringResult, membership_mask
from d2c_jax.cluster.parameter import (
    KMeansClustering,
    MBCClustering,
    RandomClustering,
    library_delta_gram,
)
from d2c_jax.library import AdapterLibrary
from kernels.loss import ExampleScores
from kernels.screening import spearman

# During a sweep, save the score cache at most this often (see module docstring).
SWEEP_SAVE_SECONDS = 120.0

INITS = ("kmeans", "mbc", "random", "best")
# The data-free starts that ``init="best"`` chooses among by the objective.
BEST_OF = ("kmeans", "mbc")
MODES = ("best", "sweep", "lloyd")

# Destinations a sweep visit scores by default (``D2CClustering.destinations``).
SWEEP_DESTINATIONS = 1
# How a sweep ranks an adapter's destinations (``D2CClustering.destination_proxy``).
PROXIES = ("loss", "similarity")

# Per-task statistics of `DevObjective.task_scores` ``[C, F, N]``, in this order: the mean
# over a task's dev examples of each field of `kernels.loss.ExampleScores`.
TASK_SCORES = ExampleScores._fields
# Weight of the likelihood tie-break of the ``exact`` task loss (module docstring).
TIE_BREAK = 0.1


@dataclasses.dataclass(frozen=True)
class TaskLoss:
    """A per-task loss of J: ``fn(stats)`` maps ``{name: [N]}`` per-task statistics to
    ``[N]`` losses. ``scores``: it needs `TASK_SCORES` (``task_scores``), not only NLL."""

    fn: Any
    scores: bool = False


def _likelihood(stats):
    return -np.expm1(-stats["nll"])


# The per-task losses J can average (module docstring); non-member tasks add nothing.
TASK_LOSSES = {
    "nll": TaskLoss(lambda stats: stats["nll"]),
    "likelihood": TaskLoss(_likelihood),
    "exact": TaskLoss(lambda stats: 1.0 - stats["exact"] + TIE_BREAK * _likelihood(stats), True),
    "margin": TaskLoss(lambda stats: 1.0 - stats["soft"], True),
}


class Objective(Protocol):
    """What D2C needs from the data: per-task losses of merged member sets."""

    num_tasks: int

    def task_losses(self, masks: np.ndarray) -> np.ndarray:
        """``masks [C, N]`` bool -> ``[C, N]`` float64: nll of each member task under the
        merge of that row's members, 0 for non-members."""
        ...

    # Optional (the ``exact`` and ``margin`` task losses):
    # task_scores(masks [C, N]) -> [C, len(TASK_SCORES), N], 0 for non-members.


class CachedObjective:
    """Memoises `Objective.task_losses` (and ``task_scores``) by membership set and
    counts real evaluations."""

    def __init__(self, objective: Objective):
        self.objective = objective
        self.num_tasks = objective.num_tasks
        self.cache: dict[bytes, np.ndarray] = {}  # key -> [N] NLL
        self.scores: dict[bytes, np.ndarray] = {}  # key -> [len(TASK_SCORES), N]
        self.evaluations = 0

    @staticmethod
    def key(mask: np.ndarray) -> bytes:
        return np.packbits(mask.astype(bool)).tobytes()

    def cluster_losses(self, masks: np.ndarray, task_loss: str = "nll") -> np.ndarray:
        """``masks [C, N]`` -> ``S [C]``: sum over member tasks of ``TASK_LOSSES[task_loss]``
        of their statistics, scoring only unseen sets."""
        loss = TASK_LOSSES[task_loss]
        if loss.scores and not hasattr(self.objective, "task_scores"):
            raise ValueError(f"task loss {task_loss!r} needs an objective with task_scores")
        cache = self.scores if loss.scores else self.cache
        masks = np.asarray(masks, bool)
        keys = [self.key(m) for m in masks]
        missing: dict[bytes, np.ndarray] = {}
        for key, mask in zip(keys, masks, strict=True):
            if key not in cache and key not in missing:
                missing[key] = mask
        if missing:
            stacked = np.stack(list(missing.values()))
            if loss.scores:
                rows = self.objective.task_scores(stacked)
            else:
                rows = self.objective.task_losses(stacked)
            for key, row in zip(missing, rows, strict=True):
                cache[key] = np.asarray(row, np.float64)
                if loss.scores:  # the NLL comes with the scores
                    self.cache.setdefault(key, cache[key][TASK_SCORES.index("nll")])
            self.evaluations += len(missing)
        names = TASK_SCORES if loss.scores else ("nll",)
        sums = []
        for key, mask in zip(keys, masks, strict=True):
            stats = dict(zip(names, np.reshape(cache[key], (len(names), -1)), strict=True))
            sums.append(np.where(mask, loss.fn(stats), 0.0).sum())
        return np.array(sums)

    def cross_losses(self, masks: np.ndarray) -> np.ndarray:
        """``masks [C, N]`` -> ``[C, N]``: NLL of *every* task under each row's merge.

        Needs an objective with ``cross_losses`` (`DevObjective`). The member entries of
        a row are that member set's task losses, so they also fill the member-set cache.
        """
        if not hasattr(self.objective, "cross_losses"):
            raise ValueError("lloyd mode needs an objective with cross_losses (DevObjective)")
        masks = np.asarray(masks, bool)
        rows = self.objective.cross_losses(masks)
        self.evaluations += len(masks)
        for mask, row in zip(masks, rows, strict=True):
            self.cache.setdefault(self.key(mask), np.where(mask, row, 0.0).astype(np.float64))
        return np.asarray(rows, np.float64)

    def state(self) -> dict[str, np.ndarray]:
        """``keys``/``values``: the NLL cache; ``score_keys``/``score_values`` the scores
        cache, only if it holds anything."""
        n = self.objective.num_tasks
        unpack = lambda keys: np.stack(
            [np.unpackbits(np.frombuffer(k, np.uint8))[:n] for k in keys]
        )
        keys = list(self.cache)
        state = {
            "keys": unpack(keys) if keys else np.zeros((0, n), np.uint8),
            "values": np.stack([self.cache[k] for k in keys]) if keys else np.zeros((0, n)),
        }
        if self.scores:
            state["score_keys"] = unpack(list(self.scores))
            state["score_values"] = np.stack(list(self.scores.values()))
        return state

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for mask, values in zip(state["keys"], state["values"], strict=True):
            self.cache[self.key(mask)] = np.asarray(values, np.float64)
        for mask, values in zip(
            state.get("score_keys", ()), state.get("score_values", ()), strict=True
        ):
            self.scores[self.key(mask)] = np.asarray(values, np.float64)


def move_deltas(
    assign: np.ndarray,
    k: int,
    cached: CachedObjective,
    movers: np.ndarray,
    pairs: np.ndarray | None = None,
    task_loss: str = "nll",
):
    """Change of N*J (J with `task_loss`) for moving each adapter in `movers` to each cluster.

    Returns ``[len(movers), K]`` (inf where the move is a no-op, would empty a
    cluster, or is not in `pairs`) from one batched evaluation of all needed member
    sets: the K current clusters first, then per mover its source set and its
    destination sets. ``pairs [len(movers), K]`` bool selects the moves to score
    (default: all).
    """
    current = membership_mask(assign, k)  # [K, N]
    sizes = current.sum(1)
    masks = list(current)
    slots: dict[tuple[int, int], tuple[int, int]] = {}  # (mover row, b) -> (source, dest)
    wanted = np.ones((len(movers), k), bool) if pairs is None else np.asarray(pairs, bool)
    for row, i in enumerate(movers):
        a = assign[i]
        if sizes[a] == 1 or not np.delete(wanted[row], a).any():
            continue  # moving i would empty its cluster, or no move of i is wanted
        source = current[a].copy()
        source[i] = False
        masks.append(source)
        source_slot = len(masks) - 1
        for b in range(k):
            if b != a and wanted[row, b]:
                dest = current[b].copy()
                dest[i] = True
                masks.append(dest)
                slots[row, b] = (source_slot, len(masks) - 1)
    losses = cached.cluster_losses(np.stack(masks), task_loss)
    deltas = np.full((len(movers), k), np.inf)
    for (row, b), (source_slot, dest_slot) in slots.items():
        a = assign[movers[row]]
        deltas[row, b] = losses[source_slot] + losses[dest_slot] - losses[a] - losses[b]
    return deltas


def similarity_ranking(gram: np.ndarray, assign: np.ndarray, k: int) -> np.ndarray:
    """``[K, N]`` minus the cosine between each adapter's delta and the summed delta of
    each cluster's *other* members (lower: more promising destination).

    Args:
      gram: ``[N, N]`` inner products of the adapters' dense deltas
        (`d2c_jax.cluster.parameter.library_delta_gram`).
      assign: ``[N]`` cluster of each adapter.
      k: clusters.
    """
    member = membership_mask(assign, k).astype(np.float64)  # [K, N]
    gram = np.asarray(gram, np.float64)
    own = np.diag(gram)  # [N] squared norms
    with_all = member @ gram  # [K, N] <sum over c, delta_i>
    inner = with_all - member * own  # <sum of c's other members, delta_i>
    total = np.sum(with_all * member, axis=1)  # ||sum over c||^2
    # ||sum over c without i||^2 = total - 2 <sum over c, d_i> + ||d_i||^2 where i is in c
    others = total[:, None] - member * (2 * with_all - own)
    norm = np.sqrt(np.maximum(others, 0.0) * own)
    return -np.where(norm > 0, inner / np.where(norm > 0, norm, 1.0), 0.0)


def least_settled(ranking: np.ndarray, assign: np.ndarray, count: int) -> np.ndarray:
    """``[N]`` bool: the `count` adapters whose own cluster the proxy rates worst
    relative to their best other cluster (``ranking [K, N]``, lower: more promising;
    margin = own score - best other score, highest first; ties: lower index)."""
    n = assign.shape[0]
    own = ranking[assign, np.arange(n)]
    others = ranking.copy()
    others[assign, np.arange(n)] = np.inf
    margin = own - others.min(0)
    chosen = np.zeros(n, bool)
    chosen[np.argsort(-margin, kind="stable")[:count]] = True
    return chosen


def promising_destinations(losses: np.ndarray, current: int, m: int) -> np.ndarray:
    """``losses [K]`` (a task's loss under each cluster's merge) -> ``[K]`` bool: the m
    clusters other than `current` with the lowest loss (ties: lower index)."""
    order = [int(c) for c in np.argsort(losses, kind="stable") if c != current]
    wanted = np.zeros(len(losses), bool)
    wanted[order[:m]] = True
    return wanted


@dataclasses.dataclass(frozen=True)
class D2CClustering:
    """D2C search settings.

    Attributes:
      init: initial assignment: ``kmeans`` (K-Means on flattened parameters), ``mbc``
        (cosine K-Means on SVD features of the sparsified adapters), ``random``, or
        ``best``: whichever of kmeans and mbc has the lower objective J.
      mode: ``best`` (best single move per iteration), ``sweep`` (Gauss-Seidel) or
        ``lloyd`` (every task to the cluster whose current merge serves it best).
      max_iters: upper bound on iterations.
      tol: a move must lower J by more than this (in J's units: nats/token for
        ``nll``, probability for ``likelihood``, averaged over tasks).
      task_loss: the per-task loss J averages, a key of `TASK_LOSSES` (module docstring).
      kmeans: settings of the K-Means initialisation.
      destinations: M > 0 (``sweep`` mode): a visit scores only the adapter's M most
        promising destination clusters, ranked by its task's dev loss under each
        cluster's merge at the start of the sweep (K merges scored on every task,
        `CachedObjective.cross_losses`); 0 scores every destination; None (default):
        `SWEEP_DESTINATIONS` in sweep mode (other modes score every move).
      destination_proxy: how those M are ranked: ``loss`` (the default, above; K x N
        task evaluations per sweep) or ``similarity`` (cosine of the adapter's delta with
        the summed delta of each cluster's other members, `similarity_ranking`: no
        evaluation, for libraries where K x N evaluations cost more than the sweep).
      visit_fraction: the fraction of adapters a sweep visits (needs M > 0): the
        ceil(fraction * N) that the destination proxy finds least settled (`least_settled`,
        at the sweep's start), in the seeded order; 1.0 (default) visits every adapter.
        Fewer visits for less time: at N = 1000 a visit is two member sets of the real
        model (docs/ARCHITECTURE.md, Performance); the quality cost is in the ablation.
      screen_top: M > 0 turns on first-order screening (``best`` mode only): only the
        M best-estimated moves (plus the reliability sample) are scored exactly.
      screen_sample: moves scored exactly at random to check the estimate's ranking.
      screen_min_corr: below this Spearman correlation on the sample, the iteration
        scores every move exactly.
    """

    name: ClassVar[str] = "d2c"
    # Defaults: the variant chosen on the validation slice (docs/RESULTS.md, ablation).
    init: str = "best"
    mode: str = "sweep"
    max_iters: int = 1
    tol: float = 1e-4
    task_loss: str = "likelihood"
    kmeans: KMeansClustering = KMeansClustering()
    mbc: MBCClustering = MBCClustering()
    destinations: int | None = None
    destination_proxy: str = "loss"
    visit_fraction: float = 1.0
    screen_top: int = 0
    screen_sample: int = 16
    screen_min_corr: float = 0.5

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.max_iters < 0 or self.tol < 0:
            raise ValueError("max_iters and tol must be non-negative")
        if self.screen_top < 0 or self.screen_sample < 3:
            raise ValueError("screen_top must be >= 0 and screen_sample >= 3")
        if self.destinations is not None and self.destinations < 0:
            raise ValueError("destinations must be >= 0")
        if self.destinations and self.mode != "sweep":
            raise ValueError("destinations (M > 0) needs mode='sweep'")
        if not 0 < self.visit_fraction <= 1:
            raise ValueError(
                f"visit_fraction (--visit-fraction) must be in (0, 1], got {self.visit_fraction}"
            )
        if self.visit_fraction < 1 and not self.sweep_destinations:
            raise ValueError(
                "visit_fraction < 1 (--visit-fraction) ranks adapters by the destination "
                "proxy: it needs mode='sweep' with destinations > 0 (--destinations)"
            )
        if self.destination_proxy not in PROXIES:
            raise ValueError(
                f"destination_proxy must be one of {', '.join(PROXIES)}, "
                f"got {self.destination_proxy!r}"
            )
        if self.screen_top and self.mode != "best":
            raise ValueError("screening (screen_top > 0) needs mode='best'")
        if self.task_loss not in TASK_LOSSES:
            raise ValueError(
                f"task_loss must be one of {', '.join(TASK_LOSSES)}, got {self.task_loss!r}"
            )
        if self.screen_top and self.task_loss != "nll":
            # The first-order estimate is of the change of mean NLL.
            raise ValueError("screening (screen_top > 0) needs task_loss='nll'")

    @property
    def _loss_proxy(self) -> bool:
        return bool(self.sweep_destinations) and self.destination_proxy == "loss"

    @property
    def sweep_destinations(self) -> int:
        """Destinations a sweep visit scores (0: all); `destinations` resolved."""
        if self.mode != "sweep":
            return 0
        return SWEEP_DESTINATIONS if self.destinations is None else self.destinations

    def initial_assignment(
        self, library: AdapterLibrary, k: int, seed: int, cached: CachedObjective | None = None
    ) -> ClusteringResult:
        """The start of the search (its ``method`` names it); ``best`` scores the
        data-free starts (`BEST_OF`) on the objective (about 2K member sets) and keeps
        the lowest J (ties: the first)."""
        methods = {"kmeans": self.kmeans, "mbc": self.mbc, "random": RandomClustering()}
        if self.init != "best":
            return methods[self.init].fit(library, k, seed)
        starts = [methods[name].fit(library, k, seed) for name in BEST_OF]
        values = [
            cached.cluster_losses(membership_mask(s.assign, k), self.task_loss).sum()
            for s in starts
        ]
        return starts[int(np.argmin(values))]

    def fit(
        self,
        library: AdapterLibrary,
        k: int,
        seed: int,
        objective: Objective | None = None,
        checkpoint_dir: str | Path | None = None,
        progress: bool = True,
    ) -> ClusteringResult:
        if objective is None:
            raise ValueError("d2c needs dev examples: pass an objective (--tasks)")
        if getattr(objective, "num_tasks", None) != library.num_adapters:
            raise ValueError(
                f"objective covers {objective.num_tasks} tasks, library has {library.num_adapters}"
            )
        n = library.num_adapters
        # A CachedObjective passed in is shared (e.g. across the cells of a sweep).
        cached = objective if isinstance(objective, CachedObjective) else CachedObjective(objective)
        if self.screen_top and not hasattr(cached.objective, "first_order_moves"):
            raise ValueError("screening needs an objective with first_order_moves (DevObjective)")
        if (self.mode == "lloyd" or self._loss_proxy) and not hasattr(
            cached.objective, "cross_losses"
        ):
            raise ValueError(
                "lloyd mode and destinations need an objective with cross_losses (DevObjective)"
            )
        checkpoint = _SearchCheckpoint(checkpoint_dir) if checkpoint_dir else None
        restored = checkpoint.restore() if checkpoint else None
        if restored is not None:
            assign, iteration, log, cache_state = restored
            cached.load_state(cache_state)
        else:
            start_result = self.initial_assignment(library, k, seed, cached)
            assign, start_method = start_result.assign, start_result.method
            iteration, log = 0, []
            start = time.perf_counter()
            objective_value = (
                cached.cluster_losses(membership_mask(assign, k), self.task_loss).sum() / n
            )
            log.append(
                {
                    "iteration": 0,
                    "start": start_method,
                    "objective": objective_value,
                    "moves": [],
                    "candidates_scored": cached.evaluations,
                    "candidates_considered": k,
                    "seconds": time.perf_counter() - start,
                }
            )
            if checkpoint:
                checkpoint.save(assign, iteration, log, cached.state(), done=False)

        def checkpoint_in_sweep(start_assign):
            """Called after each sweep visit: save the cache with the sweep's start."""
            last_save = time.perf_counter()

            def save():
                nonlocal last_save
                if checkpoint and time.perf_counter() - last_save >= SWEEP_SAVE_SECONDS:
                    checkpoint.save(start_assign, iteration, log, cached.state(), done=False)
                    last_save = time.perf_counter()

            return save

        # The search may converge before max_iters: a total (so an ETA) only when the
        # count is known (max_iters == 1); each sweep's own bar has an ETA.
        bar = tqdm(
            total=self.max_iters if self.max_iters == 1 else None,
            initial=iteration,
            desc=f"d2c K={k}" if self.max_iters == 1 else f"d2c K={k}, <= {self.max_iters} iters",
            unit="iter",
            disable=not progress,
        )
        done = bool(log and log[-1].get("converged"))
        gram = None
        if self.sweep_destinations and not self._loss_proxy:
            gram = np.asarray(library_delta_gram(library))
        while not done and iteration < self.max_iters:
            start = time.perf_counter()
            before = cached.evaluations
            assign, moves, considered, screened = self._iterate(
                assign,
                k,
                cached,
                seed,
                iteration + 1,
                progress,
                checkpoint_in_sweep(assign),
                gram,
            )
            iteration += 1
            seconds = time.perf_counter() - start
            objective_value = (
                cached.cluster_losses(membership_mask(assign, k), self.task_loss).sum() / n
            )
            scored = cached.evaluations - before
            done = not moves
            log.append(
                {
                    "iteration": iteration,
                    "objective": objective_value,
                    "moves": [
                        {"adapter": library.names[i], "from": int(a), "to": int(b), "delta_j": d}
                        for i, a, b, d in moves
                    ],
                    "candidates_scored": scored,
                    "candidates_considered": considered,
                    "seconds": seconds,
                    "converged": done,
                    **({"screening": screened} if screened else {}),
                }
            )
            bar.update(1)
            bar.set_postfix(J=f"{objective_value:.4f}", cand_per_s=f"{scored / seconds:.1f}")
            if checkpoint:
                checkpoint.save(assign, iteration, log, cached.state(), done=done)
        bar.close()
        return ClusteringResult(
            self.name,
            assign.astype(np.int32),
            k,
            log=tuple(log),
            objective=log[-1]["objective"],
            info={
                "initial_objective": log[0]["objective"],
                "iterations": iteration,
                "converged": done,
                "candidates_scored": cached.evaluations,
                "init": self.init,
                "start": log[0].get("start"),
                "mode": self.mode,
                "task_loss": self.task_loss,
                "screen_top": self.screen_top,
                "destinations": self.sweep_destinations,
                "destination_proxy": self.destination_proxy if self.sweep_destinations else None,
                "visit_fraction": self.visit_fraction,
            },
        )

    def _iterate(
        self, assign, k, cached, seed, iteration, progress=False, after_visit=None, gram=None
    ):
        """One iteration; returns (new assign, [(i, from, to, dJ)], candidates considered,
        screening record or None). ``after_visit()`` runs after each sweep visit; `gram`
        (``[N, N]``) ranks destinations for the similarity proxy."""
        n = assign.shape[0]
        assign = assign.copy()
        if self.mode == "lloyd":
            return (*self._lloyd_step(assign, k, cached), None)
        if self.mode == "best":
            screened = None
            if self.screen_top:
                deltas, screened = self._screened_deltas(assign, k, cached, seed, iteration)
            else:
                deltas = (
                    move_deltas(assign, k, cached, np.arange(n), task_loss=self.task_loss) / n
                )  # [N, K]
            i, b = np.unravel_index(np.argmin(deltas), deltas.shape)
            considered = (
                int(np.isfinite(deltas).sum()) if screened is None else screened["candidates"]
            )
            if deltas[i, b] < -self.tol:
                move = (int(i), int(assign[i]), int(b), float(deltas[i, b]))
                assign[i] = b
                return assign, [move], considered, screened
            return assign, [], considered, screened
        moves, considered = [], 0
        if self._loss_proxy:  # each task's loss under each merge at the sweep's start
            ranking = cached.cross_losses(membership_mask(assign, k))  # [K, N]
        elif self.sweep_destinations:
            ranking = similarity_ranking(gram, assign, k)
        order = np.random.default_rng([seed, iteration]).permutation(n)
        if self.visit_fraction < 1:
            count = int(np.ceil(self.visit_fraction * n))
            order = order[least_settled(ranking, assign, count)[order]]
        # A sweep over a large library takes many minutes: show each visit, with ETA.
        visits = tqdm(
            order, desc=f"sweep {iteration}", unit="adapter", leave=False, disable=not progress
        )
        for i in visits:
            before = cached.evaluations
            pairs = None
            if self.sweep_destinations:
                pairs = promising_destinations(ranking[:, i], assign[i], self.sweep_destinations)[
                    None
                ]
            deltas = (
                move_deltas(assign, k, cached, np.array([i]), pairs, task_loss=self.task_loss)[0]
                / n
            )
            considered += int(np.isfinite(deltas).sum())
            b = int(np.argmin(deltas))
            if deltas[b] < -self.tol:
                moves.append((int(i), int(assign[i]), b, float(deltas[b])))
                assign[i] = b
            visits.set_postfix(moves=len(moves), sets=cached.evaluations - before)
            if after_visit:
                after_visit()
        return assign, moves, considered, None

    def _lloyd_step(self, assign, k, cached):
        """One Lloyd step: score every task under every current merge (K merges, N x K
        task evaluations) and send each task to the cluster whose merge gives it the
        lowest loss, keeping it where it is on ties; moves out of a cluster that would
        be emptied are undone. The step is applied only if it lowers J exactly; if the
        simultaneous moves do not, the half with the largest per-task gains is tried,
        down to the single best move. Returns (assign, moves, candidates considered)."""
        n = assign.shape[0]
        current = membership_mask(assign, k)
        cross = cached.cross_losses(current)  # [K, N]
        tasks = np.arange(n)
        target = np.where(cross[assign, tasks] <= cross.min(0), assign, cross.argmin(0))
        while empty := [c for c in range(k) if not (target == c).any()]:
            for c in empty:
                target[assign == c] = c
        gain = cross[assign, tasks] - cross[target, tasks]  # per-task NLL gain, >= 0
        movers = np.flatnonzero(target != assign)
        movers = movers[np.argsort(-gain[movers], kind="stable")]
        j_now = cached.cluster_losses(current, self.task_loss).sum() / n
        while movers.size:
            trial = assign.copy()
            trial[movers] = target[movers]
            if all((trial == c).any() for c in range(k)):
                trial_masks = membership_mask(trial, k)
                dj = cached.cluster_losses(trial_masks, self.task_loss).sum() / n - j_now
                if dj < -self.tol:
                    moves = [(int(i), int(assign[i]), int(target[i]), float(dj)) for i in movers]
                    return trial, moves, n * k
            movers = movers[: len(movers) // 2]
        return assign, [], n * k

    def _screened_deltas(self, assign, k, cached, seed, iteration):
        """``[N, K]`` changes of J: exact for the screened moves, inf elsewhere (module
        docstring); falls back to every move exactly when the estimate is unreliable."""
        n = assign.shape[0]
        estimate = cached.objective.first_order_moves(assign, k)  # [N, K], change of N*J
        valid = np.flatnonzero(np.isfinite(estimate).ravel())
        top = valid[np.argsort(estimate.ravel()[valid], kind="stable")[: self.screen_top]]
        rng = np.random.default_rng([seed, iteration])
        sample = rng.choice(valid, size=min(self.screen_sample, len(valid)), replace=False)
        chosen = np.zeros(n * k, bool)
        chosen[top] = chosen[sample] = True
        pairs = chosen.reshape(n, k)
        deltas = move_deltas(assign, k, cached, np.arange(n), pairs) / n
        corr = float(spearman(estimate.ravel()[sample], deltas.ravel()[sample]))
        fallback = None
        if chosen.sum() < len(valid):
            if not corr >= self.screen_min_corr:  # also catches NaN
                fallback = "rank correlation below screen_min_corr"
            elif not deltas.min() < -self.tol:
                fallback = "no improving move among the screened"
        if fallback:
            deltas = move_deltas(assign, k, cached, np.arange(n), task_loss=self.task_loss) / n
        record = {
            "candidates": len(valid),
            "scored_exactly": len(valid) if fallback else int(chosen.sum()),
            "rank_corr": corr,
            "fallback": fallback,
        }
        return deltas, record


class _SearchCheckpoint:
    """Orbax checkpoint of the search state after each iteration (see module docstring);
    a corrupt or half-written step is skipped (`d2c_jax.checkpoints`)."""

    def __init__(self, directory: str | Path):
        from d2c_jax.checkpoints import Checkpoints

        self.checkpoints = Checkpoints(directory, max_to_keep=2, ways_out="start over with --force")
        self.directory = self.checkpoints.directory

    def save(self, assign, iteration, log, cache_state, done) -> None:
        """Save the state after `iteration` completed iterations. Steps number the
        saves (a sweep saves several times per iteration)."""
        state = {
            "iteration": np.asarray(iteration, np.int64),
            "assign": np.asarray(assign, np.int32),
            "cache_keys": cache_state["keys"].astype(np.uint8),
            "cache_values": cache_state["values"],
            "log": np.frombuffer(json.dumps(log).encode(), np.uint8),
        }
        if "score_keys" in cache_state:
            state["score_keys"] = cache_state["score_keys"].astype(np.uint8)
            state["score_values"] = cache_state["score_values"]
        latest = self.checkpoints.latest_step()
        self.checkpoints.save(0 if latest is None else latest + 1, state)

    def restore(self) -> tuple[np.ndarray, int, list[dict[str, Any]], dict] | None:
        restored = self.checkpoints.restore_latest(decode=self._decode)
        return None if restored is None else restored[1]

    @staticmethod
    def _decode(state) -> tuple[np.ndarray, int, list[dict[str, Any]], dict]:
        log = json.loads(np.asarray(state["log"], np.uint8).tobytes().decode())
        cache_state = {
            "keys": np.asarray(state["cache_keys"]),
            "values": np.asarray(state["cache_values"]),
        }
        if "score_keys" in state:
            cache_state["score_keys"] = np.asarray(state["score_keys"])
            cache_state["score_values"] = np.asarray(state["score_values"])
        iteration = int(state["iteration"])
        return np.asarray(state["assign"], np.int64), iteration, log, cache_state
