"""Held-out generation metrics: exact match, chrF, a per-task score and the relative score.

Conventions (every number the engine reports about generated answers uses them):

* **Normalisation** (``normalize``): a generated answer is cut to its *first
  non-empty line*, with surrounding whitespace stripped. The base model often
  opens an answer with blank lines, and an adapter that has learned a task
  answers on one line and may ramble after it; the suite's targets are all one
  line. References go through the same function (a no-op for the suite's
  targets). Nothing else is changed: case, punctuation and inner spaces count.
* **Exact match**: fraction in [0, 1] of examples whose normalised prediction
  equals the normalised reference.
* **chrF**: sacrebleu's corpus-level chrF (``sacrebleu.metrics.CHRF()`` defaults:
  character n-grams up to 6, no word n-grams, beta 2) over the normalised
  predictions of a task, on sacrebleu's 0-100 scale.
* **Score** (per task): ``(100 * exact_match + chrF) / 2``, on 0-100. Exact
  match is what the tasks ask for (deterministic answers); chrF gives partial
  credit (a number word off by its last digit, a missing diacritic) so that
  scores separate adapters that are all below full exact match.
* **Averages** are macro averages over tasks (every task weighs the same).
* **Relative score** (the paper's sibling work): per task, the merged adapter's
  score divided by the single (unmerged) adapter's score on that task, averaged
  over tasks. Tasks whose single-adapter score is 0 are left out (the ratio is
  undefined) and reported in ``relative_score_details``.

``evaluate_tasks(generate_fn, {task: examples}, batch_size)`` runs any
``generate_fn(prompts: list[str]) -> list[str]`` (e.g. a closure over
``d2c_jax.generation.generate``) over the examples of tasks that share a model and
returns each task's metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "METRICS",
    "average_metrics",
    "chrf",
    "evaluate_tasks",
    "exact_match",
    "normalize",
    "relative_score",
    "relative_score_details",
    "task_metrics",
    "task_score",
]

METRICS: tuple[str, ...] = ("exact_match", "chrf", "score")


def normalize(text: str) -> str:
    """The first non-empty line of ``text``, stripped; ``""`` if there is none."""
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line
    return ""


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no examples to score")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction in [0, 1] of normalised predictions equal to their normalised references."""
    _check_lengths(predictions, references)
    hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True))
    return hits / len(references)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus chrF (0-100) of the normalised predictions against one reference each."""
    from sacrebleu.metrics import CHRF

    _check_lengths(predictions, references)
    hyps = [normalize(p) for p in predictions]
    refs = [normalize(r) for r in references]
    return float(CHRF().corpus_score(hyps, [refs]).score)


def task_score(exact_match_value: float, chrf_value: float) -> float:
    """Per-task score on 0-100: ``(100 * exact_match + chrF) / 2``."""
    return (100.0 * exact_match_value + chrf_value) / 2.0


def task_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """``{"n", "exact_match", "chrf", "score"}`` for one task's predictions."""
    em = exact_match(predictions, references)
    c = chrf(predictions, references)
    return {"n": len(references), "exact_match": em, "chrf": c, "score": task_score(em, c)}


def average_metrics(
    per_task: Mapping[str, Mapping[str, float]], metrics: Sequence[str] = METRICS
) -> dict:
    """Macro average over tasks of each metric: ``{metric: mean, ..., "n_tasks": T}``."""
    if not per_task:
        raise ValueError("no tasks to average")
    out = {m: sum(float(v[m]) for v in per_task.values()) / len(per_task) for m in metrics}
    out["n_tasks"] = len(per_task)
    return out


def relative_score_details(
    merged: Mapping[str, Mapping[str, float]],
    single: Mapping[str, Mapping[str, float]],
    metric: str = "score",
) -> dict:
    """Per-task ratios ``merged[t][metric] / single[t][metric]`` and their mean.

    Returns ``{"relative_score": mean, "per_task": {task: ratio}, "excluded": [tasks]}``;
    a task is excluded when its single-adapter value is 0. Every task of ``single``
    must be in ``merged``.
    """
    missing = sorted(set(single) - set(merged))
    if missing:
        raise KeyError(f"merged results lack tasks {missing}")
    per_task, excluded = {}, []
    for task, s in single.items():
        denom = float(s[metric])
        if denom == 0.0:
            excluded.append(task)
            continue
        per_task[task] = float(merged[task][metric]) / denom
    mean = sum(per_task.values()) / len(per_task) if per_task else math.nan
    return {"relative_score": mean, "per_task": per_task, "excluded": excluded}


def relative_score(
    merged: Mapping[str, Mapping[str, float]],
    single: Mapping[str, Mapping[str, float]],
    metric: str = "score",
) -> float:
    """Mean over tasks of merged / single-adapter ``metric`` (1.0 = no loss from merging)."""
    return relative_score_details(merged, single, metric)["relative_score"]


def evaluate_tasks(
    generate_fn: Callable[[list[str]], list[str]],
    examples: Mapping[str, Sequence[Mapping[str, str]]],
    batch_size: int = 16,
    return_predictions: bool = False,
) -> dict[str, dict]:
    """Generate answers for the examples of tasks that share one model, and score each task.

    ``examples`` is ``{task: [{"prompt", "target"}, ...]}``; the prompts of all tasks
    go through ``generate_fn`` together, shortest first, in batches of at most
    ``batch_size`` (one merged adapter serves several tasks, and full batches of
    similar lengths generate faster).
    ``generate_fn`` must return one string per prompt (raw text; normalisation
    happens here). Returns ``{task: task_metrics}``, each with ``"predictions"``
    (normalised) when asked.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    prompts = [e["prompt"] for task_examples in examples.values() for e in task_examples]
    # Batches take prompts shortest first: a batch is padded to its longest prompt and
    # decodes until its longest answer ends, and similar prompts (often of one task)
    # have similar lengths.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    raw: list[str] = [""] * len(prompts)
    for start in range(0, len(prompts), batch_size):
        rows = order[start : start + batch_size]
        answers = list(generate_fn([prompts[i] for i in rows]))
        if len(answers) != len(rows):
            raise ValueError(f"generate_fn returned {len(answers)} answers for {len(rows)} prompts")
        for i, answer in zip(rows, answers, strict=True):
            raw[i] = answer
    out, start = {}, 0
    for task, task_examples in examples.items():
        answers = raw[start : start + len(task_examples)]
        start += len(task_examples)
        out[task] = task_metrics(answers, [e["target"] for e in task_examples])
        if return_predictions:
            out[task]["predictions"] = [normalize(a) for a in answers]
    return out


# ------------------------------------------------------------------ evaluation harness


def merged_task_adapters(
    library, assign, merge_config, clusters=None
) -> dict[str, tuple[dict, float]]:
    """Each task's adapter under a clustering: its cluster's merged rank-r adapter.

    Args:
      library: `AdapterLibrary` of N adapters.
      assign: ``[N]`` cluster of each adapter.
      merge_config: `kernels.merge.MergeConfig` (the same as the clustering used).
      clusters: merge only these clusters (default: all); the result then holds only
        their member tasks. A cluster's merge depends on its members alone, so this
        gives the same adapters as merging every cluster.
    Returns ``{task: (params {module: {"A": [L, r, d_in], "B": [L, d_out, r]}}, scale)}``;
    the tasks of one cluster share one adapter object.
    """
    import jax
    import numpy as np

    from d2c_jax.merging import merge

    assign = np.asarray(assign)
    if clusters is None:
        clusters = range(int(assign.max()) + 1)
    clusters = [int(c) for c in clusters]
    if not clusters:
        return {}
    masks = (assign[None, :] == np.asarray(clusters)[:, None]).astype(np.float32)
    merged = merge(library.params, library.scale, masks, merge_config, names=library.names)
    per_cluster = {
        c: (jax.tree.map(lambda x, row=row: x[row], merged.params), float(merged.scale[row]))
        for row, c in enumerate(clusters)
    }
    return {
        name: per_cluster[int(assign[i])]
        for i, name in enumerate(library.names)
        if int(assign[i]) in per_cluster
    }


def evaluate_adapters(
    base,
    adapters: Mapping[str, object],
    root,
    split: str = "test",
    *,
    chat_template: bool = False,
    max_new_tokens: int = 32,
    batch_size: int = 50,
    limit: int | None = None,
    start: int = 0,
    progress: bool = True,
) -> dict[str, dict]:
    """Greedy-generation metrics of each task under its adapter, on a held-out split.

    Args:
      base: `BaseModel`.
      adapters: ``{task: None | (params, scale)}``; None evaluates the base model.
        Tasks mapped to the same object are generated in shared batches.
      root: task-suite directory (``<root>/<task>/<split>.jsonl``; None: built-in).
      split: the split to evaluate (``test``; evaluation never reads ``dev``).
      chat_template: wrap prompts as a chat turn (how one asks the base instruct
        model); adapters are trained on raw prompts, so they are evaluated raw.
      limit: evaluate only `limit` examples of each task (default: all).
      start: skip the first `start` examples of each task (with `limit`, examples
        ``[start, start + limit)``: a validation slice disjoint from a test slice).
    Returns ``{task: task_metrics}``.
    """
    from tqdm.auto import tqdm

    from d2c_jax.generation import generate
    from d2c_jax.tasks import load_split

    # Tasks that share an adapter object (the members of one merged cluster, or the
    # base model) are generated together.
    groups: dict[int, list[str]] = {}
    for task, adapter in adapters.items():
        groups.setdefault(id(adapter), []).append(task)
    results = {}
    bar = tqdm(total=len(adapters), desc=f"evaluate ({split})", disable=not progress)
    for tasks in groups.values():
        adapter = adapters[tasks[0]]
        generate_fn = lambda prompts, adapter=adapter: generate(
            base,
            adapter,
            prompts,
            max_new_tokens=max_new_tokens,
            chat_template=chat_template,
            batch_size=batch_size,
        )
        stop = None if limit is None else start + limit
        examples = {task: load_split(root, task, split)[start:stop] for task in tasks}
        results.update(evaluate_tasks(generate_fn, examples, batch_size=batch_size))
        bar.update(len(tasks))
    bar.close()
    return {task: results[task] for task in adapters}


def evaluate_cached(
    base,
    adapters: Mapping[str, object],
    root,
    split: str,
    cache_path,
    *,
    identity=None,
    stamps: Mapping[str, str] | None = None,
    chat_template: bool = False,
    max_new_tokens: int = 32,
    limit: int | None = None,
    batch_size: int = 50,
    progress: bool = True,
) -> dict[str, dict]:
    """`evaluate_adapters`, keeping per-task results in a JSON file across runs.

    The file records what determines a result (split, tasks root, chat template,
    max new tokens, limit, and ``identity``: JSON data naming whatever else
    determines the adapters, such as the members and merge settings of merged
    adapters); tasks already in a file with the same key are not evaluated again and
    new tasks are added to it, so single adapters of a library that grows keep their
    earlier results. ``stamps`` (``{task: fingerprint of its adapter files}``), when
    given, are stored with the results, and a task whose stamp changed is evaluated
    again; without them the cache trusts that a task's adapter has not changed since
    it was stored (delete the file after retraining). Writing is atomic and best
    effort (the cache's directory may be read-only); results are returned either way.

    Returns ``{task: task_metrics}`` for exactly the tasks of ``adapters``.
    """
    import json
    from pathlib import Path

    from d2c_jax.io import write_json_atomic
    from d2c_jax.tasks import suite_dir

    path = Path(cache_path)
    builtin = root is None or Path(root).resolve() == Path(suite_dir()).resolve()
    key = {
        "split": split,
        "tasks_root": "built-in" if builtin else str(Path(root).resolve()),
        "chat_template": chat_template,
        "max_new_tokens": max_new_tokens,
        "limit": limit,
        "identity": identity,
    }
    stored: dict[str, dict] = {}
    stored_stamps: dict[str, str] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: evaluation cache is not valid JSON ({err})") from err
        if data.get("settings") == key:
            stored = data["per_task"]
            stored_stamps = data.get("stamps") or {}
    missing = {
        task: adapter
        for task, adapter in adapters.items()
        if task not in stored
        or (stamps is not None and stored_stamps.get(task) != stamps.get(task))
    }
    if missing:
        stored = stored | evaluate_adapters(
            base,
            missing,
            root,
            split,
            chat_template=chat_template,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            limit=limit,
            progress=progress,
        )
        record = {"settings": key, "per_task": stored}
        if stamps is not None or stored_stamps:
            stored_stamps = stored_stamps | {t: (stamps or {}).get(t) for t in missing}
            record["stamps"] = {t: s for t, s in stored_stamps.items() if s is not None}
        try:
            write_json_atomic(path, record)
        except OSError:
            pass
    return {task: stored[task] for task in adapters}
