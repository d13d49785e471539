"""D2C search logic on synthetic objectives (fast), against brute-force recomputation."""

from __future__ import annotations

import numpy as np
import pytest

from d2c_jax.cluster import d2c
from d2c_jax.cluster.base import ClusteringResult, membership_mask
from d2c_jax.cluster.d2c import CachedObjective, D2CClustering, move_deltas
from d2c_jax.cluster.parameter import random_assignment
from tests.test_cluster_parameter import planted_library


class PairwiseObjective:
    """Task t's loss under member set M: 1 + mean over other members j of C[t, j].

    C is low (helpful) inside planted groups and high (interfering) across them.
    """

    def __init__(self, groups, seed=0, inside=-0.5, across=1.0):
        rng = np.random.default_rng(seed)
        groups = np.asarray(groups)
        self.num_tasks = len(groups)
        same = groups[:, None] == groups[None, :]
        self.c = np.where(same, inside, across) + 0.1 * rng.normal(size=same.shape)
        self.calls = []

    def task_losses(self, masks):
        masks = np.asarray(masks, bool)
        self.calls.append(len(masks))
        sizes = masks.sum(1, keepdims=True)
        others = masks @ self.c.T - np.diag(self.c)[None, :] * masks  # [C, N] sum over j != t
        losses = 1 + others / np.maximum(sizes - 1, 1)
        return np.where(masks, losses, 0.0)

    def cross_losses(self, masks):
        """Every task's loss under each row's member set (members or not)."""
        masks = np.asarray(masks, bool)
        rows = []
        for mask in masks:
            others = [
                self.c[t, mask & (np.arange(self.num_tasks) != t)].mean()
                if (mask & (np.arange(self.num_tasks) != t)).any()
                else 0.0
                for t in range(self.num_tasks)
            ]
            rows.append(1 + np.array(others))
        return np.array(rows)


def objective_value(objective, assign, k, task_loss="nll"):
    nll = objective.task_losses(membership_mask(assign, k)).sum(0)  # [N], one cluster each
    per_task = nll if task_loss == "nll" else 1.0 - np.exp(-nll)
    return per_task.mean()


GROUPS = (0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2)

# The settings the search-logic tests pin (D2C's defaults are the validated variant):
# every move scored exactly, mean NLL, up to 50 iterations.
EXHAUSTIVE = {
    "init": "kmeans",
    "mode": "best",
    "max_iters": 50,
    "task_loss": "nll",
    "destinations": 0,
}


def exhaustive(**settings) -> D2CClustering:
    return D2CClustering(**{**EXHAUSTIVE, **settings})


@pytest.mark.parametrize("task_loss", ["nll", "likelihood"])
def test_move_deltas_equal_brute_force(task_loss):
    objective = PairwiseObjective(GROUPS)
    assign = random_assignment(12, 3, seed=1)
    deltas = move_deltas(assign, 3, CachedObjective(objective), np.arange(12), task_loss=task_loss)
    base = objective_value(objective, assign, 3, task_loss) * 12
    for i in range(12):
        for b in range(3):
            moved = assign.copy()
            moved[i] = b
            if b == assign[i] or (assign == assign[i]).sum() == 1:
                assert deltas[i, b] == np.inf
            else:
                expected = objective_value(objective, moved, 3, task_loss) * 12 - base
                assert deltas[i, b] == pytest.approx(expected, abs=1e-9)


def test_move_deltas_scores_only_the_selected_pairs():
    objective = PairwiseObjective(GROUPS)
    assign = random_assignment(12, 3, seed=1)
    full = move_deltas(assign, 3, CachedObjective(objective), np.arange(12))
    pairs = np.random.default_rng(0).random((12, 3)) < 0.3
    cached = CachedObjective(objective)
    some = move_deltas(assign, 3, cached, np.arange(12), pairs)
    np.testing.assert_array_equal(some, np.where(pairs, full, np.inf))
    # the K clusters, plus per mover with a wanted move its source and wanted destinations
    wanted = pairs & np.isfinite(full)
    assert cached.evaluations == 3 + wanted.any(1).sum() + wanted.sum()


@pytest.mark.parametrize("mode", ["best", "sweep"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_planted_groups_monotonically(mode, seed):
    library = planted_library(groups=(0,) * 12)  # parameters carry no group signal
    objective = PairwiseObjective(GROUPS, seed=seed)
    result = exhaustive(init="random", mode=mode).fit(
        library, 3, seed=seed, objective=objective, progress=False
    )
    objectives = [entry["objective"] for entry in result.log]
    assert all(b <= a + 1e-12 for a, b in zip(objectives, objectives[1:], strict=False))
    assert result.objective <= result.info["initial_objective"]
    truth = np.asarray(GROUPS)
    assert all(
        (result.assign[i] == result.assign[j]) == (truth[i] == truth[j])
        for i in range(12)
        for j in range(12)
    )
    assert result.log[-1]["converged"]
    assert result.objective == pytest.approx(objective_value(objective, result.assign, 3))


def test_cache_scores_each_member_set_once():
    objective = PairwiseObjective(GROUPS)
    result = exhaustive(init="random", mode="best").fit(
        planted_library(groups=(0,) * 12), 3, seed=0, objective=objective, progress=False
    )
    moves = sum(entry["candidates_considered"] for entry in result.log[1:])
    member_sets = moves // 2 * 3  # per adapter: one source set and K-1 = 2 destination sets
    assert result.info["candidates_scored"] == sum(objective.calls)
    # After the first iteration only sets touching the two changed clusters are new.
    assert result.info["candidates_scored"] < 0.8 * member_sets


def test_never_empties_a_cluster():
    objective = PairwiseObjective((0,) * 6)  # everyone wants to be together
    result = exhaustive(init="random", mode="sweep").fit(
        planted_library(groups=(0,) * 6), 3, seed=0, objective=objective, progress=False
    )
    assert set(result.assign.tolist()) == {0, 1, 2}


def test_resume_from_checkpoint_reaches_same_assignment(tmp_path):
    library = planted_library(groups=(0,) * 12)
    full = exhaustive(init="random", mode="best").fit(
        library, 3, seed=5, objective=PairwiseObjective(GROUPS), progress=False
    )
    assert full.info["iterations"] > 3
    exhaustive(init="random", mode="best", max_iters=2).fit(
        library,
        3,
        seed=5,
        objective=PairwiseObjective(GROUPS),
        checkpoint_dir=tmp_path / "ckpt",
        progress=False,
    )
    fresh = PairwiseObjective(GROUPS)
    resumed = exhaustive(init="random", mode="best").fit(
        library, 3, seed=5, objective=fresh, checkpoint_dir=tmp_path / "ckpt", progress=False
    )
    np.testing.assert_array_equal(resumed.assign, full.assign)
    assert [e["objective"] for e in resumed.log] == [e["objective"] for e in full.log]
    # the restored cache spared re-scoring what the first two iterations scored
    assert sum(fresh.calls) < full.info["candidates_scored"]


class CrashingObjective(PairwiseObjective):
    """Fails on its `crash_at`-th call, as a run killed in the middle of a sweep."""

    def __init__(self, groups, crash_at):
        super().__init__(groups)
        self.crash_at = crash_at

    def task_losses(self, masks):
        if len(self.calls) + 1 == self.crash_at:
            raise KeyboardInterrupt("killed")
        return super().task_losses(masks)


def test_resume_in_the_middle_of_a_sweep_replays_it_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(d2c, "SWEEP_SAVE_SECONDS", 0.0)  # save after every visit
    library = planted_library(groups=(0,) * 12)
    search = exhaustive(init="random", mode="sweep")
    full = search.fit(library, 3, seed=2, objective=PairwiseObjective(GROUPS), progress=False)
    # Initial clusters + 12 visits of the first sweep + some of the second.
    crash_at = 1 + 12 + 5
    assert full.info["iterations"] >= 2
    crashing = CrashingObjective(GROUPS, crash_at)
    with pytest.raises(KeyboardInterrupt):
        search.fit(
            library,
            3,
            seed=2,
            objective=crashing,
            checkpoint_dir=tmp_path / "ckpt",
            progress=False,
        )
    fresh = PairwiseObjective(GROUPS)
    resumed = search.fit(
        library, 3, seed=2, objective=fresh, checkpoint_dir=tmp_path / "ckpt", progress=False
    )
    np.testing.assert_array_equal(resumed.assign, full.assign)
    assert [e["objective"] for e in resumed.log] == [e["objective"] for e in full.log]
    # Nothing scored before the crash was scored again, not even within the sweep.
    assert sum(crashing.calls) + sum(fresh.calls) == full.info["candidates_scored"]


def test_requires_objective_and_valid_settings():
    with pytest.raises(ValueError, match="dev examples"):
        D2CClustering().fit(planted_library(), 3, seed=0)
    with pytest.raises(ValueError, match="mode"):
        D2CClustering(mode="greedy")


class TableObjective:
    """Per-task losses of each member set, from a table ``{frozenset: {task: nll}}``."""

    def __init__(self, table):
        self.table = table
        self.num_tasks = 3

    def task_losses(self, masks):
        out = np.zeros(np.shape(masks))
        for row, mask in enumerate(np.asarray(masks, bool)):
            for t, nll in self.table[frozenset(np.flatnonzero(mask).tolist())].items():
                out[row, t] = nll
        return out


class FromAssignment(D2CClustering):
    """D2C started from a given assignment instead of K-Means or random."""

    def initial_assignment(self, library, k, seed, cached=None):
        return ClusteringResult("given", np.array([0, 0, 1]), k)


# Tasks 0, 1, 2 in clusters {0, 1} and {2}; task 1 is broken next to task 0. Moving 0
# to {2} fixes task 1 but costs tasks 0 and 2 (mean NLL 9.2 -> 4.1 over 3 tasks);
# moving 1 to {2} makes things worse under either loss.
BROKEN_TASK = {
    frozenset({0, 1}): {0: 0.1, 1: 9.0},
    frozenset({2}): {2: 0.1},
    frozenset({1}): {1: 0.1},
    frozenset({0, 2}): {0: 1.0, 2: 3.0},
    frozenset({0}): {0: 0.1},
    frozenset({1, 2}): {1: 5.0, 2: 5.0},
}


def test_likelihood_loss_keeps_working_tasks_where_mean_nll_trades_them():
    library = planted_library(groups=(0, 0, 0))
    objective = TableObjective(BROKEN_TASK)
    nll = FromAssignment(**{**EXHAUSTIVE, "mode": "best"}).fit(
        library, 2, 0, objective=objective, progress=False
    )
    # Mean NLL takes the move: task 1 goes 9.0 -> 0.1, tasks 0 and 2 go to 1.0 and 3.0.
    assert nll.assign.tolist() == [1, 0, 1]
    assert nll.objective == pytest.approx((1.0 + 0.1 + 3.0) / 3)
    # 1 - exp(-nll) saturates for a broken task: the same move makes it worse
    # (0.095 + 1.000 + 0.095 -> 0.632 + 0.095 + 0.950 over 3 tasks).
    lik = FromAssignment(**{**EXHAUSTIVE, "task_loss": "likelihood"}).fit(
        library, 2, 0, objective=objective, progress=False
    )
    assert lik.assign.tolist() == [0, 0, 1]
    assert lik.log[-1]["converged"] and lik.info["task_loss"] == "likelihood"
    expected = np.mean(1 - np.exp(-np.array([0.1, 9.0, 0.1])))
    assert lik.objective == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["best", "sweep"])
def test_likelihood_search_is_monotone_and_reports_its_objective(mode):
    library = planted_library(groups=(0,) * 12)
    objective = PairwiseObjective(GROUPS, seed=3)
    result = exhaustive(init="random", mode=mode, task_loss="likelihood").fit(
        library, 3, seed=3, objective=objective, progress=False
    )
    objectives = [entry["objective"] for entry in result.log]
    assert all(b <= a + 1e-12 for a, b in zip(objectives, objectives[1:], strict=False))
    assert result.objective == pytest.approx(
        objective_value(objective, result.assign, 3, "likelihood")
    )


def test_task_loss_settings_are_checked():
    with pytest.raises(ValueError, match="task_loss must be one of nll, likelihood"):
        D2CClustering(task_loss="mse")
    with pytest.raises(ValueError, match="screening .* needs task_loss='nll'"):
        D2CClustering(mode="best", screen_top=4, task_loss="likelihood")


def lloyd_reference(objective, assign, k, task_loss="nll"):
    """One Lloyd step written plainly: each task to its best current merge, applied
    if J drops, else the best-gain half of the moves, and so on."""
    n = len(assign)
    cross = objective.cross_losses(membership_mask(assign, k))
    target = []
    for t in range(n):
        best = min(range(k), key=lambda c: (cross[c, t], c != assign[t], c))
        target.append(best)
    target = np.array(target)
    for c in range(k):
        if not (target == c).any():
            target[assign == c] = c
    movers = sorted(
        [t for t in range(n) if target[t] != assign[t]],
        key=lambda t: -(cross[assign[t], t] - cross[target[t], t]),
    )
    j_now = objective_value(objective, assign, k, task_loss)
    while movers:
        trial = assign.copy()
        trial[movers] = target[movers]
        if len(set(trial)) == k and objective_value(objective, trial, k, task_loss) < j_now:
            return trial
        movers = movers[: len(movers) // 2]
    return assign


@pytest.mark.parametrize("task_loss", ["nll", "likelihood"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_lloyd_step_equals_plain_reference(task_loss, seed):
    objective = PairwiseObjective(GROUPS, seed=seed)
    assign = random_assignment(12, 3, seed=seed)
    search = exhaustive(mode="lloyd", task_loss=task_loss, tol=0.0)
    step, moves, considered = search._lloyd_step(assign, 3, CachedObjective(objective))
    np.testing.assert_array_equal(step, lloyd_reference(objective, assign, 3, task_loss))
    assert considered == 36
    assert [i for i, *_ in moves] == sorted(
        np.flatnonzero(step != assign).tolist(), key=[i for i, *_ in moves].index
    )


@pytest.mark.parametrize("init", ["random", "kmeans", "mbc"])
def test_lloyd_search_is_monotone_and_recovers_planted_groups(init):
    library = planted_library(groups=(0,) * 12)
    objective = PairwiseObjective(GROUPS)
    result = exhaustive(init=init, mode="lloyd", max_iters=20).fit(
        library, 3, 0, objective, progress=False
    )
    values = [entry["objective"] for entry in result.log]
    assert all(b < a for a, b in zip(values, values[1:-1], strict=False))
    assert values[-1] <= values[0]
    assert result.info["converged"]
    # Lloyd's fixed point here: each task sits with its planted group.
    assert (
        objective_value(objective, result.assign, 3)
        <= objective_value(objective, np.array(GROUPS), 3) + 1e-9
    )


def test_lloyd_needs_cross_losses():
    class NoCross:
        num_tasks = 12

        def task_losses(self, masks):
            return np.where(masks, 1.0, 0.0)

    with pytest.raises(ValueError, match="cross_losses"):
        D2CClustering(mode="lloyd").fit(planted_library(groups=(0,) * 12), 3, 0, NoCross())


@pytest.mark.parametrize("task_loss", ["nll", "likelihood"])
def test_best_init_starts_from_the_data_free_clustering_with_lower_objective(task_loss):
    from d2c_jax.cluster.parameter import KMeansClustering, MBCClustering

    library = planted_library(groups=(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2), noise=1.0)
    objective = PairwiseObjective(GROUPS)
    search = exhaustive(init="best", task_loss=task_loss)
    start = search.initial_assignment(library, 3, 5, CachedObjective(objective))
    starts = [m.fit(library, 3, 5) for m in (KMeansClustering(), MBCClustering())]
    values = [objective_value(objective, s.assign, 3, task_loss) for s in starts]
    best = starts[int(np.argmin(values))]
    np.testing.assert_array_equal(start.assign, best.assign)
    assert start.method == best.method
    result = search.fit(library, 3, 5, objective, progress=False)
    assert result.info["start"] == best.method == result.log[0]["start"]


def test_promising_destinations_are_the_lowest_losses_but_the_current_cluster():
    losses = np.array([0.5, 0.1, 0.3, 0.1, 2.0])
    assert d2c.promising_destinations(losses, 1, 2).tolist() == [False, False, True, True, False]
    assert d2c.promising_destinations(losses, 4, 1).tolist() == [False, True, False, False, False]
    assert d2c.promising_destinations(losses, 0, 9).sum() == 4


@pytest.mark.parametrize("seed", [0, 1])
def test_sweep_with_destinations_scores_only_the_promising_moves(seed):
    """A pruned sweep equals a plain sweep whose visits see only the M destinations
    ranked best by the cross losses at the sweep's start."""
    objective = PairwiseObjective(GROUPS, seed=seed)
    library = planted_library(groups=(0,) * 12)
    start = random_assignment(12, 3, seed=seed)

    class From(D2CClustering):
        def initial_assignment(self, library, k, seed, cached=None):
            return ClusteringResult("given", start.copy(), k)

    pruned = From(mode="sweep", max_iters=1, destinations=1, task_loss="nll")
    got = pruned.fit(library, 3, seed, objective, progress=False)
    # reference: replay the sweep by hand
    cross = objective.cross_losses(membership_mask(start, 3))
    assign = start.copy()
    for i in np.random.default_rng([seed, 1]).permutation(12):
        if (assign == assign[i]).sum() == 1:
            continue
        ranked = [c for c in np.argsort(cross[:, i], kind="stable") if c != assign[i]]
        b = int(ranked[0])
        moved = assign.copy()
        moved[i] = b
        if objective_value(objective, moved, 3) < objective_value(objective, assign, 3) - 1e-4:
            assign = moved
    np.testing.assert_array_equal(got.assign, assign)
    assert got.log[1]["candidates_considered"] <= 12


def test_destinations_settings_are_checked():
    with pytest.raises(ValueError, match="sweep"):
        D2CClustering(mode="best", destinations=2)
    with pytest.raises(ValueError, match=">= 0"):
        D2CClustering(mode="sweep", destinations=-1)


def dense_deltas(library) -> np.ndarray:
    """``[N, D]`` every adapter's flattened dense ``scale * B @ A`` (plain NumPy)."""
    scale = np.asarray(library.scale, np.float64)
    parts = [
        (np.asarray(f["B"], np.float64) @ np.asarray(f["A"], np.float64)).reshape(len(scale), -1)
        for _, f in sorted(library.params.items())
    ]
    return scale[:, None] * np.concatenate(parts, axis=1)


def reference_cosines(deltas: np.ndarray, assign: np.ndarray, k: int) -> np.ndarray:
    """``[K, N]`` cosine of each adapter's delta with the summed delta of each cluster's
    other members (0 where either is zero), in a plain loop."""
    n = len(assign)
    cosines = np.zeros((k, n))
    for c in range(k):
        for i in range(n):
            others = deltas[(assign == c) & (np.arange(n) != i)].sum(0)
            norm = np.linalg.norm(others) * np.linalg.norm(deltas[i])
            cosines[c, i] = others @ deltas[i] / norm if norm > 0 else 0.0
    return cosines


def test_similarity_ranking_is_the_cosine_with_the_other_members_sum():
    from d2c_jax.cluster.parameter import library_delta_gram

    library = planted_library(groups=(0, 1, 2, 0, 1, 2, 0, 1), seed=3, noise=0.5)
    assign = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    expected = reference_cosines(dense_deltas(library), assign, 3)
    got = -d2c.similarity_ranking(np.asarray(library_delta_gram(library)), assign, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


class WithoutCrossLosses:
    """A `PairwiseObjective` that can only score member sets (no cross losses)."""

    def __init__(self, objective):
        self.inner = objective
        self.num_tasks = objective.num_tasks

    def task_losses(self, masks):
        return self.inner.task_losses(masks)


@pytest.mark.parametrize("seed, visit_fraction", [(0, 1.0), (1, 1.0), (0, 0.5), (1, 0.3)])
def test_sweep_with_the_similarity_proxy_visits_the_most_similar_cluster(seed, visit_fraction):
    """destination_proxy="similarity": each visit scores only the cluster whose other
    members' summed delta is most similar to the adapter's (at the sweep's start), and
    needs no cross losses. With visit_fraction < 1 only the adapters whose best other
    cluster beats their own by the widest cosine margin are visited."""
    groups = (0, 1, 2) * 4
    objective = WithoutCrossLosses(PairwiseObjective(groups, seed=seed))
    library = planted_library(groups=groups, seed=seed, noise=0.3)
    start = random_assignment(12, 3, seed=seed)

    class From(D2CClustering):
        def initial_assignment(self, library, k, seed, cached=None):
            return ClusteringResult("given", start.copy(), k)

    search = From(
        mode="sweep",
        max_iters=1,
        destinations=1,
        task_loss="nll",
        destination_proxy="similarity",
        visit_fraction=visit_fraction,
    )
    got = search.fit(library, 3, seed, objective, progress=False)
    cosines = reference_cosines(dense_deltas(library), start, 3).T  # [N, K]
    margin = [max(np.delete(cosines[i], start[i])) - cosines[i, start[i]] for i in range(12)]
    visited = set(np.argsort(-np.array(margin), kind="stable")[: int(np.ceil(visit_fraction * 12))])
    assign = start.copy()
    for i in np.random.default_rng([seed, 1]).permutation(12):
        if (assign == assign[i]).sum() == 1 or i not in visited:
            continue
        b = next(int(c) for c in np.argsort(-cosines[i], kind="stable") if c != assign[i])
        moved = assign.copy()
        moved[i] = b
        before = objective_value(objective.inner, assign, 3)
        if objective_value(objective.inner, moved, 3) < before - 1e-4:
            assign = moved
    np.testing.assert_array_equal(got.assign, assign)
    assert got.info["destination_proxy"] == "similarity"
    assert got.info["visit_fraction"] == visit_fraction
    with pytest.raises(ValueError, match="cross_losses"):
        From(mode="sweep", destinations=1).fit(library, 3, seed, objective, progress=False)
    with pytest.raises(ValueError, match="destination_proxy"):
        D2CClustering(destination_proxy="gradient")
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="visit_fraction"):
            D2CClustering(visit_fraction=bad)
    with pytest.raises(ValueError, match="needs mode='sweep' with destinations > 0"):
        D2CClustering(destinations=0, visit_fraction=0.5)


# ------------------------------------------------ checkpoints that survive crashes
# The states a crash or a disk fault leaves in an orbax checkpoint directory.


def garble_data(step_dir):
    """Overwrite every data file of a saved step with garbage (a disk fault)."""
    for path in sorted((step_dir / "default" / "d").iterdir()):
        path.write_bytes(b"\x00garbage" * 16)


def kill_during_save(checkpoint_dir, step):
    """What a kill -9 inside orbax 0.12.8's save of `step` leaves: its tmp directory,
    data written, the item directory still under its tmp name and no commit marker
    (the marker, then the rename, are the last things a save does)."""
    import shutil

    latest = max(int(p.name) for p in checkpoint_dir.iterdir() if p.name.isdigit())
    tmp = checkpoint_dir / f"{step}.orbax-checkpoint-tmp"
    shutil.copytree(checkpoint_dir / str(latest), tmp)
    (tmp / "commit_success.txt").unlink()
    (tmp / "d2c_checksums.json").unlink()
    (tmp / "default").rename(tmp / "default.orbax-checkpoint-tmp")
    return tmp


def unmarked_step(checkpoint_dir, step):
    """A step directory without its completion marker (a half-copied checkpoint)."""
    import shutil

    latest = max(int(p.name) for p in checkpoint_dir.iterdir() if p.name.isdigit())
    shutil.copytree(checkpoint_dir / str(latest), checkpoint_dir / str(step))
    (checkpoint_dir / str(step) / "commit_success.txt").unlink()
    garble_data(checkpoint_dir / str(step))


def _stopped_search(tmp_path):
    """A search stopped after two iterations (steps 1 and 2 kept) and the full one."""
    library = planted_library(groups=(0,) * 12)
    full = exhaustive(init="random", mode="best").fit(
        library, 3, seed=5, objective=PairwiseObjective(GROUPS), progress=False
    )
    exhaustive(init="random", mode="best", max_iters=2).fit(
        library,
        3,
        seed=5,
        objective=PairwiseObjective(GROUPS),
        checkpoint_dir=tmp_path / "ckpt",
        progress=False,
    )
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1", "2"]
    return library, full


def _resume(library, tmp_path):
    return exhaustive(init="random", mode="best").fit(
        library,
        3,
        seed=5,
        objective=PairwiseObjective(GROUPS),
        checkpoint_dir=tmp_path / "ckpt",
        progress=False,
    )


@pytest.mark.parametrize(
    "damage",
    [
        lambda ckpt: garble_data(ckpt / "2"),
        lambda ckpt: kill_during_save(ckpt, 3),
        lambda ckpt: unmarked_step(ckpt, 3),
    ],
    ids=["garbled-latest", "killed-during-save", "step-without-marker"],
)
def test_a_bad_newest_checkpoint_is_skipped_and_the_search_ends_the_same(tmp_path, damage):
    from d2c_jax.checkpoints import CheckpointWarning

    library, full = _stopped_search(tmp_path)
    damage(tmp_path / "ckpt")
    with pytest.warns(CheckpointWarning, match=r"skipped checkpoint step [23] .*resuming from"):
        resumed = _resume(library, tmp_path)
    np.testing.assert_array_equal(resumed.assign, full.assign)
    assert [e["objective"] for e in resumed.log] == [e["objective"] for e in full.log]
    assert not list((tmp_path / "ckpt").glob("*tmp*")), "the half-written save is left"


def test_no_usable_checkpoint_is_refused_naming_the_directory(tmp_path):
    from d2c_jax.checkpoints import CheckpointError

    library, _ = _stopped_search(tmp_path)
    for step in ("1", "2"):
        garble_data(tmp_path / "ckpt" / step)
    kill_during_save(tmp_path / "ckpt", 3)
    before = sorted(str(p) for p in (tmp_path / "ckpt").rglob("*"))
    with pytest.raises(CheckpointError) as refused:
        _resume(library, tmp_path)
    message = str(refused.value)
    assert str(tmp_path / "ckpt") in message and "\n" not in message
    assert "start over with --force" in message and "delete the step directories 1, 2" in message
    assert sorted(str(p) for p in (tmp_path / "ckpt").rglob("*")) == before, "it deleted"
