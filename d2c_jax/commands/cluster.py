"""`d2c cluster`: cluster a library into K merged adapters (random, kmeans, mbc, d2c).

Output directory layout:
  assignment.json   {task: cluster}
  cluster_<k>/      one merged PEFT adapter per cluster
  log.jsonl         per iteration: objective, moves, candidates scored, seconds
  manifest.json     settings, versions, objective, storage bytes vs the library's
  .search/          D2C's orbax checkpoints while a run is unfinished (for --resume)

Devices: candidate scoring is split over ``--devices`` devices (default: all visible;
see `d2c_jax.sharding`). The device count is not a setting of the result (it changes
only float summation order), so a run may be resumed on another count. With
``--distributed`` every host runs the same command after `jax.distributed.initialize`
(docs/ARCHITECTURE.md, "Scaling out"); only process 0 reads and writes OUT and the
others follow its checks (`_check_out_on_writer`). Such runs keep no checkpoints
(orbax would need every process to share OUT), so ``--resume`` of an unfinished run
starts its search again (same settings, same result); a finished one is left as is.

The flags map to a `d2c_jax.pipeline.ClusterJob` in one place (`job_from_args`) and
the pipeline fits it; this module adds what a command needs around that: checks of
OUT and the inputs, ``--resume`` / ``--force``, and the atomic writes of OUT.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from d2c_jax.commands.checks import (
    CommandError,
    base_num_layers,
    check_base,
    check_jsonl,
    check_out,
    correlation,
    fraction,
    nonnegative_float,
    nonnegative_int,
    positive_int,
    read_json_object,
)
from d2c_jax.commands.outdir import locked, refuse_foreign
from d2c_jax.library import write_json_atomic

SETTINGS_NAME = "settings.json"
SEARCH_DIR = ".search"
MANIFEST_NAME = "manifest.json"


def add_parser(subparsers) -> None:
    from d2c_jax.cluster import METHODS, D2CClustering
    from d2c_jax.cluster.d2c import INITS, MODES, PROXIES, SWEEP_DESTINATIONS, TASK_LOSSES
    from d2c_jax.commands.merge_args import add_merge_arguments

    parser = subparsers.add_parser(
        "cluster",
        help="cluster a LoRA library into K merged adapters",
        description=(
            "Cluster a library of LoRA adapters into K groups and merge each group into one "
            "adapter. d2c refines an initial clustering by the dev-set loss of the merged "
            "adapters; random, kmeans and mbc use no data. A killed d2c run continues with "
            "--resume and reaches the same result."
        ),
    )
    parser.add_argument(
        "--base", default="default", help="'default' (embedded SmolLM2), an HF dir or a .gguf"
    )
    parser.add_argument(
        "--library", type=Path, default=None, help="library dir (default: the embedded one)"
    )
    parser.add_argument(
        "--tasks",
        type=Path,
        default=None,
        help="task-suite directory with <task>/<split>.jsonl (default: the built-in suite); "
        "d2c fits on its examples; random, kmeans, mbc and kmerge read it only when it is "
        "given, to report their dev objective",
    )
    # The old name of --tasks, hidden; it still works.
    parser.add_argument("--examples", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--split",
        default="dev",
        choices=("dev", "train"),
        help="example split to use (default: dev); the test split is held out for "
        "evaluation, so clustering cannot read it",
    )
    parser.add_argument(
        "--budget", required=True, help="K (e.g. 5), a percentage of N (12.5%%) or bytes (4MB)"
    )
    # D2C's defaults are `D2CClustering`'s, which `make paper` reports as "d2c".
    d2c = D2CClustering()
    parser.add_argument(
        "--method",
        choices=tuple(METHODS),
        default="d2c",
        help="clustering method: random, kmeans (K-Means on dense deltas), mbc (cosine "
        "K-Means on SVD features), kmerge (online, K-Merge), d2c (data-driven)",
    )
    parser.add_argument(
        "--init",
        choices=INITS,
        default=d2c.init,
        help=f"d2c: initial clustering (default: {d2c.init})",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default=d2c.mode,
        help="d2c: best (best move per iteration), sweep (each adapter's best move in a "
        f"seeded order) or lloyd (each task to its best current merge) (default: {d2c.mode})",
    )
    parser.add_argument(
        "--max-iters",
        type=positive_int,
        default=d2c.max_iters,
        help=f"d2c: at most this many iterations (default: {d2c.max_iters})",
    )
    parser.add_argument(
        "--destinations",
        type=nonnegative_int,
        default=None,
        metavar="M",
        help="d2c sweep mode: score only each adapter's M most promising destination "
        "clusters (ranked by its task's loss under each current merge); 0 = all "
        f"(default: {SWEEP_DESTINATIONS} in sweep mode)",
    )
    parser.add_argument(
        "--destination-proxy",
        choices=PROXIES,
        default=d2c.destination_proxy,
        help="d2c sweep mode: how the M destinations are ranked: loss (its task's dev loss "
        "under each current merge: K x N task evaluations per sweep) or similarity (cosine "
        "of its delta with each cluster's summed delta: no evaluation; for large libraries) "
        f"(default: {d2c.destination_proxy})",
    )
    parser.add_argument(
        "--visit-fraction",
        type=fraction,
        default=d2c.visit_fraction,
        help="d2c sweep mode with M > 0: visit only this fraction of the adapters, those the "
        "destination proxy finds least settled (fewer visits, less time; quality cost in "
        f"docs/RESULTS.md) (default: {d2c.visit_fraction:g}, every adapter)",
    )
    parser.add_argument(
        "--tol",
        type=nonnegative_float,
        default=d2c.tol,
        help="minimum objective improvement of a move",
    )
    parser.add_argument(
        "--task-loss",
        choices=tuple(TASK_LOSSES),
        default=d2c.task_loss,
        help="d2c: per-task loss the objective averages: nll (mean dev NLL, D2C as "
        "defined), likelihood (1 - exp(-nll), bounded: a broken task cannot outweigh "
        "working ones), exact (share of dev examples not reproduced under teacher "
        "forcing, likelihood as tie-break) or margin (1 - mean sigmoid of the target "
        "logit minus the best other logit)",
    )
    parser.add_argument(
        "--score-deployed",
        action="store_true",
        help="score candidates after rank-r truncation (exact, slower)",
    )
    parser.add_argument(
        "--candidates-per-call",
        type=positive_int,
        default=8,
        help="memory bound of a scoring call",
    )
    parser.add_argument(
        "--screen-top",
        type=nonnegative_int,
        default=0,
        metavar="M",
        help="d2c best mode: score exactly only the M moves with the best first-order estimate "
        "(plus a random sample that checks the estimate's ranking); 0 = off (default)",
    )
    parser.add_argument(
        "--screen-sample",
        type=nonnegative_int,
        default=16,
        help="moves scored at random to check screening",
    )
    parser.add_argument(
        "--screen-min-corr",
        type=correlation,
        default=0.5,
        help="below this rank correlation on the sample an iteration scores every move exactly",
    )
    parser.add_argument(
        "--devices",
        type=positive_int,
        default=None,
        help="devices to split candidate scoring over (default: all visible devices)",
    )
    multi = parser.add_argument_group(
        "multi-host", "run the same command on every host (docs/ARCHITECTURE.md, Scaling out)"
    )
    multi.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first; on Slurm, Open MPI and Cloud TPU the "
        "three flags below are detected, elsewhere give them",
    )
    multi.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    multi.add_argument(
        "--num-processes", type=positive_int, default=None, help="number of processes"
    )
    multi.add_argument(
        "--process-id", type=nonnegative_int, default=None, help="this process's id, 0-based"
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output directory (assignment.json, cluster_<k>/, log.jsonl, manifest.json)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an unfinished run in OUT (a finished one is reported and left as is)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace OUT if it is a previous `d2c cluster` output (anything else is refused); "
        "the old output is kept until the new one is complete",
    )
    add_merge_arguments(
        parser,
        method_flag="--merge",
        seed_help="seeds the clustering (random and k-means++ initialisations, d2c's sweep "
        "order) and DARE's random masks (default: %(default)s)",
    )
    parser.set_defaults(func=run)


def _settings(args: argparse.Namespace, job, library_dir: Path, tasks_dir: Path) -> dict[str, Any]:
    """The run's settings as recorded in OUT (``--resume`` compares them). The key
    "examples" holds the task-suite directory (the flag's old name, kept so that
    earlier outputs still resume); the D2C flags are recorded for every method."""
    return {
        "base": str(args.base),
        "library": str(library_dir),
        "examples": str(tasks_dir),
        "split": job.split,
        "budget": job.budget,
        "method": job.method,
        "init": args.init,
        "mode": args.mode,
        "max_iters": args.max_iters,
        "destinations": args.destinations,
        # recorded only when set, so that earlier outputs still resume
        **(
            {"destination_proxy": args.destination_proxy}
            if args.destination_proxy != "loss"
            else {}
        ),
        **({"visit_fraction": args.visit_fraction} if args.visit_fraction != 1 else {}),
        "tol": args.tol,
        "task_loss": args.task_loss,
        "score_deployed": args.score_deployed,
        "screen_top": args.screen_top,
        "screen_sample": args.screen_sample,
        "screen_min_corr": args.screen_min_corr,
        "seed": job.seed,
        "merge": job.merge.to_dict(),
    }


def is_cluster_output(out: Path) -> bool:
    """A directory `d2c cluster` wrote (finished: manifest; unfinished: saved settings)."""
    manifest = read_json_object(out / MANIFEST_NAME)
    if manifest is not None and {"settings", "k"} <= set(manifest):
        return True
    return (out / SEARCH_DIR / SETTINGS_NAME).is_file()


def _finished_settings(out: Path) -> dict[str, Any] | None:
    manifest = read_json_object(out / MANIFEST_NAME)
    return None if manifest is None else manifest.get("settings")


def _changed(previous: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    return sorted(k for k in settings if previous.get(k) != settings[k])


def remove_leftovers(out: Path) -> None:
    """Remove hidden temporaries a killed write can leave in OUT (the search state
    in .search/ is not one of them)."""
    for path in out.glob(".*"):
        if path.name == SEARCH_DIR:
            continue
        if path.is_dir() and path.name.startswith(".cluster_"):
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file() and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)


def is_ours(path: Path) -> bool:
    """Whether `path` (an entry of OUT) is something `d2c cluster` writes."""
    from d2c_jax.cluster.output import ASSIGNMENT_NAME
    from d2c_jax.library import CONFIG_NAME, PROVENANCE_NAME, WEIGHTS_NAME

    name = path.name
    if name in (ASSIGNMENT_NAME, "log.jsonl", MANIFEST_NAME, SEARCH_DIR):
        return True
    if re.fullmatch(r"\.?cluster_\d+(\.\w+)?", name) and path.is_dir():
        adapter_files = {CONFIG_NAME, WEIGHTS_NAME, PROVENANCE_NAME}
        return all(p.name in adapter_files or p.name.startswith(".") for p in path.iterdir())
    return name.startswith(".") and name.endswith(".tmp")


def recover_interrupted_force(out: Path) -> None:
    """Finish what a killed ``--force`` run left beside OUT (call with OUT's lock held).

    Such a run moved the previous output aside to ``.OUT.replaced.*/OUT``. If the new
    run finished (OUT has a manifest), the previous output is deleted; otherwise the
    previous output is put back in place of the unfinished one. Says which.
    """
    for aside in sorted(out.parent.glob(f".{out.name}.replaced.*")):
        previous = aside / out.name
        if not previous.is_dir():
            shutil.rmtree(aside, ignore_errors=True)
            continue
        if (out / MANIFEST_NAME).is_file():
            shutil.rmtree(aside)
            what = "deleted the output it replaced"
        else:
            if out.exists():
                shutil.rmtree(out)
            os.replace(previous, out)
            shutil.rmtree(aside)
            what = "put the previous output back"
        print(f"d2c cluster: {out}: an interrupted --force run was found; {what}", file=sys.stderr)


def _prepare_out(out: Path, settings: dict[str, Any], resume: bool, force: bool) -> str:
    """Check OUT against the flags; returns "new", "resume", "finished" or "replace".

    Nothing is written here: `_start_out` creates the run's state once every input
    has been checked.
    """
    saved = out / SEARCH_DIR / SETTINGS_NAME
    if not (out.exists() and any(out.iterdir())):
        return "new"
    if not is_cluster_output(out):
        raise CommandError(
            f"--out {out} is not empty and is not a previous `d2c cluster` output; "
            "refusing to touch it (choose another --out)"
        )
    if force:
        refuse_foreign(out, "cluster", is_ours)
        return "replace"
    if not resume:
        raise FileExistsError(
            f"{out} is not empty; pass --resume to continue it or --force to replace it"
        )
    finished = _finished_settings(out)
    if finished is not None:
        if finished != settings:
            raise CommandError(
                f"--resume: {out} holds a finished run with other settings "
                f"({_changed(finished, settings)}); pass --force to replace it"
            )
        return "finished"
    previous = read_json_object(saved)
    if previous is None:
        raise CommandError(
            f"--resume: {out} holds no unfinished run ({saved} is missing or not JSON); "
            "pass --force to start again"
        )
    if previous != settings:
        raise CommandError(
            f"--resume: settings differ from the saved run in {_changed(previous, settings)}"
        )
    for directory in (out, out / SEARCH_DIR, out / SEARCH_DIR / "ckpt"):
        _check_writable(directory)
    return "resume"


def _check_writable(directory: Path) -> None:
    """CommandError before any work if a run could not write in `directory`."""
    if not directory.is_dir():
        return
    try:
        fd, probe = tempfile.mkstemp(prefix=".d2c-write-test.", dir=directory)
    except OSError as err:
        raise CommandError(
            f"--resume: cannot write in {directory} ({err.strerror or err}); make it "
            "writable to continue the run, or copy it elsewhere and resume there"
        ) from None
    os.close(fd)
    os.unlink(probe)


def _start_out(out: Path, settings: dict[str, Any], state: str) -> Path | None:
    """Create OUT's run state. With "replace" the old output is moved aside first;
    returns where it went (put back if the run fails, deleted when it succeeds)."""
    aside = None
    if state == "replace":
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced.", dir=out.parent))
        os.replace(out, aside / out.name)
    if state != "resume":
        (out / SEARCH_DIR).mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / SEARCH_DIR / SETTINGS_NAME, settings)
    return aside


def _undo_out(out: Path, state: str, aside: Path | None, existed: bool) -> bool:
    """After a failed run: remove what it created and put a replaced output back.

    A search that saved checkpoints is kept for ``--resume``; returns whether it was.
    """
    if not out.is_dir():
        return False
    remove_leftovers(out)
    if aside is not None:  # --force: the new run failed, the old output comes back
        shutil.rmtree(out, ignore_errors=True)
        os.replace(aside / out.name, out)
        shutil.rmtree(aside, ignore_errors=True)
        return False
    checkpoints = out / SEARCH_DIR / "ckpt"
    if state == "resume" or (checkpoints.is_dir() and any(checkpoints.iterdir())):
        return True
    if existed:
        shutil.rmtree(out / SEARCH_DIR, ignore_errors=True)  # OUT was an empty directory
        for path in list(out.iterdir()):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    else:
        shutil.rmtree(out, ignore_errors=True)
    return False


def job_from_args(args: argparse.Namespace):
    """The `ClusterJob` the flags describe: the one place flags map to the pipeline.

    A flag whose name is a field of the method's class (``--init`` for
    `D2CClustering.init`, ...) sets that field. A data-free method reports its dev
    objective only when the task suite is given explicitly (``--tasks``).
    """
    from d2c_jax.cluster import METHODS
    from d2c_jax.cluster.objective import ObjectiveConfig
    from d2c_jax.commands.merge_args import merge_config_from_args
    from d2c_jax.merging import DEFAULT_MERGE
    from d2c_jax.pipeline import ClusterJob

    fields = dataclasses.fields(METHODS[args.method])
    tasks, _ = tasks_flag(args)
    return ClusterJob(
        budget=str(args.budget),
        method=args.method,
        settings={f.name: getattr(args, f.name) for f in fields if hasattr(args, f.name)},
        library=args.library,
        tasks=tasks,
        split=args.split,
        # Without --density, sparsifying merges use the engine default (the TIES paper's).
        merge=merge_config_from_args(args, default_density=DEFAULT_MERGE.density),
        seed=args.seed,
        base=args.base,
        scoring=ObjectiveConfig(
            score_deployed=args.score_deployed,
            candidates_per_call=args.candidates_per_call,
            devices=args.devices,
        ),
        report_dev_objective=tasks is not None,
    )


def tasks_flag(args: argparse.Namespace) -> tuple[Path | None, str]:
    """``(task-suite dir or None, the flag that named it)``; ``--examples`` is the
    deprecated name of ``--tasks``."""
    if args.tasks is not None and args.examples is not None:
        raise CommandError("--examples is the old name of --tasks; give only --tasks")
    if args.examples is not None:
        return args.examples, "--examples"
    return args.tasks, "--tasks"


def _start_distributed(args: argparse.Namespace) -> bool:
    """Initialise multi-host JAX if asked; whether this process writes OUT."""
    import jax

    if args.distributed:
        # Must precede every other JAX call of the process. CPU devices of different
        # processes need a collectives backend for the merge's all-reduces.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    return jax.process_index() == 0


OUT_STATES = ("new", "resume", "finished", "replace")


def _check_out_on_writer(args, inputs, settings, writer: bool) -> tuple[Path, str]:
    """Check OUT (`check_out`, `_prepare_out`) on the process that writes it;
    returns ``(out, state)``.

    In a multi-process run only process 0 looks at OUT and the others take its
    answer (one broadcast), so that all of them stop, or go on, together (otherwise
    a refusal or a finished run would end process 0 alone, and the others would
    crash in the search's first collective once gloo timed out).
    """
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    def check() -> tuple[Path, str]:
        out = check_out(args.out, kind="dir", inputs=inputs)
        recover_interrupted_force(out)
        return out, _prepare_out(out, settings, args.resume, args.force)

    if jax.process_count() == 1:
        return check()
    out, code, error = Path(args.out), -1, None
    if writer:
        try:
            out, state = check()
            code = OUT_STATES.index(state)
        except Exception as err:  # raised below, once the others know
            error = err
    code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
    if error is not None:
        raise error
    if code < 0:
        raise CommandError(f"--out {out}: refused by process 0 (see its error)")
    return out, OUT_STATES[code]


def run(args: argparse.Namespace) -> int:
    from d2c_jax import pipeline

    writer = _start_distributed(args)
    job = job_from_args(args)
    if pipeline.needs_objective(job):
        check_base(args.base)  # an unsupported model fails before any input is read
    _, flag = tasks_flag(args)
    library_dir = pipeline.library_dir(job)
    examples_dir = pipeline.tasks_dir(job)
    settings = _settings(args, job, library_dir, examples_dir)
    if job.tasks is not None and not Path(job.tasks).is_dir():
        raise CommandError(f"{flag} {job.tasks}: no such directory")
    base_path = None if str(args.base) == "default" else args.base
    inputs = [("--library", library_dir), (flag, examples_dir), ("--base", base_path)]
    with locked(Path(args.out), enabled=writer):
        return _run_locked(args, job, flag, settings, inputs, writer)


def _run_locked(args, job, flag: str, settings, inputs, writer: bool) -> int:
    """`run` once OUT's lock is held (by the process that writes OUT)."""
    import jax

    from d2c_jax import pipeline
    from d2c_jax.cluster import resolve_budget

    out, state = _check_out_on_writer(args, inputs, settings, writer)
    if writer and state == "resume" and jax.process_count() > 1:
        print(f"--resume: multi-process runs keep no checkpoints; {out}'s search starts again")
    # Stacked to the base's depth when the base will run: adapters may all skip the last
    # layers (layers_to_transform); data-free methods need no base.
    layers = base_num_layers(job.base) if pipeline.needs_objective(job) else None
    library = pipeline.load_library(job, num_layers=layers)
    k = resolve_budget(job.budget, library)
    if state == "finished":
        if writer:
            remove_leftovers(out)
            shutil.rmtree(out / SEARCH_DIR, ignore_errors=True)
            print(f"{out} holds a finished run with these settings; nothing to do")
        return 0
    objective = None
    if pipeline.needs_objective(job):
        check = lambda path: check_jsonl(path, flag)  # noqa: E731
        objective = pipeline.build_objective(job, library, check=check)
    if not writer:
        pipeline.fit(job, library, k, objective)
        return 0
    record = _write_run(out, settings, state, job, library, k, objective)
    dev = record.dev_objective
    print(
        f"{job.method}: K={k} of N={library.num_adapters}, dev objective (mean NLL) "
        f"{dev if dev is None else f'{dev:.4f}'}, {record.seconds:.1f} s -> {out}"
    )
    return 0


def _write_run(out: Path, settings, state: str, job, library, k: int, objective):
    """Fit and write OUT (process 0): run state, clusters, log, then the manifest,
    which marks the run finished; a failed run is undone (`_undo_out`)."""
    import jax

    from d2c_jax import pipeline
    from d2c_jax.cluster import output

    existed = out.exists()
    aside = _start_out(out, settings, state)
    try:
        if state == "resume":
            remove_leftovers(out)
        # Multi-host runs keep no checkpoints (see module docstring).
        single = jax.process_count() == 1
        checkpoint = out / SEARCH_DIR / "ckpt" if single else None
        record = pipeline.fit(job, library, k, objective, checkpoint_dir=checkpoint)
        output.save_clusters(out, library, record.assign, job.merge)
        tmp_log = out / ".log.jsonl.tmp"
        tmp_log.write_text("".join(json.dumps(entry) + "\n" for entry in record.log))
        os.replace(tmp_log, out / "log.jsonl")
        # The manifest marks the run as finished (a killed run with a manifest is
        # recognised by --resume); the search state goes after it.
        manifest = _manifest(settings, record, library, objective)
        write_json_atomic(out / MANIFEST_NAME, manifest)
    except BaseException as err:
        from d2c_jax.checkpoints import CheckpointError

        # An unusable checkpoint's own message says what to do; --resume would not.
        if _undo_out(out, state, aside, existed) and not isinstance(err, CheckpointError):
            print(
                f"d2c cluster: {out} keeps the search state: the same command with --resume "
                "continues it (once the cause below is fixed)",
                file=sys.stderr,
            )
        raise
    shutil.rmtree(out / SEARCH_DIR, ignore_errors=True)
    remove_leftovers(out)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return record


def _manifest(settings: dict[str, Any], record, library, objective) -> dict[str, Any]:
    k = record.k
    base = getattr(objective, "base", None)
    return {
        "settings": settings,
        # The same-base rule of `d2c evaluate` and `d2c export` compares by it.
        "base_fingerprint": getattr(base, "fingerprint", None),
        "k": k,
        "num_adapters": library.num_adapters,
        "method_settings": record.method_settings,
        "dev_objective": record.dev_objective,
        "search_objective": record.search_objective,
        "info": record.info,
        "seconds": record.seconds,
        "storage": {
            "merged_bytes_bf16": k * library.adapter_bytes(),
            "library_bytes_bf16": library.storage_bytes(),
            "fraction": k / library.num_adapters,
        },
        "versions": versions(),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("d2c-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out
