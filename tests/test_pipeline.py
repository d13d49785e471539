"""`d2c_jax.pipeline`: a clustering job as data, run end to end on a tiny model.

Checks that the pipeline is the clustering it wraps (same assignment and J as the
method called by hand), that a data-free job loads no model and reads no examples
unless its dev objective is asked for, and that the evaluation entry point gives a
cluster's tasks the same scores whether all clusters or only some are evaluated.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from d2c_jax import pipeline
from d2c_jax.cluster import D2CClustering, KMeansClustering, membership_mask
from d2c_jax.cluster.objective import DevObjective
from d2c_jax.library import AdapterLibrary
from kernels.merge import MergeConfig
from tests.conftest import save_random_library

TASKS = [f"task{i}" for i in range(6)]
WORDS = ["cat", "dog", "sun", "sky", "tree", "lora", "jax", "merge"]
MERGE = MergeConfig(method="ties", density=0.5)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_config):
    """A library of 6 adapters, a task suite with dev and test splits, and a library
    directory without any examples."""
    root = tmp_path_factory.mktemp("pipeline")
    save_random_library(root / "library", tiny_config, TASKS, seed=5, std=0.3)
    rng = np.random.default_rng(2)
    for task in TASKS:
        (root / "tasks" / task).mkdir(parents=True)
        for split, count in (("dev", 3), ("test", 2)):
            rows = [
                {"prompt": f"{task} {rng.choice(WORDS)}", "target": str(rng.choice(WORDS))}
                for _ in range(count)
            ]
            text = "".join(json.dumps(r) + "\n" for r in rows)
            (root / "tasks" / task / f"{split}.jsonl").write_text(text)
    return root


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model or building the objective fails the test."""
    import d2c_jax.models

    def refuse(*args, **kwargs):
        raise AssertionError("the data-free job loaded a model")

    monkeypatch.setattr(d2c_jax.models, "load_base", refuse)
    monkeypatch.setattr(DevObjective, "__init__", refuse)


def job(world, hf_dir, **fields) -> pipeline.ClusterJob:
    defaults = dict(
        budget="2",
        library=world / "library",
        tasks=world / "tasks",
        merge=MERGE,
        seed=1,
        base=str(hf_dir),
    )
    return pipeline.ClusterJob(**(defaults | fields))


@pytest.mark.parametrize("method", ["random", "kmeans", "mbc", "kmerge"])
def test_data_free_job_loads_no_model_and_reads_no_examples(world, tmp_path, no_model, method):
    # tasks points at nothing: a data-free job that does not report J never reads it.
    spec = job(world, "no-such-base", method=method, tasks=tmp_path / "none")
    assert not pipeline.needs_objective(spec)
    record = pipeline.run_job(spec)
    assert record.method == method and record.k == 2
    assert sorted(set(record.assign.tolist())) == [0, 1]
    assert record.dev_objective is None and record.candidates_scored is None
    assert record.timings["fit"] == record.seconds


def test_d2c_job_is_the_method_called_by_hand(world, tiny_hf_dir):
    settings = {"init": "kmeans", "mode": "sweep", "max_iters": 2}
    spec = job(world, tiny_hf_dir, settings=settings)
    assert pipeline.needs_objective(spec)
    record = pipeline.run_job(spec)
    library = AdapterLibrary.load(world / "library")
    objective = pipeline.build_objective(spec, library)
    expected = D2CClustering(**settings).fit(library, 2, 1, objective)
    np.testing.assert_array_equal(record.assign, expected.assign)
    # D2C minimises its own J (likelihood loss by default); dev_objective is mean NLL.
    assert record.search_objective == pytest.approx(expected.objective)
    nll = objective.task_losses(membership_mask(expected.assign, 2)).sum() / len(TASKS)
    assert record.dev_objective == pytest.approx(float(nll))
    assert record.method_settings == dataclasses.asdict(D2CClustering(**settings))
    assert record.candidates_scored > 0
    assert [e["objective"] for e in record.log] == [e["objective"] for e in expected.log]


def test_dev_objective_of_a_data_free_job_is_its_mean_task_nll(world, tiny_hf_dir):
    spec = job(world, tiny_hf_dir, method="kmeans", report_dev_objective=True)
    library = pipeline.load_library(spec)
    objective = pipeline.build_objective(spec, library)
    record = pipeline.fit(spec, library, 2, objective)
    expected = KMeansClustering().fit(library, 2, 1)
    np.testing.assert_array_equal(record.assign, expected.assign)
    losses = objective.task_losses(membership_mask(expected.assign, 2))  # [K, N]
    assert record.dev_objective == pytest.approx(float(losses.sum()) / len(TASKS))
    assert record.candidates_scored == 0  # the fit scored nothing; J came after


def test_examples_per_task_caps_what_the_objective_reads(world):
    full = pipeline.read_task_examples(world / "tasks", TASKS, "dev")
    capped = pipeline.read_task_examples(world / "tasks", TASKS, "dev", limit=2)
    assert [len(v) for v in full.values()] == [3] * len(TASKS)
    assert all(capped[t] == full[t][:2] for t in TASKS)
    seen = []
    pipeline.read_task_examples(world / "tasks", [*TASKS, "absent"], "dev", check=seen.append)
    assert [p.parent.name for p in seen] == TASKS  # tasks without the file are left out


def test_job_validation():
    with pytest.raises(ValueError, match="unknown clustering method 'nope'"):
        pipeline.ClusterJob(budget="2", method="nope")
    with pytest.raises(ValueError, match="cannot read the test split"):
        pipeline.ClusterJob(budget="2", split="test")
    with pytest.raises(TypeError):
        pipeline.ClusterJob(budget="2", settings={"no_such_field": 1}).make_method()


def test_evaluation_of_some_clusters_matches_all_and_saved_adapters_are_checked(
    world, tiny_base, tmp_path
):
    from d2c_jax.cluster.output import save_clusters

    library = AdapterLibrary.load(world / "library")
    assign = np.array([0, 1, 0, 2, 1, 2])
    run = lambda **kw: pipeline.evaluate_assignment(  # noqa: E731
        tiny_base, library, assign, MERGE, world / "tasks", limit=1, start=1, **kw
    )
    everything = run(progress=False)
    assert list(everything) == TASKS
    some = run(clusters=[2], progress=False)
    assert list(some) == ["task3", "task5"]
    assert all(some[t] == everything[t] for t in some)
    save_clusters(tmp_path / "saved", library, assign, MERGE)
    saved = run(saved=tmp_path / "saved", clusters=[0], progress=False)
    assert list(saved) == ["task0", "task2"] and all(v["n"] == 1 for v in saved.values())
    with pytest.raises(ValueError, match="not the clustering evaluated"):
        pipeline.evaluate_assignment(
            tiny_base, library, assign[::-1], MERGE, world / "tasks", saved=tmp_path / "saved"
        )
