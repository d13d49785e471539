"""Shared helpers of the benchmarks: machine facts, versions, timing, result files.

Every benchmark writes one JSON file under ``benchmarks/results/`` through
`write_result`, which records the machine (CPU model, cores, memory, load),
package versions and the exact command line next to the numbers, and writes
atomically (a killed run never leaves a truncated result).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_PACKAGES = ("jax", "jaxlib", "flax", "numpy", "torch", "peft", "transformers")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, memory and the load average when the benchmark ran."""
    cores_usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    memory = _memory_bytes()
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": cores_usable,
        "memory_gb": round(memory / 1e9, 1) if memory else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def versions(packages: Iterable[str] = DEFAULT_PACKAGES) -> dict[str, str | None]:
    """Installed versions of `packages` (None when not installed)."""
    from d2c_jax.io import versions as installed

    return installed(packages, missing=None)


def time_calls(fn: Callable[[], Any], *, repeat: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Wall-clock seconds of ``fn()`` (which must block until its work is done).

    Returns ``{"median": s, "min": s, "runs": [s, ...], "warmup": warmup}``; the
    warm-up calls (compilation, caches) are not timed.
    """
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return {"median": statistics.median(runs), "min": min(runs), "runs": runs, "warmup": warmup}


def memory_bandwidth(nbytes: int = 256 * 2**20, repeat: int = 5) -> dict[str, Any]:
    """Memory bandwidth from a plain NumPy copy of `nbytes` (float32).

    ``gb_per_s`` counts bytes read plus bytes written (2 * nbytes per copy), the
    usual convention for copy bandwidth; ``copy_gb_per_s`` is nbytes per second.
    """
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    timing = time_calls(lambda: np.copyto(dst, src), repeat=repeat, warmup=1)
    best = timing["min"]
    return {
        "bytes": src.nbytes,
        "seconds_min": best,
        "gb_per_s": 2 * src.nbytes / best / 1e9,
        "copy_gb_per_s": src.nbytes / best / 1e9,
    }


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran this process, shell-quoted."""
    argv = sys.argv if argv is None else argv
    return shlex.join([Path(sys.executable).name, *argv])


def write_result(
    name: str,
    payload: dict[str, Any],
    *,
    packages: Iterable[str] = DEFAULT_PACKAGES,
    results_dir: Path = RESULTS_DIR,
) -> Path:
    """Write ``results_dir/<name>.json`` atomically with machine, versions and command.

    Returns the path written. `payload` keys are stored next to ``benchmark``,
    ``command``, ``timestamp``, ``machine`` and ``versions``.
    """
    record = {
        "benchmark": name,
        "command": command_line(),
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(packages),
        **payload,
    }
    from d2c_jax.io import write_text_atomic

    return write_text_atomic(results_dir / f"{name}.json", json.dumps(record, indent=2) + "\n")


RESULTS_DOC = Path(__file__).resolve().parent.parent / "docs" / "RESULTS.md"
RESULTS_DOC_HEADER = """# d2c-jax results

Every section below is written by the command named in its heading, from the result
files under `benchmarks/results/` (machine, versions, load average and command are in
those files). Do not edit by hand: rerun the command.
"""


def write_results_section(name: str, command: str, body: str, doc: Path = RESULTS_DOC) -> None:
    """Replace (or append) the section `name` of docs/RESULTS.md, atomically.

    A section runs from its marker ``<!-- section: name -->`` to the next marker, so
    each benchmark rewrites only its own part and the order of first writing is kept.
    """
    from d2c_jax.io import write_text_atomic

    text = doc.read_text() if doc.is_file() else RESULTS_DOC_HEADER
    marker = f"<!-- section: {name} -->"
    section = f"{marker}\n## {name}\n\n`{command}`\n\n{body.strip()}\n\n"
    if marker in text:
        head, rest = text.split(marker, 1)
        nxt = rest.find("<!-- section: ")
        text = head + section + (rest[nxt:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    write_text_atomic(doc, text.rstrip("\n") + "\n")
