"""`make demo` (`d2c_jax.demo`) end to end on a tiny model, library and task suite.

The real run (40 SmolLM2 adapters) takes about 10 minutes and is not a test; this
one checks what the demo promises on a small setup: every method's clustering and
merged adapters are written, the report's numbers are the printed ones, D2C
started from K-Means ends at a dev objective no higher than K-Means', and the
single adapters are the relative score's reference.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from d2c_jax import demo
from tests.conftest import save_random_library

TASKS = [f"task{i}" for i in range(6)]
WORDS = ["cat", "dog", "sun", "sky", "tree", "lora", "jax", "merge"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_hf_dir, tiny_config):
    root = tmp_path_factory.mktemp("demo")
    save_random_library(root / "library", tiny_config, TASKS, seed=5, std=0.4)
    rng = np.random.default_rng(1)
    for task in TASKS:
        (root / "tasks" / task).mkdir(parents=True)
        for split, count in (("dev", 3), ("test", 4)):
            lines = [
                json.dumps({"prompt": f"{task} {rng.choice(WORDS)}", "target": rng.choice(WORDS)})
                for _ in range(count)
            ]
            (root / "tasks" / task / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    args = [
        "--base", str(tiny_hf_dir), "--library", str(root / "library"),
        "--tasks", str(root / "tasks"), "--budget", "2", "--dev-per-task", "2",
        "--test-per-task", "3", "--out", str(root / "out"),
    ]  # fmt: skip
    return root / "out", args


def test_demo_writes_clusterings_report_and_plot(demo_run, capsys):
    out, args = demo_run
    assert demo.main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert (out / "plot.png").stat().st_size > 0
    assert report["k"] == 2 and report["n"] == len(TASKS)
    rows = {r["method"]: r for r in report["rows"]}
    methods = ["random", "kmeans", "mbc", "kmerge", "d2c"]
    assert list(rows) == [*methods, "single adapters"]
    for method in methods:
        assignment = json.loads((out / method / "assignment.json").read_text())
        assert sorted(assignment) == TASKS and set(assignment.values()) == {0, 1}
        for cluster in (0, 1):
            assert (out / method / f"cluster_{cluster}" / "adapter_model.safetensors").is_file()
        assert sorted(rows[method]["per_task"]) == TASKS
    # D2C starts from K-Means or MBC (whichever has the lower J) and never increases J.
    d2c = rows["d2c"]
    assert d2c["search_start"] in ("kmeans", "mbc")
    assert d2c["search_objective"] <= d2c["search_initial_objective"] + 1e-9
    assert rows["single adapters"]["relative_score"] == 1.0
    # The printed table carries the report's numbers.
    for row in report["rows"]:
        line = next(x for x in printed.splitlines() if x.startswith(f"{row['method']} "))
        assert f"{row['test_score']:.1f}" in line
    assert "differ from the full sweep" in printed
    assert report["demo_settings"]["dev_per_task"] == 2
    assert "Device export skipped: the base model is not a GGUF file." in printed
