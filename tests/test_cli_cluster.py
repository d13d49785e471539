"""`d2c cluster` end to end on a tiny model: outputs, budgets, and kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from d2c_jax.cli import main
from d2c_jax.library import AdapterLibrary
from tests.conftest import save_random_library

NUM_TASKS = 12


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, tiny_hf_dir, tiny_config):
    """A tiny base on disk, a library of 12 PEFT adapters and dev examples per task."""
    root = tmp_path_factory.mktemp("cluster_cli")
    names = [f"task{i:02d}" for i in range(NUM_TASKS)]
    save_random_library(root / "library", tiny_config, names, seed=7, std=0.3)
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "sun", "sky", "tree", "lora", "jax", "merge"]
    for name in names:
        (root / "examples" / name).mkdir(parents=True)
        lines = [
            json.dumps({"prompt": f"{name} {rng.choice(words)}", "target": str(rng.choice(words))})
            for _ in range(3)
        ]
        (root / "examples" / name / "dev.jsonl").write_text("\n".join(lines) + "\n")
    return root, tiny_hf_dir


def cluster_args(root, hf_dir, out, *extra):
    return [
        "cluster",
        "--base",
        str(hf_dir),
        "--library",
        str(root / "library"),
        "--tasks",
        str(root / "examples"),
        "--budget",
        "25%",
        "--init",
        "random",
        "--merge",
        "ties",
        "--density",
        "0.5",
        "--seed",
        "3",
        "--out",
        str(out),
        *extra,
    ]


def test_cluster_writes_assignment_adapters_log_and_manifest(tiny_setup, tmp_path):
    root, hf_dir = tiny_setup
    out = tmp_path / "out"
    assert main(cluster_args(root, hf_dir, out, "--method", "d2c")) == 0
    assignment = json.loads((out / "assignment.json").read_text())
    assert sorted(assignment) == [f"task{i:02d}" for i in range(NUM_TASKS)]
    assert set(assignment.values()) == {0, 1, 2}
    merged = AdapterLibrary.load([out / f"cluster_{k}" for k in range(3)])
    assert merged.rank == 4
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    objectives = [entry["objective"] for entry in log]
    assert all(b <= a for a, b in zip(objectives, objectives[1:], strict=False))
    assert all({"objective", "moves", "candidates_scored", "seconds"} <= set(e) for e in log)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["k"] == 3 and manifest["search_objective"] == pytest.approx(objectives[-1])
    assert manifest["dev_objective"] > 0  # mean dev NLL, comparable across methods
    assert manifest["storage"]["merged_bytes_bf16"] * 4 == manifest["storage"]["library_bytes_bf16"]
    assert manifest["settings"]["merge"]["method"] == "ties"
    assert not (out / ".search").exists()


def test_task_loss_flag_selects_the_bounded_objective(tiny_setup, tmp_path):
    root, hf_dir = tiny_setup
    runs = {}
    for task_loss in ("nll", "likelihood"):
        out = tmp_path / task_loss
        args = cluster_args(root, hf_dir, out, "--method", "d2c", "--max-iters", "1")
        assert main([*args, "--task-loss", task_loss]) == 0
        runs[task_loss] = json.loads((out / "manifest.json").read_text())
        assert runs[task_loss]["settings"]["task_loss"] == task_loss
    # Same initial clusters (same seed), so J_0 = mean(1 - exp(-nll_t)) <= mean nll_t
    # with equality only at zero loss; the bounded objective lies in [0, 1).
    first = {
        name: json.loads((tmp_path / name / "log.jsonl").read_text().splitlines()[0])
        for name in runs
    }
    assert 0 <= first["likelihood"]["objective"] < min(1.0, first["nll"]["objective"])


@pytest.mark.parametrize("method", ["random", "kmeans", "mbc"])
def test_data_free_methods_report_their_dev_objective(tiny_setup, tmp_path, method):
    root, hf_dir = tiny_setup
    out = tmp_path / method
    assert main(cluster_args(root, hf_dir, out, "--method", method)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dev_objective"] > 0


@pytest.mark.parametrize("method", ["random", "kmeans", "mbc"])
def test_data_free_methods_need_no_model_nor_examples(tiny_setup, tmp_path, monkeypatch, method):
    # A library without examples: without --tasks a data-free method reads no examples,
    # loads no base model and builds no objective (the model loader would fail).
    import d2c_jax.models
    from d2c_jax.cluster.objective import DevObjective

    def refuse(*args, **kwargs):
        raise AssertionError("a data-free clustering loaded the model")

    monkeypatch.setattr(d2c_jax.models, "load_base", refuse)
    monkeypatch.setattr(DevObjective, "__init__", refuse)
    root, hf_dir = tiny_setup
    args = cluster_args(root, hf_dir, tmp_path / "out", "--method", method)
    i = args.index("--tasks")
    del args[i : i + 2]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dev_objective"] is None and manifest["k"] == 3
    assert len(json.loads((tmp_path / "out" / "assignment.json").read_text())) == NUM_TASKS


def test_examples_is_the_hidden_old_name_of_tasks(tiny_setup, tmp_path, capsys):
    from d2c_jax.cli import build_parser

    root, hf_dir = tiny_setup
    args = cluster_args(root, hf_dir, tmp_path / "old", "--method", "random")
    args[args.index("--tasks")] = "--examples"
    assert main(args) == 0
    old = json.loads((tmp_path / "old" / "manifest.json").read_text())
    assert main(cluster_args(root, hf_dir, tmp_path / "new", "--method", "random")) == 0
    new = json.loads((tmp_path / "new" / "manifest.json").read_text())
    assert old["settings"] == new["settings"] and old["dev_objective"] == new["dev_objective"]
    assert main([*args[:-2], "--tasks", str(root / "examples"), "--out", str(tmp_path / "x")]) == 2
    assert "--examples is the old name of --tasks" in capsys.readouterr().err
    sub = build_parser()._subparsers._group_actions[0].choices["cluster"]
    text = sub.format_help()
    assert "--tasks" in text and "--examples" not in text
    assert "seeds the clustering" in " ".join(text.split())


@pytest.mark.parametrize(
    "budget, message",
    [("13", "exceeds the library's N=12"), ("0", "at least 1"), ("1%", "rounds to K=0")],
)
def test_bad_budgets_are_clear_errors(tiny_setup, tmp_path, capsys, budget, message):
    root, hf_dir = tiny_setup
    args = cluster_args(root, hf_dir, tmp_path / "out", "--method", "random")
    args[args.index("25%")] = budget
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_clustering_cannot_read_the_test_split(tiny_setup, tmp_path, capsys):
    # The fixture's examples hold dev.jsonl only, so every other test here also shows
    # that clustering reads nothing else; this one shows the flag cannot change that.
    root, hf_dir = tiny_setup
    for method in ("d2c", "kmeans"):
        with pytest.raises(SystemExit) as exit_info:
            main(
                cluster_args(root, hf_dir, tmp_path / method, "--method", method, "--split", "test")
            )
        assert exit_info.value.code == 2
        assert "--split: invalid choice: 'test'" in capsys.readouterr().err
        assert not (tmp_path / method).exists()


def test_refuses_to_overwrite_and_checks_resume_settings(tiny_setup, tmp_path, capsys):
    root, hf_dir = tiny_setup
    out = tmp_path / "out"
    assert main(cluster_args(root, hf_dir, out, "--method", "random")) == 0
    assert main(cluster_args(root, hf_dir, out, "--method", "random")) == 2
    assert "--resume" in capsys.readouterr().err
    # A finished run is recognised by --resume (exit 0, nothing rewritten).
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(cluster_args(root, hf_dir, out, "--method", "random", "--resume")) == 0
    assert "finished run" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert main(cluster_args(root, hf_dir, out, "--method", "kmeans", "--resume")) == 2
    assert "other settings (['method'])" in capsys.readouterr().err


# Many small iterations (one move each), so that a kill lands mid-search.
BEST_MODE = ("--mode", "best", "--max-iters", "50", "--task-loss", "nll")


def test_killed_search_resumes_to_the_same_assignment(tiny_setup, tmp_path):
    root, hf_dir = tiny_setup
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "d2c_jax.cli"]
    full = tmp_path / "full"
    subprocess.run(
        [*command, *cluster_args(root, hf_dir, full, "--method", "d2c", *BEST_MODE)],
        check=True,
        env=env,
        capture_output=True,
    )
    log = (full / "log.jsonl").read_text().splitlines()
    assert len(log) >= 3, "the search must run several iterations for the kill to land mid-way"

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*command, *cluster_args(root, hf_dir, killed, "--method", "d2c", *BEST_MODE)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = killed / ".search" / "ckpt"
    deadline = time.time() + 300
    while time.time() < deadline:
        steps = [p for p in checkpoints.glob("[0-9]*") if p.name.isdigit()]
        if any(int(p.name) >= 1 for p in steps):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "assignment.json").exists(), "the run finished before it was killed"

    subprocess.run(
        [*command, *cluster_args(root, hf_dir, killed, "--method", "d2c", *BEST_MODE, "--resume")],
        check=True,
        env=env,
        capture_output=True,
    )
    assert (killed / "assignment.json").read_text() == (full / "assignment.json").read_text()
    resumed_log = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    full_log = [json.loads(line) for line in log]
    assert [e["objective"] for e in resumed_log] == [e["objective"] for e in full_log]
