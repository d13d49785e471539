"""`d2c_jax.build_library`: reference groupings and the evaluation cache of its settings."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from d2c_jax import build_library
from d2c_jax.merging import DEFAULT_MERGE

NAMES = ("date_de", "date_en", "units_de", "units_en", "name_en")


def test_reference_groupings_follow_language_and_type():
    groups = build_library.reference_groupings(NAMES)
    np.testing.assert_array_equal(groups["one_merged"], [0, 0, 0, 0, 0])
    np.testing.assert_array_equal(groups["by_language"], [0, 1, 0, 1, 1])
    np.testing.assert_array_equal(groups["by_type"], [0, 0, 2, 2, 1])


def test_a_limited_evaluation_never_replaces_the_full_results(tmp_path, monkeypatch):
    from d2c_jax import evaluate

    calls = []

    def fake_evaluate(base, adapters, root, split, *, limit=None, **settings):
        calls.append(limit)
        return {t: {"score": 100.0 if limit is None else float(limit)} for t in adapters}

    monkeypatch.setattr(evaluate, "evaluate_adapters", fake_evaluate)
    library = SimpleNamespace(names=NAMES)

    def run(limit):
        return build_library.evaluate_setting(
            None, library, "base_raw", None, "test", tmp_path, DEFAULT_MERGE, limit=limit
        )

    assert run(None)["units_en"] == {"score": 100.0}
    assert run(2)["units_en"] == {"score": 2.0}
    assert run(None)["units_en"] == {"score": 100.0}  # served from its own file
    assert run(2)["units_en"] == {"score": 2.0}
    assert calls == [None, 2]


def test_manifest_names_the_task_suite_without_absolute_paths(tmp_path):
    from d2c_jax.tasks import suite_dir

    assert build_library.tasks_root_label(suite_dir(), tmp_path / "lib") == "built-in"
    assert build_library.tasks_root_label(tmp_path / "suite", tmp_path / "lib") == "../suite"


def test_committed_package_json_holds_no_absolute_paths():
    import json
    from pathlib import Path

    import d2c_jax

    def strings(data):
        if isinstance(data, dict):
            for value in data.values():
                yield from strings(value)
        elif isinstance(data, list):
            for value in data:
                yield from strings(value)
        elif isinstance(data, str):
            yield data

    data_dir = Path(d2c_jax.__file__).parent / "data"
    found = [
        (str(path.relative_to(data_dir)), text)
        for path in sorted(data_dir.rglob("*.json"))
        if not any(part.startswith(".") for part in path.relative_to(data_dir).parts)
        for text in strings(json.loads(path.read_text()))
        if text.startswith(("/", "~")) or (len(text) > 2 and text[1:3] == ":\\")
    ]
    assert found == []
