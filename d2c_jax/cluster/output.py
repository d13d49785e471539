"""The on-disk form of a clustering: merged PEFT adapters plus the task-to-cluster map.

A clustering directory (written by `d2c cluster` and `make demo`, read by
`d2c evaluate`) holds

  assignment.json   {task: cluster index}
  cluster_<k>/      the merged adapter of cluster k, a PEFT LoRA directory
                    (rank r, scale folded into the factors, so alpha = r), with
                    ``d2c_jax.json`` beside it naming its members and merge settings

`save_clusters` merges and writes them (each file atomically); `load_clusters`
reads them back and checks that they agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from d2c_jax.cluster.base import membership_mask
from d2c_jax.io import write_json_atomic
from d2c_jax.library import AdapterLibrary, LoraParams, save_peft_adapter
from kernels.merge import MergeConfig

ASSIGNMENT_NAME = "assignment.json"


def cluster_dir(out_dir: str | Path, cluster: int) -> Path:
    return Path(out_dir) / f"cluster_{cluster}"


def save_clusters(
    out_dir: str | Path, library: AdapterLibrary, assign: np.ndarray, merge_config: MergeConfig
) -> None:
    """Merge each cluster of ``assign [N]`` and write the clustering directory."""
    from d2c_jax.merging import merge

    assign = np.asarray(assign)
    k = int(assign.max()) + 1
    masks = membership_mask(assign, k)
    merged = merge(
        library.params, library.scale, masks.astype(np.float32), merge_config, names=library.names
    )
    for c in range(k):
        save_peft_adapter(
            cluster_dir(out_dir, c),
            jax.tree.map(lambda x, c=c: x[c], merged.params),
            rank=library.rank,
            alpha=library.rank,
            base_model=library.base_model,
            key_prefix=library.key_prefix,  # e.g. Gemma 3's language_model tower
            provenance={
                "members": [library.names[i] for i in np.flatnonzero(masks[c])],
                "merge": merge_config.to_dict(),
            },
            overwrite=True,
        )
    write_json_atomic(
        Path(out_dir) / ASSIGNMENT_NAME,
        {name: int(assign[i]) for i, name in enumerate(library.names)},
    )


def read_assignment(path: str | Path) -> dict[str, int]:
    """``{task: cluster}`` from a JSON file, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: assignment file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON object {{task: cluster}}")
    bad = {t: c for t, c in data.items() if not isinstance(c, int) or isinstance(c, bool) or c < 0}
    if bad:
        raise ValueError(f"{path}: clusters must be non-negative integers, got {bad}")
    return data


def load_clusters(
    out_dir: str | Path, num_layers: int | None = None
) -> tuple[dict[str, int], AdapterLibrary]:
    """Read a clustering directory: ``({task: cluster}, merged adapters)``.

    The merged adapters form an `AdapterLibrary` whose names are the directory
    names, so task t's adapter is ``merged.adapter(merged.index(f"cluster_{c}"))``
    with ``c = assignment[t]`` (see `task_adapters`). Errors name the directory when
    a cluster of the assignment has no adapter. ``num_layers``: the base model's depth
    (a clustering of adapters that all skip the last layers is stacked to it).
    """
    out_dir = Path(out_dir)
    assignment = read_assignment(out_dir / ASSIGNMENT_NAME)
    clusters = sorted(set(assignment.values()))
    missing = [c for c in clusters if not cluster_dir(out_dir, c).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{out_dir}: assignment.json names clusters {missing} but there is no "
            + ", ".join(f"cluster_{c}/" for c in missing)
        )
    dirs = [cluster_dir(out_dir, c) for c in clusters]
    return assignment, AdapterLibrary.load(dirs, num_layers=num_layers)


def task_adapters(
    assignment: dict[str, int], merged: AdapterLibrary
) -> dict[str, tuple[LoraParams, float]]:
    """``{task: (params, scale)}``: each task's cluster adapter from `load_clusters`.

    Tasks of one cluster share one adapter object (evaluation batches them together).
    """
    per_cluster = {
        c: merged.adapter(merged.index(cluster_dir("", c).name)) for c in set(assignment.values())
    }
    return {task: per_cluster[c] for task, c in assignment.items()}
