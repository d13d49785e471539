"""Sharded candidate scoring: 4 host devices give the losses and D2C result of 1 device.

``--xla_force_host_platform_device_count`` only works if set before jax starts, so
the multi-device half runs in a subprocess (this file executed as a script with
``XLA_FLAGS`` set); it scores the same candidates and runs the same D2C search on a
mesh of 1 device and on a mesh of 4 devices and reports both to the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEVICES = 4
NUM_ADAPTERS = 8  # divisible by DEVICES, so the library is split over the adapter axis too


def run_on_devices() -> dict:
    """Score candidates and run D2C on meshes of 1 and `DEVICES` devices (subprocess side)."""
    import jax

    from d2c_jax import sharding
    from d2c_jax.cluster import D2CClustering
    from d2c_jax.cluster.objective import DevObjective, ObjectiveConfig
    from kernels.merge import MergeConfig
    from tests.conftest import build_tiny_base, build_tiny_tokenizer, random_lora
    from tests.test_cluster_objective import library_from, task_examples

    base = build_tiny_base(build_tiny_tokenizer())
    names = [f"t{i}" for i in range(NUM_ADAPTERS)]
    library = library_from(
        random_lora(base.config, n=NUM_ADAPTERS, seed=3, std=0.3), names, scale=2.0
    )
    examples = task_examples(names, per_task=3)
    masks = np.random.default_rng(0).random((13, NUM_ADAPTERS)) < 0.4
    masks[np.arange(13), np.arange(13) % NUM_ADAPTERS] = True  # no empty row
    out = {"visible_devices": jax.device_count()}
    for devices in (1, DEVICES):
        objective = DevObjective(
            base,
            library,
            examples,
            MergeConfig(method="ties", space="delta", density=0.5),
            ObjectiveConfig(candidates_per_call=6, devices=devices),
        )
        placed = sharding.put(
            np.zeros((objective.candidates_per_call, 3)), objective.mesh, "candidates"
        )
        result = D2CClustering(init="random", mode="best", max_iters=6, task_loss="nll").fit(
            library, 3, seed=1, objective=objective, progress=False
        )
        out[str(devices)] = {
            "candidates_per_call": objective.candidates_per_call,
            "chunk_devices": len(placed.sharding.device_set),
            "library_spec": list(objective.prepared.factors["q_proj"]["A"].sharding.spec),
            "losses": objective.task_losses(masks).tolist(),
            "assign": result.assign.tolist(),
            "objectives": [entry["objective"] for entry in result.log],
        }
    return out


def test_four_host_devices_match_one_device():
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.run(
        [sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    one, many = report["1"], report[str(DEVICES)]
    assert report["visible_devices"] == DEVICES
    # the 4-device run really split its chunks and the library
    assert many["chunk_devices"] == DEVICES and one["chunk_devices"] == 1
    assert many["library_spec"] == ["candidates"]
    assert many["candidates_per_call"] == 8 and one["candidates_per_call"] == 6
    np.testing.assert_allclose(many["losses"], one["losses"], rtol=1e-5, atol=1e-6)
    assert len(one["objectives"]) > 2  # the search moved adapters
    assert many["assign"] == one["assign"]
    np.testing.assert_allclose(many["objectives"], one["objectives"], rtol=1e-5)


if __name__ == "__main__":
    print(json.dumps(run_on_devices()))
