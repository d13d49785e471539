"""The paper-style table: test score against storage budget for every clustering method.

    python benchmarks/paper_table.py            (make paper)

Methods random, kmeans, mbc and d2c at budgets of 12.5%, 25% and 50% of the
embedded library, over several seeds, plus reference rows: all single adapters
(100% storage), one merged adapter, the groupings by language and by problem type,
and the base model (raw prompt and chat prompt); these come from the library's
evaluation cache that `make library` fills (`d2c_jax.build_library.SETTINGS`).
Every method's clusters are merged with the engine's default merge
(`d2c_jax.merging.DEFAULT_MERGE`) and evaluated on each task's *test* split
(the first `build_library.TEST_EXAMPLES_PER_TASK` = 50 examples, as the reference
rows), which clustering never reads (D2C's objective uses only the 10 dev examples per
task). Each row reports the mean and standard deviation over seeds of the
average test score, the relative score (merged / single adapter, per task,
averaged), the dev objective J, the same objective on the first `TEST_NLL_EXAMPLES`
test examples per task (held out: does a lower dev J carry over to unseen examples?),
wall time and candidates scored.

``--methods d2c_likelihood`` adds D2C with the bounded per-task loss
``1 - exp(-nll)`` (`d2c_jax.cluster.d2c`, ``task_loss="likelihood"``); it shares the
dev-objective cache with d2c and is compared with every other method by seed.

D2C starts from the same seed's K-Means clustering and runs one sweep by default
(``--max-iters``): every adapter visited once in a seeded order and moved to the
cluster that lowers J most. More sweeps cost about as much again each.

The sweep takes hours on a 2-core CPU, so every finished cell is saved under
``<out>/cells/<cell>.json`` and skipped on restart; a D2C run in progress is
checkpointed by the search itself, and the dev-objective cache (membership ->
per-task losses, valid for one merge config and dev set) is shared by all cells
and saved after each, so cells that revisit a member set do not score it again;
likewise test results are cached per member set (a task's score depends only on
its own cluster), so a cluster shared by several cells is generated once.

A cell is a `d2c_jax.pipeline.ClusterJob` (`Sweep.job`) fitted by the pipeline on the
sweep's shared objective and scored by the pipeline's `evaluate_assignment`.

Outputs: ``<out>/paper_table.json``, ``paper_table.md`` and ``paper_table.png``
(score against storage, one line per method, reference lines for the bounds).
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    machine_info,
    versions,
    write_results_section,
)
from d2c_jax.build_library import SETTINGS, TEST_EXAMPLES_PER_TASK  # noqa: E402
from d2c_jax.io import write_atomic, write_json_atomic, write_text_atomic  # noqa: E402

DATA_FREE = ("random", "kmeans", "mbc", "kmerge")
# D2C variants compared on the validation slice (docs/RESULTS.md, ablation): name ->
# settings of `d2c_jax.cluster.D2CClustering`. "d2c" is what `d2c cluster --method d2c`
# runs with no flags (`D2CClustering()`); the others are the variants tried, losers kept.
# The large-library search (one destination ranked by parameter similarity), which the
# visit-fraction variants prune further.
M1_SIMILARITY: dict[str, Any] = {
    "init": "best",
    "mode": "sweep",
    "max_iters": 1,
    "task_loss": "likelihood",
    "destinations": 1,
    "destination_proxy": "similarity",
}
D2C_VARIANTS: dict[str, dict[str, Any]] = {
    "d2c": {},
    "d2c_kmeans_nll_sweep": {
        "init": "kmeans",
        "mode": "sweep",
        "max_iters": 1,
        "task_loss": "nll",
        "destinations": 0,
    },
    "d2c_kmeans_likelihood_sweep": {
        "init": "kmeans",
        "mode": "sweep",
        "max_iters": 1,
        "task_loss": "likelihood",
        "destinations": 0,
    },
    "d2c_mbc_nll_sweep": {
        "init": "mbc",
        "mode": "sweep",
        "max_iters": 1,
        "task_loss": "nll",
        "destinations": 0,
    },
    "d2c_mbc_likelihood_sweep": {
        "init": "mbc",
        "mode": "sweep",
        "max_iters": 1,
        "task_loss": "likelihood",
        "destinations": 0,
    },
    "d2c_best_likelihood_sweep": {
        "init": "best",
        "mode": "sweep",
        "max_iters": 1,
        "task_loss": "likelihood",
        "destinations": 0,
    },
    "d2c_best_likelihood_sweep_m1": {
        "init": "best",
        "mode": "sweep",
        "max_iters": 1,
        "task_loss": "likelihood",
        "destinations": 1,
    },
    "d2c_best_likelihood_sweep_m1_similarity": M1_SIMILARITY,
    "d2c_best_likelihood_sweep_m1_similarity_visit75": {**M1_SIMILARITY, "visit_fraction": 0.75},
    "d2c_best_likelihood_sweep_m1_similarity_visit50": {**M1_SIMILARITY, "visit_fraction": 0.5},
    "d2c_best_nll_sweep_m1": {
        "init": "best",
        "mode": "sweep",
        "max_iters": 1,
        "task_loss": "nll",
        "destinations": 1,
    },
    # the default search with a teacher-forced correctness loss (issue 28)
    "d2c_best_margin_sweep_m1": {
        "init": "best",
        "mode": "sweep",
        "max_iters": 1,
        "task_loss": "margin",
        "destinations": 1,
    },
    "d2c_best_exact_sweep_m1": {
        "init": "best",
        "mode": "sweep",
        "max_iters": 1,
        "task_loss": "exact",
        "destinations": 1,
    },
    "d2c_mbc_nll_lloyd": {"init": "mbc", "mode": "lloyd", "max_iters": 10, "task_loss": "nll"},
    "d2c_mbc_likelihood_lloyd": {
        "init": "mbc",
        "mode": "lloyd",
        "max_iters": 10,
        "task_loss": "likelihood",
    },
}
METHODS = (*DATA_FREE, *D2C_VARIANTS)
# What `make paper` runs; the other D2C variants are opt-in (`--methods`).
DEFAULT_METHODS = (*DATA_FREE, "d2c")
# Test examples per task on which the objective J is also reported (held out from
# every method, like the test score).
TEST_NLL_EXAMPLES = 20
# Where each task's score is measured: the reported test slice, and a validation slice
# of the same split, disjoint from it, on which D2C's settings are chosen.
EVAL_SLICES = {"test": 0, "val": TEST_EXAMPLES_PER_TASK}
BUDGETS = ("12.5%", "25%", "50%")


def search_config(method: str) -> dict[str, Any]:
    """Every search setting of a D2C variant, spelled out (a setting left to
    `D2CClustering`'s defaults would follow them when they change); {} for other methods."""
    from d2c_jax.cluster import D2CClustering

    if method not in D2C_VARIANTS:
        return {}
    search = D2CClustering(**D2C_VARIANTS[method])
    return {
        "init": search.init,
        "mode": search.mode,
        "max_iters": search.max_iters,
        "task_loss": search.task_loss,
        "destinations": search.sweep_destinations,
        # only when it is not the default, so that earlier cells keep their identity
        **(
            {"destination_proxy": search.destination_proxy}
            if search.destination_proxy != "loss"
            else {}
        ),
        **({"visit_fraction": search.visit_fraction} if search.visit_fraction != 1 else {}),
    }


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:  # a file object: np.savez appends .npz to a name
        np.savez(f, **arrays)


class Sweep:
    """Runs and caches the cells of the table (see module docstring)."""

    def __init__(self, out: Path, args: argparse.Namespace):
        from d2c_jax import pipeline
        from d2c_jax import tasks as task_suite
        from d2c_jax.cluster.d2c import CachedObjective
        from d2c_jax.library import AdapterLibrary, embedded_library_dir
        from d2c_jax.merging import DEFAULT_MERGE
        from d2c_jax.models import load_base

        self.out = out
        self.args = args
        self.library_dir = Path(args.library or embedded_library_dir())
        self.library = AdapterLibrary.load(self.library_dir)
        self.base = load_base("default")
        self.merge_config = DEFAULT_MERGE
        for name in self.library.names:
            for split in ("dev", "test"):
                path = Path(args.tasks or task_suite.suite_dir()) / name / f"{split}.jsonl"
                if not path.is_file():
                    raise SystemExit(f"error: task {name!r} has no {split} split: {path} missing")
        # Every cell's job reads the same dev examples with the same merge and base.
        job = self.job("d2c", BUDGETS[0], 0)
        dev_objective = pipeline.build_objective(job, self.library, self.base)
        self.objective = CachedObjective(dev_objective)
        # The same objective on held-out test examples, never seen by any method: does
        # a lower dev J carry over to unseen examples (or does D2C overfit its 10)?
        names = self.library.names
        test = pipeline.read_task_examples(args.tasks, names, "test", TEST_NLL_EXAMPLES)
        self.test_objective = CachedObjective(dev_objective.with_examples(test))
        # Where scores are measured: the test slice (reported) or the validation slice
        # (examples [test_limit, 2 test_limit) of the test split; settings are chosen
        # there), each with its own per-task key in a cell and its own cache.
        self.eval_start = EVAL_SLICES[args.eval] if args.eval == "test" else args.test_limit
        self.per_task_key = "per_task" if args.eval == "test" else f"per_task_{args.eval}"
        # Results per member set (see `evaluate_assignment`), valid for one library,
        # merge config and example slice.
        suffix = "" if args.eval == "test" else f"_{args.eval}"
        self.cluster_scores_path = out / f"cluster_scores{suffix}.json"
        self.cluster_scores_identity = {
            "library": list(self.library.names),
            "merge": self.merge_config.to_dict(),
            "test_limit": args.test_limit,
            **({"start": self.eval_start} if self.eval_start else {}),
        }
        self.cluster_scores: dict[str, dict] = {}
        if self.cluster_scores_path.is_file():
            stored = json.loads(self.cluster_scores_path.read_text())
            if stored.get("identity") == self.cluster_scores_identity:
                self.cluster_scores = stored["clusters"]
        self.caches = {
            out / "objective_cache.npz": self.objective,
            out / f"test_objective_cache_first{TEST_NLL_EXAMPLES}.npz": self.test_objective,
        }
        for path, cached in self.caches.items():
            if path.is_file():
                with np.load(path) as data:
                    # Valid for one library only (a library being built grows).
                    if data["names"].tolist() == list(self.library.names):
                        # score_* only where a correctness task loss ran
                        cached.load_state({k: data[k] for k in data.files if k != "names"})

    def job(self, method: str, budget: str, seed: int):
        """The `d2c_jax.pipeline.ClusterJob` of a cell: a D2C variant is ``d2c`` with its
        settings spelled out (`search_config`); every job reads all dev examples, default
        merge."""
        from d2c_jax.pipeline import ClusterJob

        return ClusterJob(
            budget=budget,
            method="d2c" if method in D2C_VARIANTS else method,
            settings=search_config(method),
            library=self.library_dir,
            tasks=self.args.tasks,
            merge=self.merge_config,
            seed=seed,
        )

    def save_cache(self) -> None:
        for path, cached in self.caches.items():
            arrays = {"names": np.asarray(self.library.names), **cached.state()}
            write_atomic(path, functools.partial(_savez, arrays=arrays))

    def objectives(self, assign: np.ndarray, k: int) -> tuple[float, float]:
        """(dev J, test J) of an assignment ``[N]`` into K clusters."""
        from d2c_jax.pipeline import mean_task_loss

        return (
            mean_task_loss(self.objective, assign, k),
            mean_task_loss(self.test_objective, assign, k),
        )

    def search_settings(self, method: str) -> dict[str, Any] | None:
        """What a D2C cell depends on beyond library and test limit: the settings that
        differ from ``D2CClustering``'s field defaults are implied by the class, so the
        record holds init, mode, max_iters and, when not nll, task_loss."""
        from d2c_jax.cluster import D2CClustering

        if method not in D2C_VARIANTS:
            return None
        search = D2CClustering(**D2C_VARIANTS[method])
        settings = {"init": search.init, "mode": search.mode, "max_iters": search.max_iters}
        if search.task_loss != "nll":
            settings["task_loss"] = search.task_loss
        if search.sweep_destinations:
            settings["destinations"] = search.sweep_destinations
        if search.destination_proxy != "loss":
            settings["destination_proxy"] = search.destination_proxy
        if search.visit_fraction != 1:
            settings["visit_fraction"] = search.visit_fraction
        return settings

    def cell_path(self, method: str, budget: str, seed: int) -> Path:
        return self.out / "cells" / f"{method}_{budget.rstrip('%')}_{seed}.json"

    def is_stored(self, method: str, budget: str, seed: int) -> bool:
        return self.stored_cell(self.cell_path(method, budget, seed), method) is not None

    def stored_cell(self, path: Path, method: str) -> dict[str, Any] | None:
        """A finished cell, unless it was computed on another library, test limit or
        search setting."""
        if not path.is_file():
            return None
        cell = json.loads(path.read_text())
        same = (
            cell.get("library") == list(self.library.names)
            and cell.get("test_limit") == self.args.test_limit
            and cell.get("search") == self.search_settings(method)
        )
        return cell if same else None

    def finished_cell(self, method: str, budget: str, seed: int) -> dict[str, Any] | None:
        """A stored cell already scored on this run's slice, else None (nothing computed)."""
        path = self.cell_path(method, budget, seed)
        cell = self.stored_cell(path, method) or self.same_search(method, budget, seed)
        return cell if cell is not None and self.per_task_key in cell else None

    def same_search(self, method: str, budget: str, seed: int) -> dict[str, Any] | None:
        """A stored cell of another D2C variant with the same search settings (the
        default "d2c" is one of the variants tried), relabelled as `method`."""
        settings = self.search_settings(method)
        for other in D2C_VARIANTS:
            if other == method or settings is None or self.search_settings(other) != settings:
                continue
            cell = self.stored_cell(self.cell_path(other, budget, seed), other)
            if cell is not None:
                cell = {**cell, "method": method, "name": self.cell_path(method, budget, seed).stem}
                write_json_atomic(self.cell_path(method, budget, seed), cell)
                return cell
        return None

    def evaluate_assignment(self, assign: np.ndarray) -> dict[str, dict]:
        """Per-task test metrics of a clustering, each task under its cluster's merge.

        A task's result depends only on its own cluster's member set (the merge of
        those members), so results are cached per member set in
        ``<out>/cluster_scores.json``: clusters that several methods or seeds share
        (K-Means and MBC often agree; D2C moves change two clusters at a time) are
        generated once.
        """
        from d2c_jax.pipeline import evaluate_assignment

        names = self.library.names
        members = {
            int(c): "|".join(n for n, a in zip(names, assign, strict=True) if a == c)
            for c in np.unique(assign)
        }
        missing = [c for c, key in members.items() if key not in self.cluster_scores]
        if missing:
            scores = evaluate_assignment(
                self.base,
                self.library,
                assign,
                self.merge_config,
                self.args.tasks,
                "test",
                clusters=missing,
                limit=self.args.test_limit,
                start=self.eval_start,
                progress=False,
            )
            for c in missing:
                self.cluster_scores[members[c]] = {t: scores[t] for t in members[c].split("|")}
            write_json_atomic(
                self.cluster_scores_path,
                {"identity": self.cluster_scores_identity, "clusters": self.cluster_scores},
            )
        return {t: self.cluster_scores[members[int(assign[i])]][t] for i, t in enumerate(names)}

    def reference(self, name: str) -> dict[str, Any]:
        """A reference row (one of `build_library.SETTINGS`), sharing the library's
        evaluation cache with `make library`."""
        from d2c_jax.build_library import EVAL_DIR_NAME, evaluate_setting, reference_groupings

        lib = self.library
        start = time.perf_counter()
        scores = evaluate_setting(
            self.base,
            lib,
            name,
            None,
            "test",
            self.library_dir / EVAL_DIR_NAME,
            self.merge_config,
            limit=self.args.test_limit,
        )
        storage = {"single": 1.0, "one_merged": 1 / lib.num_adapters}.get(name, 0.0)
        dev_j = test_j = None
        groupings = reference_groupings(lib.names)
        if name in groupings:
            k = int(groupings[name].max()) + 1
            storage = k / lib.num_adapters
            dev_j, test_j = self.objectives(groupings[name], k)
        return {
            "name": name,
            "storage": storage,
            "dev_objective": dev_j,
            "test_objective": test_j,
            "per_task": scores,
            "seconds": time.perf_counter() - start,
        }

    def cell(self, method: str, budget: str, seed: int) -> dict[str, Any]:
        from d2c_jax import pipeline
        from d2c_jax.cluster import resolve_budget

        path = self.cell_path(method, budget, seed)
        name = path.stem
        if stored := self.stored_cell(path, method) or self.same_search(method, budget, seed):
            if self.per_task_key not in stored:  # clustered before, scored on another slice
                assign = np.array([stored["assignment"][t] for t in self.library.names])
                stored[self.per_task_key] = self.evaluate_assignment(assign)
                write_json_atomic(path, stored)
            return stored
        lib = self.library
        k = resolve_budget(budget, lib)
        settings = "_".join(str(v) for v in (self.search_settings(method) or {}).values())
        checkpoint = self.out / "ckpt" / f"{name}_n{lib.num_adapters}_{settings}"
        job = self.job(method, budget, seed)
        record = pipeline.fit(job, lib, k, self.objective, checkpoint_dir=checkpoint)
        dev_j, test_j = self.objectives(record.assign, k)
        cell = {
            "name": name,
            "method": method,
            "budget": budget,
            "seed": seed,
            "k": k,
            "storage": k / lib.num_adapters,
            "assignment": {t: int(record.assign[i]) for i, t in enumerate(lib.names)},
            "dev_objective": dev_j,
            "test_objective": test_j,
            "cluster_seconds": record.seconds,
            # Member sets the method itself scored (not those scored to report J).
            "candidates_scored": record.candidates_scored,
            "info": record.info,
            "library": list(lib.names),
            "test_limit": self.args.test_limit,
            "search": self.search_settings(method),
        }
        # The clustering is stored before it is scored: a killed run scores it on restart.
        write_json_atomic(path, cell)
        self.save_cache()
        # The cell supersedes its search checkpoint (kept only while the cell runs,
        # so that a killed sweep, also in a fresh clone, resumes mid-search).
        shutil.rmtree(checkpoint, ignore_errors=True)
        cell[self.per_task_key] = self.evaluate_assignment(record.assign)
        write_json_atomic(path, cell)
        return cell


def summarise(cells: list[dict], refs: dict[str, dict], key: str = "per_task") -> dict[str, Any]:
    """Rows per (method, budget) over seeds; `key` names the per-task results scored
    (``per_task``: test slice; ``per_task_val``: validation slice, no references)."""
    from d2c_jax.evaluate import average_metrics, relative_score

    single = refs["single"]["per_task"] if "single" in refs else None
    rows = []
    budgets = list(dict.fromkeys(c["budget"] for c in cells))  # as swept, e.g. "12.5%"
    for method in METHODS:
        for budget in budgets:
            group = [c for c in cells if c["method"] == method and c["budget"] == budget]
            if not group:
                continue
            scores = [average_metrics(c[key])["score"] for c in group]
            rel = [relative_score(c[key], single) if single else np.nan for c in group]
            dev = [c["dev_objective"] for c in group]
            test_j = [c["test_objective"] for c in group]
            rows.append(
                {
                    "method": method,
                    "budget": budget,
                    "k": group[0]["k"],
                    "storage": group[0]["storage"],
                    "seeds": [c["seed"] for c in group],
                    "score_mean": float(np.mean(scores)),
                    "score_std": float(np.std(scores)),
                    "relative_mean": float(np.mean(rel)),
                    "relative_std": float(np.std(rel)),
                    "dev_objective_mean": float(np.mean(dev)),
                    "dev_objective_std": float(np.std(dev)),
                    "test_objective_mean": float(np.mean(test_j)),
                    "test_objective_std": float(np.std(test_j)),
                    "cluster_seconds_mean": float(np.mean([c["cluster_seconds"] for c in group])),
                    "candidates_scored_mean": float(
                        np.mean([c["candidates_scored"] for c in group])
                    ),
                }
            )
    references = {
        name: {
            "storage": ref["storage"],
            "score": average_metrics(ref["per_task"])["score"],
            "relative": relative_score(ref["per_task"], single),
            "dev_objective": ref["dev_objective"],
            "test_objective": ref["test_objective"],
        }
        for name, ref in refs.items()
    }
    comparisons = [d for method in D2C_VARIANTS for d in paired_differences(cells, method, key)]
    return {"rows": rows, "references": references, "d2c_vs": comparisons}


def paired_differences(
    cells: list[dict], method: str = "d2c", key: str = "per_task"
) -> list[dict[str, Any]]:
    """`method` minus the other methods at each budget, paired by seed.

    A D2C variant is compared with each data-free method (`DATA_FREE`).

    Seeds pair naturally: D2C starts from the same seed's data-free clustering, and
    the other methods draw their randomness from the seed. For each (budget, other method)
    with at least one shared seed: mean and standard deviation over seeds of the
    difference in test score (positive: `method` better) and in J on held-out test
    examples (negative: `method` better), on how many seeds `method` scores higher, and
    a verdict on the score: "ahead" / "behind" when `method` is ahead (behind) on every
    seed and the mean difference exceeds its standard deviation, "within spread"
    otherwise, "one seed" when there is nothing to spread over.
    """
    from d2c_jax.evaluate import average_metrics

    by_key = {(c["method"], c["budget"], c["seed"]): c for c in cells}
    budgets = list(dict.fromkeys(c["budget"] for c in cells))
    out = []
    for budget in budgets:
        for other in DATA_FREE:
            seeds = sorted(
                s
                for m, b, s in by_key
                if m == method and b == budget and (other, budget, s) in by_key
            )
            if not seeds:
                continue
            pairs = [(by_key[method, budget, s], by_key[other, budget, s]) for s in seeds]
            score = np.array(
                [
                    average_metrics(ours[key])["score"] - average_metrics(theirs[key])["score"]
                    for ours, theirs in pairs
                ]
            )
            test_j = np.array(
                [ours["test_objective"] - theirs["test_objective"] for ours, theirs in pairs]
            )
            wins = int((score > 0).sum())
            if len(seeds) == 1:
                verdict = "one seed"
            elif wins == len(seeds) and score.mean() > score.std():
                verdict = "ahead"
            elif (score < 0).all() and -score.mean() > score.std():
                verdict = "behind"
            else:
                verdict = "within spread"
            out.append(
                {
                    "method": method,
                    "budget": budget,
                    "other": other,
                    "seeds": seeds,
                    "score_difference_mean": float(score.mean()),
                    "score_difference_std": float(score.std()),
                    "test_objective_difference_mean": float(test_j.mean()),
                    "test_objective_difference_std": float(test_j.std()),
                    "seeds_ahead": wins,
                    "verdict": verdict,
                }
            )
    return out


def markdown(summary: dict[str, Any], scored: str = "test") -> str:
    lines = [
        f"| method | budget (K) | seeds | {scored} score | relative score | dev J (mean NLL) | "
        f"J on {TEST_NLL_EXAMPLES} test examples/task | cluster time (s; member sets in the "
        "shared cache are free) | candidates scored |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        seeds = ",".join(str(s) for s in r["seeds"])
        relative = (
            ""
            if np.isnan(r["relative_mean"])
            else f"{r['relative_mean']:.3f} ± {r['relative_std']:.3f}"
        )
        lines.append(
            f"| {r['method']} | {r['budget']} ({r['k']}) | {seeds} | {r['score_mean']:.1f} ± "
            f"{r['score_std']:.1f} | {relative} | "
            f"{r['dev_objective_mean']:.4f} ± {r['dev_objective_std']:.4f} | "
            f"{r['test_objective_mean']:.4f} ± {r['test_objective_std']:.4f} | "
            f"{r['cluster_seconds_mean']:.0f} | {r['candidates_scored_mean']:.0f} |"
        )
    for name, ref in summary["references"].items():
        dev, test_j = (
            "" if ref[key] is None else f"{ref[key]:.4f}"
            for key in ("dev_objective", "test_objective")
        )
        lines.append(
            f"| {name} | {100 * ref['storage']:.1f}% | | {ref['score']:.1f} | "
            f"{ref['relative']:.3f} | {dev} | {test_j} | | |"
        )
    if summary["d2c_vs"]:
        lines += [
            "",
            f"D2C minus each method, paired by seed ({scored} score: higher is better for D2C; "
            "J: lower is); verdict on the score: ahead / behind on every seed by more than "
            "the standard deviation of the difference, else within spread.",
            "",
            f"| budget | method | vs | {scored} score difference | J difference on 20 test "
            "examples/task | ahead on "
            "| verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for d in summary["d2c_vs"]:
            lines.append(
                f"| {d['budget']} | {d['method']} | {d['other']} | "
                f"{d['score_difference_mean']:+.1f} ± "
                f"{d['score_difference_std']:.1f} | {d['test_objective_difference_mean']:+.4f} ± "
                f"{d['test_objective_difference_std']:.4f} | {d['seeds_ahead']} of "
                f"{len(d['seeds'])} seeds | {d['verdict']} |"
            )
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in METHODS:
        rows = [r for r in summary["rows"] if r["method"] == method]
        if rows:
            x = [100 * r["storage"] for r in rows]
            ax.errorbar(
                x,
                [r["score_mean"] for r in rows],
                yerr=[r["score_std"] for r in rows],
                marker="o",
                capsize=3,
                label=method,
            )
    # References that store adapters are points at their storage (one merged adapter,
    # the groupings, all single adapters); the base model stores none: a line.
    markers = {"single": "*", "one_merged": "v", "by_language": "s", "by_type": "D"}
    for name, ref in summary["references"].items():
        label = f"{name} ({ref['score']:.1f})"
        if name in markers:
            ax.plot(
                100 * ref["storage"], ref["score"], markers[name], color="gray", ms=8, label=label
            )
        else:
            style = "-." if name == "base_chat" else ":"
            ax.axhline(ref["score"], color="gray", linestyle=style, label=label)
    ax.set_xscale("log", base=2)
    # Budgets and the two ends (a reference between budgets would crowd the labels).
    ends = [summary["references"][n]["storage"] for n in ("one_merged", "single")]
    ticks = sorted({100 * x for x in [*(r["storage"] for r in summary["rows"]), *ends]})
    ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
    ax.set_xlabel("storage (% of the library, log scale)")
    ax.set_ylabel("average test score (0-100)")
    ax.set_title("Score against storage budget (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "paper_table")
    parser.add_argument("--library", type=Path, default=None)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--tasks",
        type=Path,
        default=None,
        help="task-suite directory <tasks>/<task>/{dev,test}.jsonl (default: the built-in suite)",
    )
    parser.add_argument(
        "--eval",
        choices=tuple(EVAL_SLICES),
        default="test",
        help="score on the reported test slice (the first --test-limit test examples per "
        "task) or on the validation slice (the next --test-limit), where D2C's settings "
        "are chosen; val writes d2c_validation.{json,md}",
    )
    parser.add_argument(
        "--test-limit",
        type=int,
        default=TEST_EXAMPLES_PER_TASK,
        help="evaluate the first N test examples per task (default: %(default)s, as the "
        "library's reference scores)",
    )
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="write the table from the cells already computed and scored on this slice; "
        "compute nothing (missing cells are listed as such)",
    )
    args = parser.parse_args(argv)

    sweep = Sweep(args.out, args)
    # Reference rows are scored on the test slice of the built-in library only.
    builtin = args.eval == "test" and args.library is None and args.tasks is None
    refs = {name: sweep.reference(name) for name in SETTINGS} if builtin else {}
    plan = [  # seed-major: every budget gets a first seed early
        (method, budget, seed)
        for seed in args.seeds
        for budget in args.budgets
        for method in args.methods
    ]
    if args.table_only:
        found = {p: sweep.finished_cell(*p) for p in plan}
        cells = [c for c in found.values() if c is not None]
        write_table(args, sweep, cells, refs, [p for p, c in found.items() if c is None], plan)
        print(markdown(summarise(cells, refs, sweep.per_task_key), args.eval))
        return 0
    cells = []
    for method, budget, seed in plan:
        cells.append(sweep.cell(method, budget, seed))
        print(f"done {method} {budget} seed {seed}", flush=True)
        # The table so far, after every cell: a sweep of hours can be read (and
        # committed) while it runs.
        missing = [c for c in plan[len(cells) :] if not sweep.is_stored(*c)]
        write_table(args, sweep, cells, refs, missing, plan)
    print(markdown(summarise(cells, refs, sweep.per_task_key), args.eval))
    return 0


def write_table(args, sweep, cells, refs, missing, plan) -> None:
    """``paper_table.json`` / ``.md`` / ``.png`` next to `args.out`; `missing` lists the
    cells not yet computed (empty when the table is complete)."""
    summary = summarise(cells, refs, sweep.per_task_key)
    summary.update(
        scored_on=f"{args.eval}: test examples [{sweep.eval_start}, "
        f"{sweep.eval_start + args.test_limit}) of each task",
        complete=not missing,
        missing_cells=[f"{m} {b} seed {s}" for m, b, s in missing],
        command=" ".join(sys.argv),
        machine=machine_info(),
        versions=versions(),
        settings={
            "search": sweep.search_settings("d2c"),
            "seeds": args.seeds,
            "test_limit": args.test_limit,
            "dev_examples_per_task": "all (10)",
            "test_objective_examples_per_task": TEST_NLL_EXAMPLES,
            "merge": sweep.merge_config.to_dict(),
        },
    )
    stem = "paper_table" if args.eval == "test" else "d2c_validation"
    write_json_atomic(args.out.parent / f"{stem}.json", summary)
    header = f"Partial table: {len(missing)} of {len(plan)} cells still to run.\n\n"
    header = header if missing else ""
    table = header + markdown(summary, args.eval)
    write_text_atomic(args.out.parent / f"{stem}.md", table)
    if args.library is None and args.tasks is None:  # docs describe the built-in library
        title = {
            "test": "Paper table: test score against storage budget",
            "val": "D2C variants on the validation slice (ablation)",
        }[args.eval]
        command = "python benchmarks/paper_table.py " + " ".join(sys.argv[1:])
        write_results_section(title, command.strip(), f"{summary['scored_on']}.\n\n{table}")
    if refs:
        plot(summary, args.out.parent / f"{stem}.png")


if __name__ == "__main__":
    raise SystemExit(main())
