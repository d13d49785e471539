"""`d2c cluster --distributed` with two real processes gives what one process gives.

Two local processes join with `jax.distributed` (coordinator on 127.0.0.1, a free
port), each with one CPU device, so the candidate mesh spans two processes and the
merge's collectives go through gloo. They run `d2c cluster --method d2c` (one best-mode
iteration, which moves an adapter) on the tiny model and the random library of
`tests/test_cli_cluster.py`; the test checks that they write the same
assignment.json, merge manifests and merged adapters (float tolerance) as the same
command run by one process.

``--resume`` in a multi-process run (OUT in a directory both processes see, though
only process 0 reads or writes it): a run killed mid-search leaves only its settings
(such runs keep no checkpoints), and ``--resume`` runs the search again to the same
result; ``--resume`` of the finished run does nothing on every process; without
``--resume`` or ``--force`` every process refuses OUT with a one-line error (process 0
says why, the others that process 0 refused). Process 0 decides and broadcasts, so
no process is left waiting in a collective.

Skipped, with that reason, when a two-process all-gather probe fails, i.e. this
jaxlib has no gloo CPU collectives.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import numpy as np
import pytest

from d2c_jax.library import AdapterLibrary
from tests.test_cli_cluster import cluster_args, tiny_setup  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600
PROCESSES = 2
K = 3  # the budget of cluster_args, 25% of 12 adapters
SEARCH = ("--method", "d2c", "--mode", "best", "--max-iters", "1", "--task-loss", "nll")


def child_env() -> dict[str, str]:
    """One CPU device per process (not whatever the caller's XLA_FLAGS give)."""
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "PYTHONPATH": str(ROOT),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def distributed_flags(port: int, process: int) -> list[str]:
    return [
        "--distributed",
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        str(PROCESSES),
        "--process-id",
        str(process),
    ]


def start(commands: list[list[str]]) -> list[tuple[subprocess.Popen, IO, IO]]:
    """Start one process per command, each with its stdout and stderr in a temp file
    (pipes read one process at a time could fill and stall a process's collectives)."""
    procs = []
    for command in commands:
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(command, cwd=ROOT, env=child_env(), stdout=out, stderr=err)
        procs.append((proc, out, err))
    return procs


def start_cli(args: list[str]) -> list[tuple[subprocess.Popen, IO, IO]]:
    """`d2c ARGS --distributed ...` as processes 0 and 1 of one run."""
    port = free_port()
    command = [sys.executable, "-m", "d2c_jax.cli", *args]
    return start([[*command, *distributed_flags(port, i)] for i in range(PROCESSES)])


def finish(procs, timeout: float = TIMEOUT) -> list[tuple[int, str, str]]:
    """``(returncode, stdout, stderr)`` of each process (all killed on a timeout)."""
    deadline = time.monotonic() + timeout
    try:
        for proc, _, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        kill(procs)
    results = []
    for proc, *logs in procs:
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read())
            log.close()
        results.append((proc.returncode, *texts))
    return results


def kill(procs) -> None:
    for proc, _, _ in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    for proc, _, _ in procs:
        proc.wait()


def report(results) -> str:
    return "\n".join(
        f"--- process {i}: exit {rc}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-4000:]}"
        for i, (rc, out, err) in enumerate(results)
    )


def run_processes(args: list[str], expect: int = 0) -> list[tuple[int, str, str]]:
    results = finish(start_cli(args))
    assert [rc for rc, _, _ in results] == [expect] * PROCESSES, report(results)
    return results


PROBE = """
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize("127.0.0.1:{port}", {n}, {i})
from jax.experimental import multihost_utils
import numpy as np
seen = multihost_utils.process_allgather(np.int32(jax.process_index()))
assert seen.tolist() == list(range({n})) and jax.device_count() == {n}, (seen, jax.devices())
"""


@pytest.fixture(scope="module")
def gloo():
    """Skip the module unless two processes can all-gather over gloo CPU collectives."""
    port = free_port()
    probes = [PROBE.format(port=port, n=PROCESSES, i=i) for i in range(PROCESSES)]
    try:
        results = finish(start([[sys.executable, "-c", probe] for probe in probes]), 120)
    except subprocess.TimeoutExpired:
        pytest.skip("gloo CPU collectives are not available in this jaxlib (probe timed out)")
    if any(rc != 0 for rc, _, _ in results):
        last = next(err for rc, _, err in results if rc != 0).strip().splitlines()[-1:]
        pytest.skip(
            "gloo CPU collectives are not available in this jaxlib (a two-process "
            f"all-gather probe failed: {' '.join(last)})"
        )


@pytest.fixture(scope="module")
def reference(gloo, tiny_setup, tmp_path_factory):  # noqa: F811
    """The one-process run of the command."""
    root, hf_dir = tiny_setup
    out = tmp_path_factory.mktemp("one_process") / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "d2c_jax.cli", *cluster_args(root, hf_dir, out, *SEARCH)],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["moves"], "the search should move an adapter, so the test sees a search"
    return out


def assert_same_output(out: Path, expected: Path) -> None:
    assert (out / "assignment.json").read_text() == (expected / "assignment.json").read_text()
    clusters = [f"cluster_{k}" for k in range(K)]
    assert sorted(p.name for p in out.glob("cluster_*")) == clusters
    for name in clusters:
        for meta in ("adapter_config.json", "d2c_jax.json"):  # members, merge settings
            assert (out / name / meta).read_text() == (expected / name / meta).read_text()
    merged = AdapterLibrary.load([out / name for name in clusters])
    want = AdapterLibrary.load([expected / name for name in clusters])
    np.testing.assert_allclose(merged.scale, want.scale, rtol=1e-6)
    assert merged.params.keys() == want.params.keys()
    for module, factors in want.params.items():
        for factor, array in factors.items():
            np.testing.assert_allclose(
                merged.params[module][factor], array, rtol=1e-5, atol=1e-6, err_msg=module
            )
    log, want_log = (
        [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]
        for path in (out, expected)
    )
    moves, want_moves = (
        [(m["adapter"], m["from"], m["to"], m["delta_j"]) for e in entries for m in e["moves"]]
        for entries in (log, want_log)
    )
    assert [m[:3] for m in moves] == [m[:3] for m in want_moves]
    np.testing.assert_allclose([m[3] for m in moves], [m[3] for m in want_moves], rtol=1e-5)
    np.testing.assert_allclose(
        [e["objective"] for e in log], [e["objective"] for e in want_log], rtol=1e-6
    )
    manifest, want_manifest = (
        json.loads((p / "manifest.json").read_text()) for p in (out, expected)
    )
    assert manifest["settings"] == want_manifest["settings"]


def test_two_processes_write_what_one_process_writes(tiny_setup, reference, tmp_path):  # noqa: F811
    root, hf_dir = tiny_setup
    out = tmp_path / "out"
    results = run_processes(cluster_args(root, hf_dir, out, *SEARCH))
    assert "dev objective" in results[0][1] and results[1][1].count("dev objective") == 0
    assert_same_output(out, reference)
    assert not (out / ".search").exists()


def test_resume_of_a_multi_process_run(tiny_setup, reference, tmp_path):  # noqa: F811
    root, hf_dir = tiny_setup
    out = tmp_path / "out"
    args = cluster_args(root, hf_dir, out, *SEARCH)

    # Kill both processes mid-search: OUT holds the run's settings, no checkpoints.
    procs = start_cli(args)
    settings = out / ".search" / "settings.json"
    deadline = time.monotonic() + TIMEOUT
    while not settings.exists() and time.monotonic() < deadline:
        if any(proc.poll() is not None for proc, _, _ in procs):
            break
        time.sleep(0.05)
    running = all(proc.poll() is None for proc, _, _ in procs)
    kill(procs)
    finish(procs)  # closes the logs
    assert running and settings.exists(), "the run ended before it started its search"
    assert not (out / "manifest.json").exists()
    assert not (out / ".search" / "ckpt").exists()

    # --resume: the search runs again (nothing to restore) and finishes as one process does.
    results = run_processes([*args, "--resume"])
    assert "search starts again" in results[0][1]
    assert_same_output(out, reference)
    assert not (out / ".search").exists()

    # --resume of the finished run: every process stops at once, nothing is rewritten.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    results = run_processes([*args, "--resume"])
    assert all("finished run" not in stdout for _, stdout, _ in results[1:])
    assert "holds a finished run with these settings; nothing to do" in results[0][1]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    # Neither --resume nor --force: every process refuses OUT with one line.
    results = run_processes(args, expect=2)
    errors = [err.strip().splitlines()[-1] for _, _, err in results]
    assert "is not empty; pass --resume to continue it or --force to replace it" in errors[0]
    assert errors[1] == f"d2c cluster: error: --out {out}: refused by process 0 (see its error)"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
