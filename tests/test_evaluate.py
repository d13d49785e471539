"""Metrics of d2c_jax.evaluate against hand-computed values and sacrebleu itself."""

from __future__ import annotations

import math

import pytest
import sacrebleu

from d2c_jax.evaluate import (
    average_metrics,
    chrf,
    evaluate_tasks,
    exact_match,
    normalize,
    relative_score,
    relative_score_details,
    task_metrics,
    task_score,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("dreihundert", "dreihundert"),
        ("  dreihundert  ", "dreihundert"),
        ("\n\n  Müller, A.  \nsecond line", "Müller, A."),
        ("\r\n \t\r\n17 kwietnia 2023\r\n", "17 kwietnia 2023"),
        ("a  b", "a  b"),  # inner spaces are kept
        ("", ""),
        (" \n\n \t ", ""),
    ],
)
def test_normalize(raw, expected):
    assert normalize(raw) == expected


def test_exact_match_hand_values():
    refs = ["one", "two", "three", "four"]
    assert exact_match(refs, refs) == 1.0
    assert exact_match(["\n one", "Two", "three\nextra", "fourr"], refs) == 0.5
    assert exact_match(["", "", "", ""], refs) == 0.0
    with pytest.raises(ValueError):
        exact_match(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        exact_match([], [])


def test_chrf_hand_values():
    # "ab" vs "abc": order 1 P=1 R=2/3, order 2 P=1 R=1/2, orders 3-6 have no hypothesis
    # n-grams (left out). Averages P=1, R=7/12; F_beta=2 = 5PR / (4P + R) = 7/11.
    assert chrf(["ab"], ["abc"]) == pytest.approx(100 * 7 / 11)
    # Corpus statistics are summed before the F-score: order 1 P=1 R=4/5, order 2
    # P=1 R=2/3 -> R = 11/15, F = 55/71.
    assert chrf(["ab", "xy"], ["abc", "xy"]) == pytest.approx(100 * 55 / 71)
    assert chrf(["Kilometer"], ["Kilometer"]) == pytest.approx(100.0)
    assert chrf(["xyz"], ["abc"]) == 0.0
    # whitespace is ignored by chrF, normalisation takes the first non-empty line
    assert chrf(["\n\na b\nzzz"], ["ab"]) == pytest.approx(100.0)


def test_chrf_matches_sacrebleu():
    preds = ["dreihundertsieben", "trois cent sept", "", "17 kwietnia 2032", "Müller, A."]
    refs = ["dreihundertsiebzehn", "trois cent sept", "vier", "17 kwietnia 2023", "Müller, B."]
    assert chrf(preds, refs) == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)
    for p, r in zip(preds, refs, strict=True):
        assert chrf([p], [r]) == pytest.approx(sacrebleu.sentence_chrf(p, [r]).score)
    # predictions are normalised first (an empty answer followed by text counts as that text)
    raw = ["\n  " + p + ("\nmore" if p else "  \n") for p in preds]
    assert chrf(raw, refs) == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)


def test_task_score_and_metrics():
    assert task_score(0.5, 60.0) == 55.0
    assert task_score(1.0, 100.0) == 100.0
    assert task_score(0.0, 0.0) == 0.0
    m = task_metrics(["ab", "xy"], ["abc", "xy"])
    assert m["n"] == 2
    assert m["exact_match"] == 0.5
    assert m["chrf"] == pytest.approx(100 * 55 / 71)
    assert m["score"] == pytest.approx((50 + 100 * 55 / 71) / 2)


def test_average_metrics():
    per_task = {
        "a": {"exact_match": 1.0, "chrf": 100.0, "score": 100.0, "n": 10},
        "b": {"exact_match": 0.0, "chrf": 40.0, "score": 20.0, "n": 100},
    }
    avg = average_metrics(per_task)
    assert avg == {"exact_match": 0.5, "chrf": 70.0, "score": 60.0, "n_tasks": 2}
    with pytest.raises(ValueError):
        average_metrics({})


def test_relative_score():
    single = {"a": {"score": 80.0}, "b": {"score": 60.0}, "c": {"score": 50.0}}
    merged = {"a": {"score": 40.0}, "b": {"score": 30.0}, "c": {"score": 75.0}}
    # 0.5, 0.5, 1.5 -> mean 2.5 / 3
    assert relative_score(merged, single) == pytest.approx(2.5 / 3)
    details = relative_score_details(merged, single)
    assert details["per_task"] == pytest.approx({"a": 0.5, "b": 0.5, "c": 1.5})
    assert details["excluded"] == []
    # a task with a zero single-adapter score is left out
    single0 = dict(single, d={"score": 0.0})
    merged0 = dict(merged, d={"score": 10.0})
    d0 = relative_score_details(merged0, single0)
    assert d0["excluded"] == ["d"] and d0["relative_score"] == pytest.approx(2.5 / 3)
    assert math.isnan(relative_score({"d": {"score": 1.0}}, {"d": {"score": 0.0}}))
    # any metric, identical results give 1
    em = {"a": {"exact_match": 0.25}}
    assert relative_score(em, em, metric="exact_match") == 1.0
    with pytest.raises(KeyError):
        relative_score({"a": {"score": 1.0}}, single)


def test_evaluate_tasks_batches_across_tasks_and_normalises():
    examples = {
        "a": [{"prompt": f"p{i}", "target": f"t{i}"} for i in range(4)],
        "b": [{"prompt": f"p{i}", "target": f"t{i}"} for i in range(4, 7)],
    }
    calls = []

    def generate_fn(prompts):
        calls.append(list(prompts))
        # blank lines first (as the base model does), a wrong answer for p6
        return [
            ("\n\n" + p.replace("p", "t") + "\nchatter") if p != "p6" else "\nwrong"
            for p in prompts
        ]

    m = evaluate_tasks(generate_fn, examples, batch_size=3, return_predictions=True)
    assert calls == [["p0", "p1", "p2"], ["p3", "p4", "p5"], ["p6"]]  # batches span tasks
    assert [m["a"]["n"], m["b"]["n"]] == [4, 3]
    assert m["a"]["exact_match"] == 1.0 and m["b"]["exact_match"] == pytest.approx(2 / 3)
    assert m["b"]["predictions"] == ["t4", "t5", "wrong"]
    assert m["b"]["chrf"] == pytest.approx(
        sacrebleu.corpus_chrf(["t4", "t5", "wrong"], [["t4", "t5", "t6"]]).score
    )
    assert m["b"]["score"] == pytest.approx(task_score(2 / 3, m["b"]["chrf"]))
    assert "predictions" not in evaluate_tasks(generate_fn, examples, batch_size=16)["a"]


def test_evaluate_tasks_batches_shortest_prompts_first_and_keeps_task_order():
    examples = {
        "long": [{"prompt": "x" * n, "target": str(n)} for n in (9, 3, 7)],
        "short": [{"prompt": "y" * n, "target": str(n)} for n in (1, 8, 2)],
    }
    calls = []

    def generate_fn(prompts):
        calls.append([len(p) for p in prompts])
        return [str(len(p)) for p in prompts]

    m = evaluate_tasks(generate_fn, examples, batch_size=2, return_predictions=True)
    assert calls == [[1, 2], [3, 7], [8, 9]]
    assert m["long"]["predictions"] == ["9", "3", "7"]
    assert m["short"]["predictions"] == ["1", "8", "2"]
    assert m["long"]["exact_match"] == m["short"]["exact_match"] == 1.0


def test_evaluate_tasks_rejects_bad_generate_fn():
    examples = {"t": [{"prompt": "a", "target": "b"}, {"prompt": "c", "target": "d"}]}
    with pytest.raises(ValueError):
        evaluate_tasks(lambda ps: ["x"], examples, batch_size=2)
    with pytest.raises(ValueError):
        evaluate_tasks(lambda ps: ps, examples, batch_size=0)


def test_evaluation_cache_grows_with_the_library_and_keys_on_settings(tmp_path, monkeypatch):
    from d2c_jax import evaluate

    calls = []

    def fake_evaluate(base, adapters, root, split, **settings):
        calls.append(sorted(adapters))
        return {t: {"score": float(len(t) + settings["max_new_tokens"])} for t in adapters}

    monkeypatch.setattr(evaluate, "evaluate_adapters", fake_evaluate)
    cache = tmp_path / "single.json"
    first = evaluate.evaluate_cached(None, dict.fromkeys(["ab", "c"]), None, "test", cache)
    assert first == {"ab": {"score": 34.0}, "c": {"score": 33.0}}
    # A grown library evaluates only its new tasks and returns exactly the ones asked.
    grown = evaluate.evaluate_cached(None, dict.fromkeys(["c", "xyz"]), None, "test", cache)
    assert grown == {"c": {"score": 33.0}, "xyz": {"score": 35.0}}
    assert calls == [["ab", "c"], ["xyz"]]
    # Different settings or identity (e.g. the members of a merge) are not reused.
    evaluate.evaluate_cached(None, {"c": None}, None, "test", cache, max_new_tokens=8)
    evaluate.evaluate_cached(None, {"c": None}, None, "test", cache, identity={"members": ["c"]})
    assert calls[2:] == [["c"], ["c"]]
    cache.write_text("{torn")
    with pytest.raises(ValueError, match="single.json: evaluation cache is not valid JSON"):
        evaluate.evaluate_cached(None, {"c": None}, None, "test", cache)


def test_merged_task_adapters_for_a_subset_of_clusters(tmp_path, tiny_config):
    import numpy as np

    from d2c_jax.evaluate import merged_task_adapters
    from d2c_jax.library import AdapterLibrary
    from d2c_jax.merging import DEFAULT_MERGE
    from tests.conftest import save_random_library

    names = ["a", "b", "c", "d", "e"]
    save_random_library(tmp_path, tiny_config, names, seed=3, std=0.4)
    library = AdapterLibrary.load(tmp_path)
    assign = np.asarray([1, 0, 2, 1, 0])
    full = merged_task_adapters(library, assign, DEFAULT_MERGE)
    assert list(full) == names  # library order
    assert full["a"] is full["d"] and full["b"] is full["e"] and full["a"] is not full["b"]
    subset = merged_task_adapters(library, assign, DEFAULT_MERGE, clusters=[1, 2])
    assert list(subset) == ["a", "c", "d"]
    for task, (params, scale) in subset.items():
        want_params, want_scale = full[task]
        assert scale == pytest.approx(want_scale)
        for module, factors in params.items():
            for f, x in factors.items():
                np.testing.assert_allclose(x, want_params[module][f], rtol=1e-5, atol=1e-6)
    assert merged_task_adapters(library, assign, DEFAULT_MERGE, clusters=[]) == {}
