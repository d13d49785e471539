"""`d2c merge`: merge several PEFT LoRA adapters into one PEFT adapter directory."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from d2c_jax.commands.checks import check_out, read_json_object, replaceable
from d2c_jax.commands.merge_args import add_merge_arguments, merge_config_from_args
from d2c_jax.commands.outdir import locked, refuse_foreign

DTYPES = ("float32", "bfloat16", "float16")


def add_parser(subparsers) -> None:
    from d2c_jax.merging import TRUNCATIONS

    parser = subparsers.add_parser(
        "merge",
        help="merge PEFT LoRA adapters into one (ties, linear, dare, ...)",
        description=(
            "Merge N PEFT LoRA adapters of one base model into a single rank-r PEFT adapter "
            "directory that peft.PeftModel.from_pretrained loads. The output is written "
            "atomically (into a temporary directory next to OUT, renamed on success) and "
            "records the merge settings under 'd2c_jax' in its adapter_config.json. The merged "
            "adapter has the inputs' rank and scale 1 (lora_alpha = r)."
        ),
    )
    parser.add_argument(
        "--adapters",
        nargs="+",
        required=True,
        metavar="DIR",
        help="PEFT adapter directories, or one library directory holding one adapter per "
        "subdirectory (library order: sorted names)",
    )
    parser.add_argument("--out", type=Path, required=True, help="merged adapter directory to write")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="dtype of the written factors (default: %(default)s)",
    )
    parser.add_argument(
        "--truncation",
        choices=sorted(TRUNCATIONS),
        default="exact",
        help="--space delta: how the merged delta returns to rank r: exact (top-r singular "
        "subspace) or randomized (range finder with power iterations: much faster, residual "
        "typically within 1%% of exact) (default: %(default)s)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace OUT if it is a previous `d2c merge` output (anything else is refused)",
    )
    add_merge_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with locked(Path(args.out)):  # one writer of OUT at a time
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """`run` with OUT's lock held."""
    import jax.numpy as jnp

    from d2c_jax.io import atomic_directory
    from d2c_jax.library import AdapterLibrary, write_peft_files
    from d2c_jax.merging import merge

    config = merge_config_from_args(args)
    out = check_out(args.out, kind="dir", inputs=[("--adapters", p) for p in args.adapters])
    force = replaceable(out, command="merge", is_output=is_merge_output, force=args.force)
    if force:
        refuse_foreign(out, "merge", _is_ours)
    start = time.perf_counter()
    source = args.adapters[0] if len(args.adapters) == 1 else args.adapters
    library = AdapterLibrary.load(source)
    n = library.num_adapters
    if config.weights is not None and len(config.weights) != n:
        raise ValueError(f"--weights has {len(config.weights)} values for {n} adapters")
    if config.space == "factor" and len(set(library.ranks)) > 1:
        raise ValueError(
            f"--space factor needs adapters of one rank (PEFT refuses otherwise), got ranks "
            f"{dict(zip(library.names, library.ranks, strict=True))}; use --space delta"
        )
    merged = merge(
        library.params,
        library.scale,
        jnp.ones((1, n)),
        config,
        names=library.names,
        truncation=args.truncation,
    )
    one = {m: {f: x[0] for f, x in factors.items()} for m, factors in merged.params.items()}
    record = {
        "merge": config.to_dict(),
        "truncation": args.truncation if config.space == "delta" else None,
        "sources": list(library.names),
        "source_ranks": list(library.ranks),
        "source_scales": [float(s) for s in library.scale],
    }
    with atomic_directory(out, overwrite=force) as tmp:
        write_peft_files(
            tmp,
            one,
            rank=library.rank,
            alpha=library.rank,  # scale 1: the merge folds every scale into the factors
            base_model=library.base_model,
            key_prefix=library.key_prefix,  # e.g. Gemma 3's language_model tower
            dtype=getattr(jnp, args.dtype),
            provenance=record,
        )
    seconds = time.perf_counter() - start
    density = "" if config.density is None else f", density {config.density}"
    print(
        f"merged {n} adapters ({', '.join(library.names)}) with {config.method} in "
        f"{config.space} space{density}, divisor {config.divisor}, into {out} "
        f"(rank {library.rank}, {args.dtype}) in {seconds:.1f} s"
    )
    return 0


def is_merge_output(path: Path) -> bool:
    """A directory `d2c merge` wrote: PEFT files plus its provenance record."""
    from d2c_jax.library import CONFIG_NAME, PROVENANCE_NAME

    record = read_json_object(path / PROVENANCE_NAME)
    return (
        path.is_dir()
        and (path / CONFIG_NAME).is_file()
        and record is not None
        and {"merge", "sources"} <= set(record)
    )


def _is_ours(path: Path) -> bool:
    from d2c_jax.library import CONFIG_NAME, PROVENANCE_NAME, WEIGHTS_NAME

    return path.name in (CONFIG_NAME, WEIGHTS_NAME, PROVENANCE_NAME)
