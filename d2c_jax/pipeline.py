"""One clustering pipeline: a job described as data, and the functions that run it.

`ClusterJob` (a frozen dataclass) says everything a clustering depends on: the
library, the task suite and the example split the objective reads, the budget, the
method and its settings, the merge, the seed, the base model and how candidates are
scored. `run_job(job)` runs it end to end; the steps are public so that a caller that
does its own checks and I/O between them (`d2c cluster`, `make demo`, `make paper`)
runs the same code:

    library = load_library(job)                         # AdapterLibrary, N adapters
    k = resolve_budget(job.budget, library)
    objective = build_objective(job, library) if needs_objective(job) else None
    record = fit(job, library, k, objective)            # ClusterRecord

The objective (`DevObjective`: base model, prepared library (factors and trim
thresholds), and the encoded examples; loading the base model is the slow part) is built only when
needed: always for a data-driven method (D2C), for a data-free one (random, kmeans,
mbc, kmerge) only when the job asks for its dev objective J
(``report_dev_objective``). A data-free job that does not ask loads no model and
reads no examples, so it runs on a library without any.

`evaluate_assignment` is the one evaluation entry point: each task generated under
its cluster's merged adapter (merged in memory, or read as saved by `save_clusters`)
on a task split or a slice of it.

Shapes: ``assign [N]`` int in ``[0, K)``, membership masks ``[K, N]`` bool (see
docs/ARCHITECTURE.md, "Adapter data layout").
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from d2c_jax.cluster import METHODS, D2CClustering, membership_mask, resolve_budget
from d2c_jax.cluster.d2c import CachedObjective
from d2c_jax.cluster.objective import DevObjective, ObjectiveConfig
from d2c_jax.library import AdapterLibrary
from d2c_jax.merging import DEFAULT_MERGE
from kernels.merge import MergeConfig

# Methods that fit on the dev objective (and keep search checkpoints); the others
# (`METHODS` minus these) use the adapters' parameters only.
DATA_DRIVEN: frozenset[str] = frozenset({D2CClustering.name})


@dataclasses.dataclass(frozen=True)
class ClusterJob:
    """A clustering job (see module docstring).

    Attributes:
      budget: K (``"5"``), a percentage of N (``"12.5%"``) or bytes (``"4MB"``);
        `d2c_jax.cluster.resolve_budget`.
      method: a name of `d2c_jax.cluster.METHODS`.
      settings: field values of the method's class (e.g. ``{"init": "kmeans", "mode":
        "sweep"}`` for `D2CClustering`); fields left out keep the class defaults.
      library: library directory (None: the embedded library).
      tasks: task-suite directory ``<tasks>/<task>/<split>.jsonl`` (None: the built-in
        suite).
      split: the example split the objective reads (``dev``; never ``test``).
      examples_per_task: use only the first this many examples of each task (None: all).
      merge: the merge of every cluster, in the search and in the output.
      seed: seeds the method (random and k-means++ initialisations, sweep order) and
        DARE's masks (`merge.seed`).
      base: ``"default"`` (embedded SmolLM2), a Hugging Face directory or a ``.gguf``.
      scoring: how the objective scores candidates (`ObjectiveConfig`).
      report_dev_objective: also compute J for a data-free method (it then needs the
        model and the examples); data-driven methods always have it.
    """

    budget: str
    method: str = D2CClustering.name
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    library: Path | None = None
    tasks: Path | None = None
    split: str = "dev"
    examples_per_task: int | None = None
    merge: MergeConfig = DEFAULT_MERGE
    seed: int = 0
    base: str = "default"
    scoring: ObjectiveConfig = ObjectiveConfig()
    report_dev_objective: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(
                f"unknown clustering method {self.method!r}; choose from {list(METHODS)}"
            )
        if self.split == "test":
            raise ValueError("clustering cannot read the test split (it is held out)")

    def make_method(self):
        """The method's instance: ``METHODS[method](**settings)``."""
        return METHODS[self.method](**self.settings)


@dataclasses.dataclass(frozen=True)
class ClusterRecord:
    """What a job produced.

    Attributes:
      method: the method's name.
      method_settings: every field of the method instance that ran
        (``dataclasses.asdict``).
      assign: ``[N]`` int, cluster of each adapter (library order).
      k: number of clusters K.
      dev_objective: mean over tasks of the dev NLL under their cluster's merge (J with
        the ``nll`` task loss, comparable across methods); None without an objective.
      search_objective: the J the method itself minimised, when it computed one (D2C,
        with its task loss), else None.
      seconds: wall time of the method's fit alone.
      timings: ``{"fit": s, "dev_objective": s}``.
      candidates_scored: member sets the objective scored during the fit (None
        without an objective); the method's own count, if any, is in ``info``.
      log: the method's per-iteration records.
      info: the method's summary.
    """

    method: str
    method_settings: dict[str, Any]
    assign: np.ndarray
    k: int
    dev_objective: float | None
    search_objective: float | None
    seconds: float
    timings: dict[str, float]
    candidates_scored: int | None
    log: tuple[dict[str, Any], ...]
    info: dict[str, Any]


def needs_objective(job: ClusterJob) -> bool:
    """Whether the job needs the dev objective (model, prepared library, examples)."""
    return job.method in DATA_DRIVEN or job.report_dev_objective


def library_dir(job: ClusterJob) -> Path:
    """The job's library directory (when not given, the one shipped for the job's
    embedded base, SmolLM2's for any other base)."""
    from d2c_jax.library import embedded_library_dir
    from d2c_jax.models.loading import EMBEDDED_SPECS

    if job.library is not None:
        return Path(job.library)
    return embedded_library_dir(job.base if job.base in EMBEDDED_SPECS else "default")


def tasks_dir(job: ClusterJob) -> Path:
    """The job's task-suite directory (the built-in suite when not given)."""
    from d2c_jax.tasks import suite_dir

    return Path(job.tasks) if job.tasks is not None else suite_dir()


def load_library(job: ClusterJob, num_layers: int | None = None) -> AdapterLibrary:
    return AdapterLibrary.load(library_dir(job), num_layers=num_layers)


def read_task_examples(
    tasks: str | Path | None,
    names: Iterable[str],
    split: str,
    limit: int | None = None,
    check: Callable[[Path], None] | None = None,
) -> dict[str, list[dict]]:
    """``{task: examples}`` from ``<tasks>/<task>/<split>.jsonl`` (None: built-in suite).

    Tasks without that file are left out (`DevObjective` then names them); ``limit``
    keeps the first examples of each task; ``check(path)`` runs before a file is read
    (the CLI's UTF-8 and JSON check, which names the file and line).
    """
    from d2c_jax.examples import read_examples
    from d2c_jax.tasks import suite_dir

    root = Path(tasks) if tasks is not None else suite_dir()
    out = {}
    for name in names:
        path = root / name / f"{split}.jsonl"
        if path.is_file():
            if check is not None:
                check(path)
            out[name] = read_examples(path)[:limit]
    return out


def build_objective(
    job: ClusterJob,
    library: AdapterLibrary,
    base=None,
    check: Callable[[Path], None] | None = None,
) -> DevObjective:
    """The dev objective of the job: its split's examples (read first, so a bad file
    fails before the model loads), the base (`job.base`, loaded and checked against the
    library unless a `BaseModel` is given) and the prepared library."""
    from d2c_jax.adapters import check_adapter_for_base
    from d2c_jax.models import load_base

    examples = read_task_examples(job.tasks, library.names, job.split, job.examples_per_task, check)
    missing = [name for name in library.names if not examples.get(name)]
    if missing:  # here the directory is known (DevObjective only sees the examples)
        root = tasks_dir(job)
        flag = "--tasks " if job.tasks is not None else "the built-in task suite "
        raise ValueError(
            f"{flag}{root}: no {job.split} examples for tasks {missing}; every adapter needs "
            f"{root}/<task>/{job.split}.jsonl (give the task suite the library was trained on)"
        )
    if base is None:
        base = load_base(job.base)
        check_adapter_for_base(base, library)
    return DevObjective(base, library, examples, job.merge, job.scoring)


def mean_task_loss(objective, assign: np.ndarray, k: int) -> float:
    """Mean over the N tasks of each task's NLL under its cluster's merge (J with the
    ``nll`` task loss); a `CachedObjective` serves member sets it has scored before."""
    masks = membership_mask(np.asarray(assign), k)
    if isinstance(objective, CachedObjective):
        losses = objective.cluster_losses(masks)
    else:
        losses = objective.task_losses(masks)
    return float(losses.sum() / objective.num_tasks)


def fit(
    job: ClusterJob,
    library: AdapterLibrary,
    k: int,
    objective=None,
    checkpoint_dir: str | Path | None = None,
) -> ClusterRecord:
    """Run the job's method on `library` into `k` clusters and measure J.

    Args:
      objective: `DevObjective` or `CachedObjective` (shared by several fits, e.g. the
        cells of a sweep); required by data-driven methods, else only used for J.
      checkpoint_dir: where a data-driven search keeps its resumable state.
    """
    method = job.make_method()
    evaluations = getattr(objective, "evaluations", None)
    start = time.perf_counter()
    if job.method in DATA_DRIVEN:
        result = method.fit(library, k, job.seed, objective, checkpoint_dir=checkpoint_dir)
    else:
        result = method.fit(library, k, job.seed)
    seconds = time.perf_counter() - start
    scored = None if evaluations is None else objective.evaluations - evaluations
    dev_objective = result.objective
    if result.info.get("task_loss", "nll") != "nll" or (dev_objective is None and objective):
        dev_objective = None if objective is None else mean_task_loss(objective, result.assign, k)
    return ClusterRecord(
        method=job.method,
        method_settings=dataclasses.asdict(method),
        assign=np.asarray(result.assign),
        k=k,
        dev_objective=dev_objective,
        search_objective=result.objective,
        seconds=seconds,
        timings={"fit": seconds, "dev_objective": time.perf_counter() - start - seconds},
        candidates_scored=scored,
        log=tuple(result.log),
        info=dict(result.info),
    )


def run_job(job: ClusterJob, checkpoint_dir: str | Path | None = None) -> ClusterRecord:
    """Load the library, resolve the budget, build the objective if needed and fit."""
    library = load_library(job)
    k = resolve_budget(job.budget, library)
    objective = build_objective(job, library) if needs_objective(job) else None
    return fit(job, library, k, objective, checkpoint_dir)


def evaluate_assignment(
    base,
    library: AdapterLibrary,
    assign: np.ndarray,
    merge: MergeConfig,
    tasks: str | Path | None = None,
    split: str = "test",
    *,
    clusters: Sequence[int] | None = None,
    saved: str | Path | None = None,
    limit: int | None = None,
    start: int = 0,
    progress: bool = True,
) -> dict[str, dict]:
    """Per-task generation metrics of a clustering, each task under its cluster's merge.

    Args:
      base: `BaseModel`.
      library, assign, merge: the clustering (``assign [N]`` in library order).
      tasks: task-suite directory (None: built-in); each task reads its own `split`.
      clusters: evaluate only these clusters' tasks (default: all).
      saved: a clustering directory that `save_clusters` wrote for this assignment:
        its bfloat16 PEFT adapters are evaluated as deployed, instead of the float32
        merge in memory.
      limit, start: examples ``[start, start + limit)`` of each task (default: all).
    Returns ``{task: task_metrics}`` (`d2c_jax.evaluate`), in library order.
    """
    from d2c_jax.cluster.output import load_clusters, task_adapters
    from d2c_jax.evaluate import evaluate_adapters, merged_task_adapters

    if saved is None:
        adapters = merged_task_adapters(library, assign, merge, clusters)
    else:
        assignment, merged = load_clusters(saved)
        expected = {name: int(a) for name, a in zip(library.names, assign, strict=True)}
        if assignment != expected:
            raise ValueError(f"{saved}: its assignment.json is not the clustering evaluated")
        keep = None if clusters is None else {int(c) for c in clusters}
        adapters = {
            t: a
            for t, a in task_adapters(assignment, merged).items()
            if keep is None or assignment[t] in keep
        }
    return evaluate_adapters(
        base, adapters, tasks, split, limit=limit, start=start, progress=progress
    )
