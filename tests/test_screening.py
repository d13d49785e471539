"""First-order screening of D2C moves: kernels against explicit loops, estimates
against exact scoring on the tiny model, and the screened search against the exact one."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from d2c_jax.cluster import D2CClustering
from d2c_jax.cluster.d2c import CachedObjective, move_deltas
from d2c_jax.cluster.objective import DevObjective, ObjectiveConfig
from d2c_jax.cluster.parameter import random_assignment
from kernels import screening
from kernels.merge import MergeConfig
from tests.test_cluster_d2c import PairwiseObjective
from tests.test_cluster_objective import library_from, task_examples
from tests.test_cluster_parameter import planted_library

N, K = 10, 3


def test_kernels_match_explicit_loops():
    rng = np.random.default_rng(0)
    grads = {"q": {"delta": rng.normal(size=(4, 2, 3, 5))}, "v": {"delta": rng.normal(size=(4, 7))}}
    new = {m: {"delta": rng.normal(size=g["delta"].shape)} for m, g in grads.items()}
    old = {m: {"delta": rng.normal(size=g["delta"].shape)} for m, g in grads.items()}
    expected = [
        sum(
            float(np.sum(grads[m]["delta"][c] * (new[m]["delta"][c] - old[m]["delta"][c])))
            for m in grads
        )
        for c in range(4)
    ]
    got = screening.directional_change(grads, new, old)
    np.testing.assert_allclose(got, expected, rtol=1e-5)

    assign = np.array([0, 1, 2, 0, 1])
    onehot = np.eye(3)[assign]
    cross = rng.normal(size=(3, 5))
    source, dest = rng.normal(size=5), rng.normal(size=(5, 3))
    got = np.asarray(screening.estimate_moves(onehot, cross, source, dest))
    for i in range(5):
        for b in range(3):
            a = assign[i]
            want = np.inf if b == a else -cross[a, i] + source[i] + cross[b, i] + dest[i, b]
            assert got[i, b] == pytest.approx(want, rel=1e-5)

    x, y = rng.normal(size=20), rng.normal(size=20)
    assert float(screening.spearman(x, y)) == pytest.approx(spearmanr(x, y)[0], abs=1e-6)
    assert float(screening.spearman(x, 2 * x + 1)) == pytest.approx(1.0)


@pytest.fixture
def tiny_problem(tiny_base, make_lora):
    """Small random adapters (std 0.1), where the loss is close to linear in dD."""
    names = [f"t{i}" for i in range(N)]
    library = library_from(make_lora(tiny_base.config, n=N, seed=3, std=0.1), names, scale=2.0)
    objective = DevObjective(
        tiny_base,
        library,
        task_examples(names),
        MergeConfig(method="ties", space="delta", density=0.5),
        ObjectiveConfig(candidates_per_call=16),
    )
    return library, objective


def test_estimates_correlate_with_exact_changes(tiny_problem):
    _, objective = tiny_problem
    assign = random_assignment(N, K, seed=1)
    estimate = objective.first_order_moves(assign, K)
    exact = move_deltas(assign, K, CachedObjective(objective), np.arange(N))
    valid = np.isfinite(exact)
    np.testing.assert_array_equal(np.isfinite(estimate), valid)
    assert spearmanr(estimate[valid], exact[valid])[0] > 0.7


def test_screening_all_candidates_is_exact_d2c(tiny_problem):
    library, objective = tiny_problem
    exact = D2CClustering(init="random", mode="best", task_loss="nll", max_iters=4).fit(
        library, K, seed=2, objective=objective, progress=False
    )
    screened = D2CClustering(
        init="random", mode="best", task_loss="nll", max_iters=4, screen_top=N * K
    ).fit(library, K, seed=2, objective=objective, progress=False)
    assert len(exact.log) > 2  # the search moved adapters
    np.testing.assert_array_equal(screened.assign, exact.assign)
    assert [e["moves"] for e in screened.log] == [e["moves"] for e in exact.log]
    assert all(e["screening"]["fallback"] is None for e in screened.log[1:])


def test_screened_search_never_increases_and_stops_at_a_local_optimum(tiny_problem):
    library, objective = tiny_problem
    result = D2CClustering(
        init="random",
        mode="best",
        task_loss="nll",
        max_iters=50,
        screen_top=2,
        screen_sample=4,
        screen_min_corr=-1,
    ).fit(library, K, seed=2, objective=objective, progress=False)
    objectives = [e["objective"] for e in result.log]
    assert all(b <= a for a, b in zip(objectives, objectives[1:], strict=False))
    records = [e["screening"] for e in result.log[1:]]
    assert any(r["scored_exactly"] < r["candidates"] for r in records)  # screening saved work
    assert result.log[-1]["converged"]
    assert records[-1]["fallback"] == "no improving move among the screened"
    final = move_deltas(result.assign, K, CachedObjective(objective), np.arange(N)) / N
    assert final.min() >= -1e-4  # the exact search would stop here too


def test_screening_settings_are_checked():
    with pytest.raises(ValueError, match="mode='best'"):
        D2CClustering(mode="sweep", screen_top=4)
    with pytest.raises(ValueError, match="first_order_moves"):
        D2CClustering(init="random", mode="best", task_loss="nll", screen_top=4).fit(
            planted_library(groups=(0,) * 6), 2, seed=0, objective=PairwiseObjective((0,) * 6)
        )
