"""`d2c export`: the K merged adapters of a clustering as llama.cpp LoRA files for a device.

Output directory layout (`d2c_jax.export`):
  cluster_<k>.gguf   one llama.cpp LoRA adapter GGUF per cluster
  routing.json       task -> adapter file, base model file + sha256, storage bytes
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from d2c_jax.commands.checks import (
    CommandError,
    check_base,
    check_out,
    clustering_base,
    read_json_object,
    replaceable,
)
from d2c_jax.commands.outdir import locked, refuse_foreign


def add_parser(subparsers) -> None:
    from d2c_jax.export import EXPORT_FORMATS, GGUF_DTYPES

    parser = subparsers.add_parser(
        "export",
        help="export a clustering's merged adapters for a device (llama.cpp LoRA GGUF)",
        description=(
            "Write every cluster_<k>/ adapter of a `d2c cluster` output as a llama.cpp LoRA "
            "adapter GGUF (load it with llama.cpp's --lora beside the base model file) plus "
            "routing.json: which file serves which task, the base model file and its sha256, "
            "and the bytes of the K files against the library's N single adapters exported "
            "the same way. OUT appears only when complete; inputs are only read."
        ),
    )
    parser.add_argument(
        "--clusters",
        type=Path,
        required=True,
        help="a `d2c cluster` output directory (assignment.json + cluster_<k>/)",
    )
    parser.add_argument(
        "--format", choices=EXPORT_FORMATS, default="gguf", help="file format (llama.cpp)"
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to write")
    parser.add_argument(
        "--base",
        default=None,
        help="the llama.cpp base model file (.gguf) the device runs, or 'default' (the "
        "embedded SmolLM2 GGUF); default: the --base recorded in the clustering's "
        "manifest.json, else 'default'",
    )
    parser.add_argument(
        "--library",
        type=Path,
        default=None,
        help="the library the clusters came from, to report the storage of its single "
        "adapters; default: the one recorded in manifest.json (if it still exists)",
    )
    parser.add_argument(
        "--dtype",
        choices=GGUF_DTYPES,
        default="bf16",
        help="factor dtype in the files (bf16: lossless for our bf16 PEFT adapters)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace OUT if it is a previous `d2c export` output (anything else is refused)",
    )
    parser.set_defaults(func=run)


def is_export_output(out: Path) -> bool:
    from d2c_jax.export import ROUTING_NAME

    manifest = read_json_object(out / ROUTING_NAME)
    return manifest is not None and {"routes", "adapters", "storage"} <= set(manifest)


def _is_ours(path: Path) -> bool:
    from d2c_jax.export import ROUTING_NAME

    return path.name == ROUTING_NAME or re.fullmatch(r"cluster_\d+\.gguf", path.name) is not None


def _recorded(clusters: Path, key: str) -> str | None:
    manifest = read_json_object(clusters / "manifest.json")
    settings = manifest.get("settings") if manifest else None
    value = settings.get(key) if isinstance(settings, dict) else None
    return value if isinstance(value, str) and value not in ("", "None") else None


def _base_file(spec: str, flag: str) -> Path:
    from d2c_jax.models import default_gguf_path

    if spec == "default":
        return default_gguf_path()
    path = Path(spec).expanduser()
    if not path.exists():
        raise CommandError(f"{flag} {spec}: no such file")
    if not path.is_file() or path.suffix.lower() != ".gguf":
        raise CommandError(
            f"{flag} {spec} is not a .gguf file; a device export needs the llama.cpp base model "
            "file (give it with --base)"
        )
    return path


def _check_same_base(base: Path, clusters: Path, recorded, fingerprint) -> None:
    """The same-base rule (`d2c_jax.models.identity`) between the clustering's recorded
    base and the device's GGUF, which is fingerprinted only if the two differ."""
    from d2c_jax.models.identity import check_same_model, fingerprint_of

    if recorded is None and fingerprint is None:
        return
    same_file = recorded is not None and _base_file_or_none(recorded) == base.resolve()
    if same_file:
        return
    check_same_model(
        (base.name, str(base), fingerprint_of(str(base))),
        recorded,
        recorded_fingerprint=fingerprint,
        what=f"the clustering --clusters {clusters}",
    )


def _base_file_or_none(spec: str) -> Path | None:
    try:
        return _base_file(spec, "--base").resolve()
    except (CommandError, OSError):
        return None


def run(args: argparse.Namespace) -> int:
    check_base(args.base)  # a llama.cpp base we cannot run fails before OUT is locked
    with locked(Path(args.out)):  # one writer of OUT at a time
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """`run` with OUT's lock held."""
    from d2c_jax.cluster.output import ASSIGNMENT_NAME
    from d2c_jax.export import export_clusters

    clusters = Path(args.clusters)
    if not clusters.is_dir():
        raise CommandError(f"--clusters {clusters}: no such directory")
    if not (clusters / ASSIGNMENT_NAME).is_file():
        raise CommandError(
            f"--clusters {clusters}: no {ASSIGNMENT_NAME} (not a `d2c cluster` output)"
        )
    recorded, fingerprint = clustering_base(clusters)
    if args.base is not None:
        base = _base_file(args.base, "--base")
        _check_same_base(base, clusters, recorded, fingerprint)
    else:
        base = _base_file(
            recorded or "default", f"--base (recorded in {clusters / 'manifest.json'})"
        )
    library = args.library
    if library is not None and not Path(library).is_dir():
        raise CommandError(f"--library {library}: no such directory")
    if library is None:
        recorded = _recorded(clusters, "library")
        library = Path(recorded) if recorded and Path(recorded).is_dir() else None
    out = check_out(
        args.out,
        kind="dir",
        inputs=[("--clusters", clusters), ("--base", base), ("--library", library)],
    )
    force = replaceable(out, command="export", is_output=is_export_output, force=args.force)
    if force:
        refuse_foreign(out, "export", _is_ours)
    manifest = export_clusters(
        clusters, out, base, library_dir=library, dtype=args.dtype, overwrite=force
    )
    storage = manifest["storage"]
    kib = storage["adapters_bytes"] / 1024
    line = f"{storage['num_adapters']} adapters, {kib:.1f} KiB ({args.dtype})"
    if storage["single_adapters_bytes"]:
        line += (
            f" vs {storage['single_adapters_bytes'] / 1024:.1f} KiB for the "
            f"{storage['num_single_adapters']} single adapters ({storage['fraction']:.1%})"
        )
    print(f"exported {line} -> {out} (base {manifest['base_model']['file_name']})")
    return 0
