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
(docs/ARCHITECTURE.md, "Scaling out"); process 0 writes OUT, and such runs keep no
checkpoints (orbax would need every process to share OUT).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from d2c_jax.library import write_json_atomic

SETTINGS_NAME = "settings.json"
SEARCH_DIR = ".search"


def add_parser(subparsers) -> None:
    from d2c_jax.cluster import METHODS, D2CClustering
    from d2c_jax.cluster.d2c import INITS, MODES, TASK_LOSSES
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
        "--examples",
        type=Path,
        default=None,
        help="examples dir with <task>/<split>.jsonl (default: the built-in task suite); "
        "required by d2c, optional for the others (then their dev objective is reported)",
    )
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
        type=int,
        default=d2c.max_iters,
        help=f"d2c: at most this many iterations (default: {d2c.max_iters})",
    )
    parser.add_argument(
        "--tol", type=float, default=d2c.tol, help="minimum objective improvement of a move"
    )
    parser.add_argument(
        "--task-loss",
        choices=tuple(TASK_LOSSES),
        default=d2c.task_loss,
        help="d2c: per-task loss the objective averages: nll (mean dev NLL, D2C as "
        "defined) or likelihood (1 - exp(-nll), bounded: a broken task cannot outweigh "
        "working ones)",
    )
    parser.add_argument(
        "--score-deployed",
        action="store_true",
        help="score candidates after rank-r truncation (exact, slower)",
    )
    parser.add_argument(
        "--candidates-per-call", type=int, default=8, help="memory bound of a scoring call"
    )
    parser.add_argument(
        "--screen-top",
        type=int,
        default=0,
        metavar="M",
        help="d2c best mode: score exactly only the M moves with the best first-order estimate "
        "(plus a random sample that checks the estimate's ranking); 0 = off (default)",
    )
    parser.add_argument(
        "--screen-sample", type=int, default=16, help="moves scored at random to check screening"
    )
    parser.add_argument(
        "--screen-min-corr",
        type=float,
        default=0.5,
        help="below this rank correlation on the sample an iteration scores every move exactly",
    )
    parser.add_argument(
        "--devices",
        type=int,
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
    multi.add_argument("--num-processes", type=int, default=None)
    multi.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true", help="continue an unfinished run")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT")
    add_merge_arguments(parser, method_flag="--merge")
    # --seed (from the merge flags) seeds the clustering too: random and k-means++
    # initialisations, sweep order, and DARE's masks.
    parser.set_defaults(func=run)


def _settings(args: argparse.Namespace, merge_config) -> dict[str, Any]:
    return {
        "base": str(args.base),
        "library": str(args.library),
        "examples": str(args.examples),
        "split": args.split,
        "budget": str(args.budget),
        "method": args.method,
        "init": args.init,
        "mode": args.mode,
        "max_iters": args.max_iters,
        "tol": args.tol,
        "task_loss": args.task_loss,
        "score_deployed": args.score_deployed,
        "screen_top": args.screen_top,
        "screen_sample": args.screen_sample,
        "screen_min_corr": args.screen_min_corr,
        "seed": args.seed,
        "merge": merge_config.to_dict(),
    }


def _prepare_out(out: Path, settings: dict[str, Any], resume: bool, force: bool) -> None:
    saved = out / SEARCH_DIR / SETTINGS_NAME
    if out.exists() and any(out.iterdir()):
        if force:
            shutil.rmtree(out)
        elif resume:
            if not saved.is_file():
                raise ValueError(f"--resume: {out} holds no unfinished run ({saved} is missing)")
            previous = json.loads(saved.read_text())
            if previous != settings:
                changed = sorted(k for k in settings if previous.get(k) != settings[k])
                raise ValueError(f"--resume: settings differ from the saved run in {changed}")
            return
        else:
            raise FileExistsError(
                f"{out} is not empty; pass --resume to continue it or --force to replace it"
            )
    (out / SEARCH_DIR).mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved, settings)


def run(args: argparse.Namespace) -> int:
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
    writer = jax.process_index() == 0
    from d2c_jax import cluster as clustering
    from d2c_jax import tasks as task_suite
    from d2c_jax.cluster.objective import DevObjective, ObjectiveConfig
    from d2c_jax.cluster.output import save_clusters
    from d2c_jax.commands.merge_args import merge_config_from_args
    from d2c_jax.examples import read_examples
    from d2c_jax.library import AdapterLibrary, embedded_library_dir
    from d2c_jax.merging import DEFAULT_MERGE
    from d2c_jax.models import load_base

    # Without --density, sparsifying merges use the engine default (the TIES paper's).
    merge_config = merge_config_from_args(args, default_density=DEFAULT_MERGE.density)
    library_dir = args.library or embedded_library_dir()
    examples_dir = args.examples or task_suite.suite_dir()
    args.library, args.examples = library_dir, examples_dir
    settings = _settings(args, merge_config)
    library = AdapterLibrary.load(library_dir)
    k = clustering.resolve_budget(args.budget, library)
    if writer:
        _prepare_out(args.out, settings, args.resume, args.force)

    wants_objective = args.method == "d2c" or args.examples is not None
    objective = None
    base = None
    if wants_objective:
        examples = {}
        for name in library.names:
            path = Path(examples_dir) / name / f"{args.split}.jsonl"
            if path.is_file():
                examples[name] = read_examples(path)
        base = load_base(args.base)
        if library.base_model not in (None, base.name):
            raise ValueError(
                f"{library_dir}: adapters are for {library.base_model!r}, base is {base.name!r}"
            )
        objective = DevObjective(
            base,
            library,
            examples,
            merge_config,
            ObjectiveConfig(
                score_deployed=args.score_deployed,
                candidates_per_call=args.candidates_per_call,
                devices=args.devices,
            ),
        )

    start = time.perf_counter()
    if args.method == "d2c":
        method = clustering.D2CClustering(
            init=args.init,
            mode=args.mode,
            max_iters=args.max_iters,
            tol=args.tol,
            task_loss=args.task_loss,
            screen_top=args.screen_top,
            screen_sample=args.screen_sample,
            screen_min_corr=args.screen_min_corr,
        )
        single = jax.process_count() == 1
        result = method.fit(
            library,
            k,
            args.seed,
            objective,
            checkpoint_dir=args.out / SEARCH_DIR / "ckpt" if single else None,
        )
    else:
        method = clustering.METHODS[args.method]()
        result = method.fit(library, k, args.seed)
    seconds = time.perf_counter() - start
    dev_objective = result.objective
    if dev_objective is None and objective is not None:
        masks = clustering.membership_mask(result.assign, k)
        dev_objective = float(objective.task_losses(masks).sum() / library.num_adapters)

    if not writer:
        return 0
    save_clusters(args.out, library, result.assign, merge_config)
    tmp_log = args.out / ".log.jsonl.tmp"
    tmp_log.write_text("".join(json.dumps(entry) + "\n" for entry in result.log))
    os.replace(tmp_log, args.out / "log.jsonl")
    manifest = {
        "settings": settings,
        "k": k,
        "num_adapters": library.num_adapters,
        "method_settings": dataclasses.asdict(method),
        "dev_objective": dev_objective,
        "info": result.info,
        "seconds": seconds,
        "storage": {
            "merged_bytes_bf16": k * library.adapter_bytes(),
            "library_bytes_bf16": library.storage_bytes(),
            "fraction": k / library.num_adapters,
        },
        "versions": versions(),
    }
    write_json_atomic(args.out / "manifest.json", manifest)
    shutil.rmtree(args.out / SEARCH_DIR, ignore_errors=True)
    print(
        f"{args.method}: K={k} of N={library.num_adapters}, dev objective "
        f"{dev_objective if dev_objective is None else f'{dev_objective:.4f}'}, "
        f"{seconds:.1f} s -> {args.out}"
    )
    return 0


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("d2c-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out
