"""`d2c evaluate` on a tiny model: each task is scored under its own cluster's adapter.

The test split of every task is built from what its cluster's saved adapter
generates, so a correct evaluation scores 100% exact match on every task, and
wiring a task to another cluster's adapter (which generates different text)
shows up as a lower score.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from d2c_jax.cli import main
from d2c_jax.cluster.output import load_clusters, save_clusters, task_adapters
from d2c_jax.evaluate import normalize
from d2c_jax.generation import generate
from d2c_jax.library import AdapterLibrary
from d2c_jax.merging import DEFAULT_MERGE
from tests.conftest import save_random_library

TASKS = ("alpha", "beta", "delta", "gamma")  # sorted: the library orders by name
ASSIGN = np.asarray([0, 1, 0, 1])
PROMPTS = ("cat dog", "sun sky", "tree jax", "merge lora", "dog sun")
MAX_NEW_TOKENS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_base, tiny_hf_dir, tiny_config):
    """A library of 4 tiny adapters, a saved 2-cluster clustering, and a test split per
    task whose targets are the cluster adapter's own greedy answers."""
    root = tmp_path_factory.mktemp("evaluate_cli")
    save_random_library(root / "library", tiny_config, TASKS, seed=11, std=0.6)
    library = AdapterLibrary.load(root / "library")
    save_clusters(root / "clustering", library, ASSIGN, DEFAULT_MERGE)
    assignment, merged = load_clusters(root / "clustering")
    answers = {}
    for task, adapter in task_adapters(assignment, merged).items():
        raw = generate(
            tiny_base,
            adapter,
            list(PROMPTS),
            max_new_tokens=MAX_NEW_TOKENS,
            chat_template=False,
        )
        answers[task] = [normalize(a) for a in raw]
        lines = [
            json.dumps({"prompt": p, "target": t})
            for p, t in zip(PROMPTS, answers[task], strict=True)
        ]
        (root / "tasks" / task).mkdir(parents=True)
        (root / "tasks" / task / "test.jsonl").write_text("\n".join(lines) + "\n")
    # The check below is only meaningful if the two clusters answer differently.
    assert answers["alpha"] != answers["beta"]
    return root, tiny_hf_dir


def evaluate_args(root, hf_dir, assignment, out, *extra):
    return [
        "evaluate",
        "--base",
        str(hf_dir),
        "--assignment",
        str(assignment),
        "--library",
        str(root / "library"),
        "--tasks",
        str(root / "tasks"),
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--out",
        str(out),
        *extra,
    ]


def test_clustering_directory_scores_each_task_with_its_cluster(setup, tmp_path):
    root, hf_dir = setup
    out = tmp_path / "scores.json"
    assert main(evaluate_args(root, hf_dir, root / "clustering", out)) == 0
    report = json.loads(out.read_text())
    assert {t: r["cluster"] for t, r in report["per_task"].items()} == dict(
        zip(TASKS, ASSIGN.tolist(), strict=True)
    )
    assert all(r["exact_match"] == 1.0 for r in report["per_task"].values())
    assert report["average"]["score"] == pytest.approx(100.0)
    # Single adapters differ from their clusters' merges, so they score lower here, and
    # the relative score is merged / single per task.
    single = json.loads(single_cache_file(root).read_text())["per_task"]
    expected = np.mean([100.0 / single[t]["score"] for t in TASKS if single[t]["score"] > 0])
    assert report["relative_score"] == pytest.approx(expected)


def test_assignment_file_merges_the_same_adapters_from_the_library(setup, tmp_path):
    root, hf_dir = setup
    # Cluster ids in a file need not be 0..K-1.
    assignment = tmp_path / "assignment.json"
    assignment.write_text(
        json.dumps({t: int(5 + 2 * c) for t, c in zip(TASKS, ASSIGN, strict=True)})
    )
    out = tmp_path / "scores.json"
    merge_flags = ["--merge", "ties", "--space", "delta", "--density", "0.2"]
    assert main(evaluate_args(root, hf_dir, assignment, out, "--no-relative", *merge_flags)) == 0
    report = json.loads(out.read_text())
    assert report["merge"]["density"] == 0.2 and "relative_score" not in report
    # Merged in float32 here vs bfloat16 on disk: greedy answers agree on nearly all.
    assert report["average"]["exact_match"] >= 0.75


def single_cache_file(root):
    """The one single-adapter cache file of the fixture's library (default settings)."""
    from d2c_jax.commands.evaluate import cache_root

    library = str((root / "library").resolve())
    found = [
        path
        for path in (cache_root() / "eval").glob("*/single.json")
        if json.loads(path.read_text())["settings"]["identity"]["library"] == library
        and json.loads(path.read_text())["settings"]["limit"] is None
    ]
    assert len(found) == 1, found
    return found[0]


def tree_stat(root):
    """{relative path: (size, mtime_ns, mode)} of everything under root, root included."""
    return {
        str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns, p.lstat().st_mode)
        for p in [root, *sorted(root.rglob("*"))]
    }


def test_evaluate_never_writes_into_the_library(setup, tmp_path):
    root, hf_dir = setup
    before = tree_stat(root / "library")
    assert main(evaluate_args(root, hf_dir, root / "clustering", tmp_path / "a.json")) == 0
    assert main(evaluate_args(root, hf_dir, root / "clustering", tmp_path / "b.json")) == 0
    assert tree_stat(root / "library") == before
    assert not (root / "library" / ".eval").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


def test_single_adapter_scores_are_reused_from_the_user_cache(setup, tmp_path):
    root, hf_dir = setup
    assert main(evaluate_args(root, hf_dir, root / "clustering", tmp_path / "a.json")) == 0
    cache = single_cache_file(root)
    data = json.loads(cache.read_text())
    data["per_task"]["alpha"]["score"] = 50.0  # a marker only a reuse can report
    cache.write_text(json.dumps(data))
    assert main(evaluate_args(root, hf_dir, root / "clustering", tmp_path / "b.json")) == 0
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["relative_score_details"]["per_task"]["alpha"] == pytest.approx(2.0)
    # Other settings (here a limit) are a different cache entry: evaluated afresh.
    args = evaluate_args(root, hf_dir, root / "clustering", tmp_path / "c.json", "--limit", "2")
    assert main(args) == 0
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["relative_score_details"]["per_task"]["alpha"] != pytest.approx(2.0)
    # A changed adapter file (a retrained adapter) is evaluated afresh.
    stamps = json.loads(cache.read_text())["stamps"]
    data = json.loads(cache.read_text())
    data["stamps"]["alpha"] = "0" * 16
    cache.write_text(json.dumps(data))
    assert main(evaluate_args(root, hf_dir, root / "clustering", tmp_path / "d.json")) == 0
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["relative_score_details"]["per_task"]["alpha"] != pytest.approx(2.0)
    assert json.loads(cache.read_text())["stamps"] == stamps


def test_evaluation_cannot_read_the_dev_split(setup, tmp_path, capsys):
    # The fixture's tasks hold test.jsonl only, so the other tests here also show that
    # evaluation reads nothing else; this one shows the flag cannot change that.
    root, hf_dir = setup
    out = tmp_path / "scores.json"
    with pytest.raises(SystemExit) as exit_info:
        main(evaluate_args(root, hf_dir, root / "clustering", out, "--split", "dev"))
    assert exit_info.value.code == 2
    assert "--split: invalid choice: 'dev'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"alpha": 0, "nope": 1}', "not in the library"),
        ('{"alpha": -1}', "non-negative integers"),
        ("[1, 2]", "expected a non-empty JSON object"),
        ("{oops", "not valid JSON"),
    ],
)
def test_bad_assignment_file_is_a_clear_error(setup, tmp_path, capsys, content, message):
    root, hf_dir = setup
    path = tmp_path / "assignment.json"
    path.write_text(content)
    assert main(evaluate_args(root, hf_dir, path, tmp_path / "out.json")) == 2
    err = capsys.readouterr().err
    assert message in err and "assignment.json" in err
    assert not (tmp_path / "out.json").exists()


def test_clustering_directory_without_its_adapters_is_a_clear_error(setup, tmp_path, capsys):
    root, hf_dir = setup
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "assignment.json").write_text(json.dumps({"alpha": 0, "beta": 1}))
    assert main(evaluate_args(root, hf_dir, broken, tmp_path / "out.json")) == 2
    assert "cluster_0/, cluster_1/" in capsys.readouterr().err
