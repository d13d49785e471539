"""`d2c evaluate`: held-out scores of a clustering, each task under its cluster's adapter.

    d2c evaluate --base default --assignment OUT_DIR --out scores.json
    d2c evaluate --assignment assignment.json --library LIB --merge ties --density 0.2 ...

``--assignment`` is either a clustering directory (`d2c cluster`'s output: its
saved ``cluster_<k>/`` adapters are evaluated exactly as deployed) or an
``assignment.json`` file ``{task: cluster}``, whose clusters are then merged from
``--library`` with the merge flags. Every task is evaluated on its own split of
the task suite (``--tasks``, default the built-in suite) by greedy generation, with
the metrics of `d2c_jax.evaluate` (exact match, chrF, score = (100 EM + chrF)/2).
The relative score divides each task's score by its single adapter's score from
``--library``; single-adapter results are cached outside every input, in
``$D2C_JAX_CACHE`` or ``$XDG_CACHE_HOME/d2c-jax`` (default ``~/.cache/d2c-jax``) under
``eval/<fingerprint of library, base and settings>/single.json``, so that later
evaluations of the same library reuse them (an adapter whose files changed is
evaluated again). The library itself is never written to.

Writes ``--out`` (JSON): settings, per-task metrics with each task's cluster, the
average, the single adapters' average and the relative score.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import warnings
from pathlib import Path

from d2c_jax.commands.checks import (
    CommandError,
    base_num_layers,
    check_base,
    check_jsonl,
    check_out,
    clustering_base,
    positive_int,
    read_json_object,
    replaceable,
)
from d2c_jax.commands.merge_args import add_merge_arguments
from d2c_jax.io import write_json_atomic
from d2c_jax.merging import DEFAULT_MERGE

SINGLE_CACHE_NAME = "single.json"


def cache_root() -> Path:
    """The user's cache directory of d2c-jax: ``$D2C_JAX_CACHE``, else
    ``$XDG_CACHE_HOME/d2c-jax``, else ``~/.cache/d2c-jax``."""
    explicit = os.environ.get("D2C_JAX_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "d2c-jax"


def single_cache(library_dir: Path, base, args: argparse.Namespace) -> tuple[Path, dict]:
    """``(path, identity)`` of the single-adapter cache of a library, base and settings.

    The path is ``cache_root()/eval/<fingerprint>/single.json``, the fingerprint a hash
    of the library's resolved path, the base model's weights fingerprint, the split,
    the task suite and the generation settings; the identity (stored in the file and
    checked on reading) names the library and the base.
    """
    from d2c_jax.tasks import suite_dir

    tasks = Path(args.tasks or suite_dir()).resolve()
    identity = {
        "library": str(Path(library_dir).resolve()),
        "base": getattr(base, "fingerprint", None) or base.name,
    }
    key = identity | {
        "split": args.split,
        "tasks": "built-in" if tasks == Path(suite_dir()).resolve() else str(tasks),
        "max_new_tokens": args.max_new_tokens,
        "limit": args.limit,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "eval" / digest / SINGLE_CACHE_NAME, identity


def adapter_stamps(library_dir: Path, tasks) -> dict[str, str]:
    """``{task: hash of its adapter_config.json and weights}``: a retrained adapter gets
    a new stamp, so its cached single-adapter result is not reused."""
    from d2c_jax.library import CONFIG_NAME, WEIGHTS_NAME

    library_dir = Path(library_dir)
    stamps = {}
    for task in tasks:
        adapter_dir = library_dir if (library_dir / CONFIG_NAME).is_file() else library_dir / task
        digest = hashlib.sha256()
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            digest.update(name.encode())
            digest.update((adapter_dir / name).read_bytes())
        stamps[task] = digest.hexdigest()[:16]
    return stamps


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a clustering's merged adapters on held-out test examples",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--base",
        default="default",
        metavar="{default|HF_DIR|FILE.gguf}",
        help="base model (default: the embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--assignment",
        type=Path,
        required=True,
        metavar="OUT_DIR|FILE.json",
        help="a `d2c cluster` output directory, or an assignment.json {task: cluster}",
    )
    parser.add_argument(
        "--library",
        type=Path,
        default=None,
        help="the adapter library: single adapters for the relative score, and the "
        "adapters to merge when --assignment is a file (default: the embedded library)",
    )
    parser.add_argument(
        "--tasks",
        type=Path,
        default=None,
        help="task-suite directory with <task>/<split>.jsonl (default: the built-in suite)",
    )
    parser.add_argument(
        "--split",
        default="test",
        choices=("test", "train"),
        help="split to evaluate (default: test); the dev split is what clustering fits, "
        "so scores on it are not held out and it cannot be evaluated",
    )
    parser.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="evaluate the first N examples of each task (default: all)",
    )
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=32, help="greedy decoding length limit"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=50, help="prompts per generate call"
    )
    parser.add_argument(
        "--no-relative",
        action="store_true",
        help="skip the single adapters (no relative score)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="JSON file to write; an existing file is replaced only if it is a previous "
        "`d2c evaluate` output",
    )
    add_merge_arguments(parser, method_flag="--merge")
    parser.set_defaults(func=run)


def resolve_adapters(args: argparse.Namespace, base, library):
    """``({task: cluster}, {task: (params, scale)}, how)`` from --assignment."""
    import numpy as np

    from d2c_jax.adapters import check_adapter_for_base
    from d2c_jax.cluster.output import (
        ASSIGNMENT_NAME,
        load_clusters,
        read_assignment,
        task_adapters,
    )
    from d2c_jax.commands.merge_args import merge_config_from_args
    from d2c_jax.evaluate import merged_task_adapters
    from d2c_jax.models.identity import BaseModelWarning, check_same_base

    source: Path = args.assignment
    if source.is_dir():
        _refuse_duplicate_tasks(source / ASSIGNMENT_NAME)
        assignment, merged = load_clusters(source, num_layers=base.config.num_layers)
        recorded, fingerprint = clustering_base(source)
        by_weights = check_same_base(
            base,
            recorded,
            recorded_fingerprint=fingerprint,
            what=f"the clustering --assignment {source}",
        )
        with warnings.catch_warnings():
            if by_weights:  # the merged adapters' recorded name adds nothing to the weights
                warnings.simplefilter("ignore", BaseModelWarning)
            check_adapter_for_base(base, merged)
        return (
            assignment,
            task_adapters(assignment, merged),
            {"adapters": f"saved cluster adapters in {source}"},
        )
    if not source.exists():
        raise FileNotFoundError(f"--assignment {source}: no such file or directory")
    _refuse_duplicate_tasks(source)
    assignment = read_assignment(source)
    if library is None:
        raise ValueError(
            f"--assignment {source} is a file: --library is needed to merge its clusters "
            f"(or pass a clustering directory holding {ASSIGNMENT_NAME} and cluster_<k>/)"
        )
    missing = sorted(set(assignment) - set(library.names))
    if missing:
        raise ValueError(f"--assignment {source}: tasks {missing} are not in the library")
    subset = library.subset([library.index(t) for t in assignment])
    clusters = sorted(set(assignment.values()))
    # Renumber so that clusters are 0..K-1 whatever indices the file uses.
    assign = np.asarray([clusters.index(assignment[t]) for t in subset.names])
    merge_config = merge_config_from_args(args, default_density=DEFAULT_MERGE.density)
    adapters = merged_task_adapters(subset, assign, merge_config)
    return (
        assignment,
        adapters,
        {"adapters": "merged from --library", "merge": merge_config.to_dict()},
    )


def _refuse_duplicate_tasks(path: Path) -> None:
    """CommandError if a task appears twice in an assignment file (JSON keeps the last
    one silently)."""

    def pairs(items):
        keys = [k for k, _ in items]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise CommandError(f"--assignment {path}: task {twice[0]!r} appears more than once")
        return dict(items)

    try:
        json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=pairs)
    except CommandError:
        raise
    except (OSError, ValueError):
        pass  # read_assignment reports unreadable or malformed files in its own words


def run(args: argparse.Namespace) -> int:
    from d2c_jax.adapters import check_adapter_for_base
    from d2c_jax.evaluate import (
        average_metrics,
        evaluate_adapters,
        evaluate_cached,
        relative_score,
        relative_score_details,
    )
    from d2c_jax.library import AdapterLibrary, embedded_library_dir
    from d2c_jax.models import load_base
    from d2c_jax.tasks import load_split, suite_dir

    check_base(args.base)  # an unsupported model fails before any input is read
    if not args.assignment.exists():
        raise CommandError(f"--assignment {args.assignment}: no such file or directory")
    if args.tasks is not None and not args.tasks.is_dir():
        raise CommandError(f"--tasks {args.tasks}: no such directory")
    needs_library = not args.no_relative or not args.assignment.is_dir()
    library_dir = (args.library or embedded_library_dir()) if needs_library else args.library
    check_out(
        args.out,
        kind="file",
        inputs=[
            ("--assignment", args.assignment),
            ("--library", library_dir),
            ("--tasks", args.tasks or suite_dir()),
            ("--base", None if args.base == "default" else args.base),
        ],
    )
    replaceable(args.out, command="evaluate", is_output=is_evaluate_output, force=None)
    start = time.perf_counter()
    library = None
    if needs_library:
        # Stacked to the base's depth: adapters may all skip the last layers.
        library = AdapterLibrary.load(library_dir, num_layers=base_num_layers(args.base))
    base = load_base(args.base)
    if library is not None:
        check_adapter_for_base(base, library)
    assignment, adapters, how = resolve_adapters(args, base, library)
    # Fail on a missing split before minutes of generation, naming the task.
    for task in assignment:
        check_jsonl(Path(args.tasks or suite_dir()) / task / f"{args.split}.jsonl", "--tasks")
        load_split(args.tasks, task, args.split)
    settings = dict(
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit
    )
    scores = evaluate_adapters(base, adapters, args.tasks, args.split, **settings)
    report = {
        "command": "d2c evaluate",
        "base": args.base,
        "assignment": str(args.assignment),
        "split": args.split,
        "tasks_root": None if args.tasks is None else str(args.tasks),
        **settings,
        **how,
        "num_clusters": len(set(assignment.values())),
        "per_task": {t: {"cluster": assignment[t], **scores[t]} for t in assignment},
        "average": average_metrics(scores),
    }
    if not args.no_relative:
        missing = sorted(set(assignment) - set(library.names))
        if missing:
            raise ValueError(
                f"tasks {missing} have no single adapter in {library_dir} for the relative "
                "score; pass the right --library or --no-relative"
            )
        cache_path, identity = single_cache(library_dir, base, args)
        single = evaluate_cached(
            base,
            {t: library.adapter(library.index(t)) for t in assignment},
            args.tasks,
            args.split,
            cache_path,
            identity=identity,
            stamps=adapter_stamps(library_dir, assignment),
            **settings,
        )
        report["single_average"] = average_metrics(single)
        report["relative_score"] = relative_score(scores, single)
        report["relative_score_details"] = relative_score_details(scores, single)
    report["seconds"] = time.perf_counter() - start
    write_json_atomic(args.out, report)

    print(f"{'task':<16} {'cluster':>7} {'exact':>7} {'chrF':>6} {'score':>6}")
    for task, row in report["per_task"].items():
        print(
            f"{task:<16} {row['cluster']:>7} {100 * row['exact_match']:>6.1f}% "
            f"{row['chrf']:>6.1f} {row['score']:>6.1f}"
        )
    avg = report["average"]
    line = (
        f"average over {len(assignment)} tasks: score {avg['score']:.1f}, "
        f"exact {100 * avg['exact_match']:.1f}%"
    )
    if "relative_score" in report:
        line += (
            f"; single adapters {report['single_average']['score']:.1f}; "
            f"relative score {report['relative_score']:.3f}"
        )
    print(f"{line}\n-> {args.out}")
    return 0


def is_evaluate_output(path: Path) -> bool:
    """A JSON file `d2c evaluate` wrote."""
    record = read_json_object(path)
    return record is not None and record.get("command") == "d2c evaluate"
