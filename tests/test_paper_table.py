"""benchmarks/paper_table.py: the seed-paired comparison of D2C with the other methods.

The README states per budget whether D2C beats each method beyond the seed spread,
so the pairing and the verdict are checked on cells with hand-computed differences.
"""

from __future__ import annotations

import pytest

from benchmarks.paper_table import markdown, paired_differences


def cell(method: str, budget: str, seed: int, scores: list[float], test_j: float) -> dict:
    per_task = {
        f"task{t}": {"exact_match": 0.0, "chrf": 0.0, "score": s} for t, s in enumerate(scores)
    }
    return {
        "method": method,
        "budget": budget,
        "seed": seed,
        "per_task": per_task,
        "test_objective": test_j,
    }


def by_other(diffs: list[dict], budget: str) -> dict[str, dict]:
    return {d["other"]: d for d in diffs if d["budget"] == budget}


def test_differences_are_paired_by_seed_and_averaged_over_tasks():
    cells = [
        # D2C task means 50, 60, 70 over seeds 0-2; kmeans 40, 58, 50: differences 10, 2, 20.
        cell("d2c", "25%", 0, [40.0, 60.0], 1.0),
        cell("d2c", "25%", 1, [60.0, 60.0], 2.0),
        cell("d2c", "25%", 2, [70.0, 70.0], 3.0),
        cell("kmeans", "25%", 2, [50.0, 50.0], 3.5),  # out of order: pairing is by seed
        cell("kmeans", "25%", 0, [30.0, 50.0], 1.5),
        cell("kmeans", "25%", 1, [58.0, 58.0], 2.0),
    ]
    (d,) = paired_differences(cells)
    assert (d["budget"], d["other"], d["seeds"]) == ("25%", "kmeans", [0, 1, 2])
    assert d["score_difference_mean"] == pytest.approx((10 + 2 + 20) / 3)
    mean = (10 + 2 + 20) / 3
    std = (((10 - mean) ** 2 + (2 - mean) ** 2 + (20 - mean) ** 2) / 3) ** 0.5
    assert d["score_difference_std"] == pytest.approx(std)
    assert d["test_objective_difference_mean"] == pytest.approx((-0.5 + 0.0 - 0.5) / 3)
    assert d["seeds_ahead"] == 3
    assert d["verdict"] == "ahead"  # ahead on every seed, mean 10.7 > std 7.4


@pytest.mark.parametrize(
    "others, verdict, ahead",
    [
        ([40.0, 40.0, 40.0], "ahead", 3),
        ([60.0, 60.0, 60.0], "behind", 0),
        # Ahead on every seed but by less than the spread of the difference.
        ([49.0, 49.0, 30.0], "within spread", 3),
        ([40.0, 60.0, 40.0], "within spread", 2),
    ],
)
def test_verdict(others, verdict, ahead):
    ours = [50.0, 50.0, 50.0]
    cells = [cell("d2c", "50%", s, [v], 0.0) for s, v in enumerate(ours)]
    cells += [cell("random", "50%", s, [v], 0.0) for s, v in enumerate(others)]
    (d,) = paired_differences(cells)
    assert d["verdict"] == verdict
    assert d["seeds_ahead"] == ahead


def test_unpaired_seeds_and_missing_methods_are_left_out():
    cells = [
        cell("d2c", "12.5%", 0, [50.0], 1.0),
        cell("d2c", "12.5%", 1, [50.0], 1.0),
        cell("mbc", "12.5%", 1, [45.0], 1.0),  # only seed 1 pairs
        cell("kmeans", "12.5%", 2, [45.0], 1.0),  # no D2C cell for seed 2
        cell("random", "25%", 0, [10.0], 3.0),  # no D2C at 25% yet
    ]
    diffs = paired_differences(cells)
    assert [(d["budget"], d["other"], d["seeds"]) for d in diffs] == [("12.5%", "mbc", [1])]
    assert diffs[0]["verdict"] == "one seed"


def test_markdown_has_one_comparison_row_per_pair():
    cells = [cell("d2c", "25%", s, [50.0], 1.0) for s in range(2)]
    cells += [cell(m, "25%", s, [40.0], 2.0) for m in ("random", "kmeans") for s in range(2)]
    summary = {"rows": [], "references": {}, "d2c_vs": paired_differences(cells)}
    text = markdown(summary)
    assert "| 25% | d2c | random | +10.0 ± 0.0 | -1.0000 ± 0.0000 | 2 of 2 seeds | ahead |" in text
    assert "| 25% | d2c | kmeans | +10.0 ± 0.0 |" in text


def test_each_d2c_variant_is_compared_with_the_data_free_methods():
    methods = ("random", "kmeans", "mbc", "d2c", "d2c_mbc_likelihood_sweep")
    cells = [cell(m, "50%", s, [10.0 * i], 1.0) for i, m in enumerate(methods) for s in (0, 1)]
    pairs = [(d["method"], d["other"]) for d in paired_differences(cells, "d2c")]
    pairs += [(d["method"], d["other"]) for d in paired_differences(cells, methods[-1])]
    assert pairs == [(m, o) for m in methods[3:] for o in ("random", "kmeans", "mbc")]


def test_validation_scores_are_read_from_their_own_key():
    cells = [cell("d2c", "25%", s, [50.0], 1.0) for s in range(2)]
    cells += [cell("mbc", "25%", s, [40.0], 1.0) for s in range(2)]
    for c, val in zip(cells, [30.0, 30.0, 45.0, 45.0], strict=True):
        c["per_task_val"] = {"task0": {"exact_match": 0.0, "chrf": 0.0, "score": val}}
    (test,) = paired_differences(cells, "d2c")
    (val,) = paired_differences(cells, "d2c", key="per_task_val")
    assert test["score_difference_mean"] == pytest.approx(10.0)
    assert val["score_difference_mean"] == pytest.approx(-15.0)
    assert val["verdict"] == "behind"


def test_results_sections_are_replaced_in_place(tmp_path):
    from benchmarks.common import write_results_section

    doc = tmp_path / "RESULTS.md"
    write_results_section("paper table", "make paper", "| a |", doc)
    write_results_section("ablation", "python x.py --eval val", "first", doc)
    write_results_section("paper table", "make paper", "| b |", doc)
    text = doc.read_text()
    assert text.index("## paper table") < text.index("## ablation")
    assert "| b |" in text and "| a |" not in text and text.count("## paper table") == 1
    assert "first" in text and "`python x.py --eval val`" in text


def test_sweep_cells_on_a_tiny_model(tmp_path, monkeypatch, tiny_hf_dir, tiny_config):
    """`Sweep` end to end through the pipeline: cells are written, a D2C variant that
    starts from K-Means ends no higher in dev J, a rerun reuses every cell, and
    ``--eval val`` scores the stored clusterings on their own key."""
    import json

    import numpy as np

    import d2c_jax.models
    from benchmarks.paper_table import main
    from tests.conftest import save_random_library

    tasks = [f"task{i}" for i in range(6)]
    save_random_library(tmp_path / "library", tiny_config, tasks, seed=5, std=0.4)
    rng = np.random.default_rng(1)
    for task in tasks:
        (tmp_path / "tasks" / task).mkdir(parents=True)
        for split, n in (("dev", 3), ("test", 4)):
            rows = [{"prompt": f"{task} {rng.choice(['a', 'b'])}", "target": "x"}] * n
            text = "".join(json.dumps(r) + "\n" for r in rows)
            (tmp_path / "tasks" / task / f"{split}.jsonl").write_text(text)
    real_load = d2c_jax.models.load_base
    monkeypatch.setattr(d2c_jax.models, "load_base", lambda name: real_load(str(tiny_hf_dir)))
    out = tmp_path / "results" / "paper_table"
    argv = ["--out", str(out), "--library", str(tmp_path / "library"), "--tasks",
            str(tmp_path / "tasks"), "--budgets", "2", "--seeds", "0", "--test-limit", "2",
            "--methods", "kmeans", "d2c_kmeans_nll_sweep"]  # fmt: skip
    assert main(argv) == 0
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    kmeans, d2c = cells["kmeans_2_0"], cells["d2c_kmeans_nll_sweep_2_0"]
    assert sorted(kmeans["per_task"]) == tasks and kmeans["candidates_scored"] == 0
    assert d2c["dev_objective"] <= kmeans["dev_objective"] + 1e-9
    assert d2c["candidates_scored"] > 0 and d2c["search"]["mode"] == "sweep"
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    assert main(argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == stamps
    assert main([*argv, "--eval", "val"]) == 0
    assert "per_task_val" in json.loads((out / "cells" / "kmeans_2_0.json").read_text())

    # --table-only computes nothing: a method never run is listed as missing.
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    assert main([*argv[:-2], "kmeans", "mbc", "--table-only"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == stamps
    table = json.loads((out.parent / "paper_table.json").read_text())
    assert table["missing_cells"] == ["mbc 2 seed 0"] and not table["complete"]

    # The default "d2c" reuses a variant's cell when their search settings agree.
    m1 = ["--methods", "d2c_best_likelihood_sweep_m1", "d2c"]
    assert main([*argv[:-3], *m1]) == 0
    same = [json.loads((out / "cells" / f"{m}_2_0.json").read_text()) for m in m1[1:]]
    assert same[0]["assignment"] == same[1]["assignment"] and same[1]["method"] == "d2c"
    assert same[0]["search"] == same[1]["search"]

    # A task without a test split: one clear error naming the file.
    (tmp_path / "tasks" / "task3" / "test.jsonl").unlink()
    with pytest.raises(SystemExit, match="task 'task3' has no test split"):
        main(argv)


def test_each_variant_runs_exactly_its_settings():
    """A cell's job spells out every search setting, so D2C's defaults (likelihood
    loss, one destination per sweep visit) cannot leak into an nll or exhaustive one."""
    import argparse

    from benchmarks.paper_table import D2C_VARIANTS, Sweep
    from d2c_jax.cluster import D2CClustering
    from kernels.merge import MergeConfig

    sweep = Sweep.__new__(Sweep)  # job() needs only these
    sweep.library_dir, sweep.merge_config = None, MergeConfig("linear")
    sweep.args = argparse.Namespace(tasks=None)
    for name, settings in D2C_VARIANTS.items():
        ran = sweep.job(name, "12.5%", 0).make_method()
        declared = D2CClustering(**settings)
        assert ran.task_loss == declared.task_loss, name
        assert ran.sweep_destinations == declared.sweep_destinations, name
        assert (ran.init, ran.mode, ran.max_iters) == (
            declared.init,
            declared.mode,
            declared.max_iters,
        )
    assert sweep.job("d2c_best_nll_sweep_m1", "50%", 0).make_method().task_loss == "nll"
    exhaustive = sweep.job("d2c_best_likelihood_sweep", "50%", 0).make_method()
    assert exhaustive.sweep_destinations == 0
