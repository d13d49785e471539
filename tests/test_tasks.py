"""The built-in task suite: metadata, split sizes and disjointness, byte-identical
regeneration, and the token budget under the real SmolLM2 tokenizer."""

from __future__ import annotations

import datetime
import json

import pytest

from d2c_jax import tasks
from d2c_jax.tasks import (
    LANGUAGES,
    SPLIT_SIZES,
    SPLITS,
    TASK_TYPES,
    generate_suite,
    generate_task,
    language_name,
    list_tasks,
    load_split,
    suite_dir,
    task_meta,
)

TOKEN_BUDGET = 48  # document start + prompt + target + eos, per the scoring contract


@pytest.fixture(scope="module")
def shipped():
    return {t: {s: load_split(None, t, s) for s in SPLITS} for t in list_tasks()}


def test_metadata_covers_types_and_languages():
    assert len(TASK_TYPES) >= 5 and len(set(TASK_TYPES)) == len(TASK_TYPES)
    assert len(LANGUAGES) >= 8 and len(set(LANGUAGES)) == len(LANGUAGES)
    names = list_tasks()
    assert len(names) == len(set(names)) == len(TASK_TYPES) * len(LANGUAGES) >= 40
    pairs = {task_meta(n) for n in names}
    assert pairs == {(t, lang) for t in TASK_TYPES for lang in LANGUAGES}
    assert task_meta("numwords_de") == ("numwords", "de")
    for bad in ("numwords", "numwords_xx", "nope_de", ""):
        with pytest.raises(KeyError):
            task_meta(bad)


def test_shipped_layout_and_manifest():
    root = suite_dir()
    manifest = json.loads((root / tasks.MANIFEST).read_text(encoding="utf-8"))
    assert manifest["task_types"] == list(TASK_TYPES)
    assert manifest["languages"] == list(LANGUAGES)
    assert manifest["split_sizes"] == SPLIT_SIZES
    assert set(manifest["tasks"]) == set(list_tasks())
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    expected = sorted([tasks.MANIFEST] + [f"{t}/{s}.jsonl" for t in list_tasks() for s in SPLITS])
    assert files == expected
    size = sum((root / f).stat().st_size for f in files)
    assert size < 5_000_000


def test_split_sizes_and_format(shipped):
    for name, splits in shipped.items():
        assert len(splits["dev"]) == 10, name
        assert len(splits["test"]) >= 50, name
        assert len(splits["train"]) >= 400, name
        for rows in splits.values():
            for row in rows:
                assert set(row) == {"prompt", "target"}
                assert isinstance(row["prompt"], str) and row["prompt"].strip() == row["prompt"]
                assert isinstance(row["target"], str) and row["target"].strip() == row["target"]
                assert row["prompt"] and row["target"]
                assert "\n" not in row["target"]  # evaluate.normalize keeps the first line


def test_splits_disjoint_by_prompt(shipped):
    for name, splits in shipped.items():
        seen: dict[str, str] = {}
        for split, rows in splits.items():
            for row in rows:
                assert row["prompt"] not in seen, (name, split, seen.get(row["prompt"]), row)
                seen[row["prompt"]] = split


def test_language_visible(shipped):
    # numwords, date and units name the language in the prompt; name and address
    # show it through localized names. Targets of different languages differ.
    for name, splits in shipped.items():
        task_type, lang = task_meta(name)
        if task_type in ("numwords", "date", "units"):
            assert all(language_name(lang) in r["prompt"] for r in splits["dev"])
    for task_type in TASK_TYPES:
        targets = {
            lang: {r["target"] for r in shipped[f"{task_type}_{lang}"]["train"]}
            for lang in LANGUAGES
        }
        for a in LANGUAGES:
            for b in LANGUAGES:
                if a < b:
                    overlap = len(targets[a] & targets[b]) / len(targets[a])
                    assert overlap < 0.5, (task_type, a, b, overlap)


def test_regeneration_is_byte_identical(tmp_path):
    out = generate_suite(tmp_path / "suite")
    root = suite_dir()
    produced = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    shipped_files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert produced == shipped_files  # also: no temporary files left behind
    for rel in produced:
        assert (out / rel).read_bytes() == (root / rel).read_bytes(), rel


def test_generation_independent_of_hash_seed():
    # Faker keeps some data in sets (it_IT's city list); the suite must not depend on
    # PYTHONHASHSEED, which the in-process regeneration test only samples by chance.
    import hashlib
    import os
    import subprocess
    import sys

    code = (
        "import hashlib, json\n"
        "from d2c_jax.tasks import generate_task, list_tasks\n"
        "for t in list_tasks():\n"
        "    print(t, hashlib.sha256(json.dumps(generate_task(t)).encode()).hexdigest())\n"
    )
    outputs = []
    for hash_seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outputs.append(run.stdout)
    assert outputs[0] == outputs[1]
    shipped_digest = {
        t: hashlib.sha256(
            json.dumps({s: load_split(None, t, s) for s in SPLITS}).encode()
        ).hexdigest()
        for t in list_tasks()
    }
    assert outputs[0] == "".join(f"{t} {d}\n" for t, d in shipped_digest.items())


def test_cli_and_seed(tmp_path):
    from d2c_jax.tasks.__main__ import main

    assert main(["--out", str(tmp_path / "a"), "--seed", "7"]) == 0
    again = generate_task("date_fr", seed=7)
    assert load_split(tmp_path / "a", "date_fr", "dev") == again["dev"]
    assert again["dev"] != generate_task("date_fr", seed=0)["dev"]


def test_generate_task_custom_sizes():
    out = generate_task("units_pl", sizes={"train": 5, "dev": 3, "test": 4})
    assert [len(out[s]) for s in SPLITS] == [5, 3, 4]
    assert out["dev"] == generate_task("units_pl")["dev"][:3]


def test_load_split_errors(tmp_path):
    with pytest.raises(ValueError):
        load_split(None, "numwords_de", "validation")
    with pytest.raises(FileNotFoundError):
        load_split(tmp_path, "numwords_de", "dev")


def test_examples_follow_their_rules(shipped):
    from babel.dates import format_date
    from num2words import num2words

    for lang in LANGUAGES:
        for row in shipped[f"numwords_{lang}"]["dev"]:
            n = int(row["prompt"].split()[1])
            assert 0 <= n <= 999 and row["target"] == num2words(n, lang=lang)
        for row in shipped[f"name_{lang}"]["dev"]:
            given, family = row["prompt"].rsplit(": ", 1)[1].split(" ")
            assert row["target"] == f"{family}, {given[0]}."
        for row in shipped[f"address_{lang}"]["dev"]:
            assert row["target"] in row["prompt"].split(": ", 1)[1]
        for row in shipped[f"date_{lang}"]["dev"]:
            iso = row["prompt"].split()[1]
            locale = tasks.generators.LANGUAGE_INFO[lang][1]
            expected = format_date(datetime.date.fromisoformat(iso), "long", locale=locale)
            assert row["target"] == tasks.generators.clean(expected)
    assert (
        tasks.generators.clean(format_date(datetime.date(2023, 4, 17), "long", locale="pl_PL"))
        == "17 kwietnia 2023"
    )


@pytest.mark.slow
def test_token_budget_real_tokenizer(real_base, shipped):
    from d2c_jax.examples import encode_examples

    longest = {}
    for name, splits in shipped.items():
        rows = [r for s in SPLITS for r in splits[s]]
        lengths = encode_examples(real_base, rows).lengths
        longest[name] = int(lengths.max())
    worst = max(longest, key=longest.get)
    assert longest[worst] <= TOKEN_BUDGET, (worst, longest[worst])
