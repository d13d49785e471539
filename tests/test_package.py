"""d2c_jax/__init__.py: the process-wide JAX-on-CPU defaults that importing the package sets.

Each check runs in a fresh interpreter, since the settings act at import time and
at backend creation.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# Two modules of SmolLM2's shapes (q: 576x576, v: 192x576; 2 clusters x 30 layers)
# truncated to rank 8 in one jitted program: the program that hung `make demo`.
TRUNCATE_TWO_MODULES = textwrap.dedent(
    """
    import d2c_jax
    import jax
    import numpy as np
    from kernels import lowrank

    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 30, 576, 576)).astype(np.float32)
    v = rng.standard_normal((2, 30, 192, 576)).astype(np.float32)
    truncate = jax.jit(
        lambda q, v: (lowrank.delta_to_factors(q, 8), lowrank.delta_to_factors(v, 8))
    )
    for step in range(4):
        jax.block_until_ready(truncate(q + step, v))
    print("done")
    """
)


def run_python(code: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "OPENBLAS_NUM_THREADS")}
    return env | extra


def test_rank_truncation_of_two_modules_does_not_hang():
    # With XLA:CPU's concurrency-optimized scheduler on, this hung in its first
    # execution in 2 of 2 runs on our 2-core development machine (0% CPU, forever).
    try:
        result = run_python(TRUNCATE_TWO_MODULES, clean_env(), timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("jitted rank truncation of two modules hung (XLA:CPU scheduler, see d2c_jax)")
    assert result.returncode == 0, result.stderr
    assert "done" in result.stdout


SHOW_SETTINGS = (
    "import d2c_jax, os; print(os.environ['XLA_FLAGS']); print(os.environ['OPENBLAS_NUM_THREADS'])"
)


def test_import_adds_its_defaults_and_keeps_the_users_flags():
    result = run_python(
        SHOW_SETTINGS,
        clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"),
        timeout=120,
    )
    flags, threads = result.stdout.split("\n")[:2]
    assert flags.split() == [
        "--xla_force_host_platform_device_count=2",
        "--xla_cpu_enable_concurrency_optimized_scheduler=false",
    ]
    assert threads == "1"


def test_import_respects_an_explicit_choice():
    result = run_python(
        SHOW_SETTINGS,
        clean_env(
            XLA_FLAGS="--xla_cpu_enable_concurrency_optimized_scheduler=true",
            OPENBLAS_NUM_THREADS="2",
        ),
        timeout=120,
    )
    assert result.stdout.split("\n")[:2] == [
        "--xla_cpu_enable_concurrency_optimized_scheduler=true",
        "2",
    ]
