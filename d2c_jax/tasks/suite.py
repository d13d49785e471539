"""The built-in multilingual task suite: 5 problem types x 8 languages = 40 tasks.

This module holds the suite's definition (names, splits, sizes), its deterministic
generation and its reading; `d2c_jax.tasks` re-exports it, and the example
generators of each problem type are in `d2c_jax.tasks.generators`.

Problem types (``TASK_TYPES``), each a different kind of operation:

``numwords``  generate: a number 0-999 written as words (num2words)
              ``Write 347 in German words.`` -> ``dreihundertsiebenundvierzig``
``date``      reformat: an ISO date as the CLDR long date (babel)
              ``Write 2023-04-17 as a long date in Polish.`` -> ``17 kwietnia 2023``
``units``     inflect: spell out an abbreviated unit with the plural form the number
              needs (babel CLDR units and plural rules)
              ``Spell out the unit in Polish: 5 km`` -> ``5 kilometrów``
``name``      rearrange: a localized person name (Faker) as "Surname, I."
              ``Write the name as surname, initial: Anna Schmidt`` -> ``Schmidt, A.``
``address``   extract: the city of a localized one-line postal address (Faker)
              ``Extract the city: Jopichstr. 98, 08016 Wetzlar`` -> ``Wetzlar``

Languages (``LANGUAGES``): en, de, es, fr, it, pt, nl, pl — Latin-script
languages, so every example fits the token budget of the English-centric SmolLM2
tokenizer (prompt + target + eos at most 48 tokens, tested). Prompts are short
English instructions; the language shows in the prompt (its name) and in the
target (or, for ``name`` and ``address``, in the localized names themselves).

Directory layout (the shipped suite lives in ``suite_dir()``; any other root
written by ``generate_suite`` looks the same)::

    <root>/suite.json                       manifest: seed, sizes, package versions, tasks
    <root>/<task_name>/train.jsonl          600 examples, adapter training only
    <root>/<task_name>/dev.jsonl            exactly 10: the only data clustering may see
    <root>/<task_name>/test.jsonl           100 examples, evaluation only

``task_name`` is ``<type>_<lang>``, e.g. ``numwords_de``. Each line is
``{"prompt": str, "target": str}`` (UTF-8, ``ensure_ascii=False``). The splits
of a task are disjoint by prompt.

Generation is deterministic: each task draws from ``random.Random`` seeded with
the string ``"d2c-tasks/<seed>/<task_name>"`` (Faker is seeded from it) and from
pinned packages (num2words, Faker, babel: versions recorded in the manifest),
deduplicates the example stream by prompt and cuts it into dev, test, train in
that order. Regenerating gives byte-identical files (tested)::

    python -m d2c_jax.tasks --out DIR
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from d2c_jax.io import versions, write_bytes_atomic, write_json_atomic
from d2c_jax.tasks.generators import GENERATORS, LANGUAGE_INFO

TASK_TYPES: tuple[str, ...] = ("numwords", "date", "units", "name", "address")
LANGUAGES: tuple[str, ...] = ("en", "de", "es", "fr", "it", "pt", "nl", "pl")
SPLITS: tuple[str, ...] = ("train", "dev", "test")
SPLIT_SIZES: dict[str, int] = {"train": 600, "dev": 10, "test": 100}
DEFAULT_SEED = 0
MANIFEST = "suite.json"
_SOURCE_PACKAGES = ("num2words", "faker", "babel")


def list_tasks() -> list[str]:
    """All task names, type-major: ``numwords_en, numwords_de, ..., address_pl``."""
    return [f"{t}_{lang}" for t in TASK_TYPES for lang in LANGUAGES]


def task_meta(name: str) -> tuple[str, str]:
    """``"numwords_de"`` -> ``("numwords", "de")``; ``KeyError`` for an unknown task."""
    task_type, _, lang = name.rpartition("_")
    if task_type not in TASK_TYPES or lang not in LANGUAGES:
        raise KeyError(
            f"unknown task {name!r}; expected <type>_<lang> with type in "
            f"{TASK_TYPES} and lang in {LANGUAGES}"
        )
    return task_type, lang


def language_name(lang: str) -> str:
    """English name of a language code (``"de"`` -> ``"German"``)."""
    return LANGUAGE_INFO[lang][0]


def suite_dir() -> Path:
    """The shipped, pre-generated suite inside the package."""
    return Path(__file__).resolve().parent / "data"


def generate_task(
    name: str, seed: int = DEFAULT_SEED, sizes: dict[str, int] | None = None
) -> dict[str, list[dict]]:
    """Generate one task's splits: ``{"train": [...], "dev": [...], "test": [...]}``."""
    task_type, lang = task_meta(name)
    sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    need = sum(sizes[s] for s in SPLITS)
    rng = random.Random(f"d2c-tasks/{seed}/{name}")
    seen: set[str] = set()
    examples: list[dict] = []
    for prompt, target in GENERATORS[task_type](lang, rng):
        if prompt in seen:
            continue
        seen.add(prompt)
        examples.append({"prompt": prompt, "target": target})
        if len(examples) == need:
            break
    if len(examples) < need:
        raise RuntimeError(f"{name}: only {len(examples)} distinct examples, need {need}")
    out, start = {}, 0
    for split in ("dev", "test", "train"):
        out[split] = examples[start : start + sizes[split]]
        start += sizes[split]
    return {s: out[s] for s in SPLITS}


def _dump_jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def generate_suite(
    out_dir: str | os.PathLike, seed: int = DEFAULT_SEED, sizes: dict[str, int] | None = None
) -> Path:
    """Write the whole suite under ``out_dir`` (layout in the module docstring).

    Every file is written atomically (temporary file + ``os.replace``) and the
    manifest ``suite.json`` last, so a directory with a manifest is complete.
    Returns ``out_dir`` as a ``Path``.
    """
    out = Path(out_dir)
    sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    tasks = {}
    for name in list_tasks():
        splits = generate_task(name, seed=seed, sizes=sizes)
        for split, rows in splits.items():
            write_bytes_atomic(out / name / f"{split}.jsonl", _dump_jsonl(rows))
        task_type, lang = task_meta(name)
        tasks[name] = {"type": task_type, "language": lang}
    manifest = {
        "format": "d2c-tasks/1",
        "seed": seed,
        "task_types": list(TASK_TYPES),
        "languages": list(LANGUAGES),
        "split_sizes": sizes,
        "packages": versions(_SOURCE_PACKAGES),
        "layout": '<task>/<split>.jsonl, lines {"prompt": str, "target": str}',
        "tasks": tasks,
    }
    write_json_atomic(out / MANIFEST, manifest)
    return out


def load_split(root: str | os.PathLike | None, task: str, split: str) -> list[dict]:
    """Read ``<root>/<task>/<split>.jsonl`` (``root=None``: the shipped suite)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    path = Path(suite_dir() if root is None else root) / task / f"{split}.jsonl"
    with open(path, encoding="utf-8-sig") as f:  # editors on Windows write a BOM
        return [json.loads(line) for line in f if line.strip()]
