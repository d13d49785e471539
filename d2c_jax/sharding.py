"""Sharding rules of the engine: which arrays are split across devices, in one place.

Candidate scoring is embarrassingly parallel over candidates: every candidate runs
the same frozen base model on its own merged adapter and its own examples. So the
engine uses a one-axis `jax.sharding.Mesh` named ``candidates`` and these rules:

* `BASE`: base-model weights -> replicated.
* `CANDIDATES`: anything with a leading candidate axis C (member lists
  ``[C, S]``, merged adapters ``[C, ...]``, their scales ``[C]``, token rows
  ``[C, R, T]``) -> split on axis 0.
* `LIBRARY`: the prepared library (factors and trim thresholds ``[N, ...]``) ->
  split on axis 0 when the device count divides N, replicated otherwise.

The jitted merge and scoring functions are written for one global array (vmapped
over candidates); given inputs placed by these rules, XLA's SPMD partitioner runs
each device on its slice of the candidates, and gathers the members those
candidates need from the split library. Nothing else changes, so the same code runs on
one device (a mesh of one), on N host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``) and across hosts.

Examples are not split: a candidate's dev examples pack into one to three rows of
128 tokens, too few to divide, while an iteration has N (K-1) candidates, far
more than devices. The base model is replicated because it is small next to the
activations of a chunk of candidates (SmolLM2-135M: 0.5 GB in float32).

Callers pad the candidate axis to a multiple of the device count
(`round_to_devices`); `put` places host or device arrays by role, `fetch` brings a
(possibly multi-host) result back as one NumPy array on every process.

Multi-host: start the same command on every host after `jax.distributed.initialize`
(``d2c cluster --distributed``, see docs/ARCHITECTURE.md "Scaling out"). Every
process computes the same candidate plan from the same seed and inputs, so host
arrays are placed with `jax.make_array_from_callback` (each process fills only
its own devices' slices) and results are gathered with
`jax.experimental.multihost_utils.process_allgather`.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "candidates"
BASE = "base"
CANDIDATES = "candidates"
LIBRARY = "library"
ROLES = (BASE, CANDIDATES, LIBRARY)


def make_mesh(devices: int | None = None) -> Mesh:
    """A one-axis mesh over the first `devices` visible devices (default: all)."""
    available = jax.devices()
    count = len(available) if devices is None else int(devices)
    if not 1 <= count <= len(available):
        raise ValueError(
            f"devices must be between 1 and the {len(available)} visible devices, got {count}"
        )
    return Mesh(np.asarray(available[:count]), (AXIS,))


def num_devices(mesh: Mesh) -> int:
    return int(mesh.devices.size)


def round_to_devices(count: int, mesh: Mesh) -> int:
    """The smallest multiple of the mesh's device count that is >= `count` (and >= 1)."""
    d = num_devices(mesh)
    return max(1, math.ceil(count / d)) * d


def partition_spec(role: str, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The rule table of the module docstring, for one array of `shape`."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if role == BASE or not shape:
        return PartitionSpec()
    divides = shape[0] % num_devices(mesh) == 0
    if role == CANDIDATES:
        if not divides:
            raise ValueError(
                f"candidate axis of {shape[0]} does not split over {num_devices(mesh)} devices; "
                "pad it with round_to_devices"
            )
        return PartitionSpec(AXIS)
    return PartitionSpec(AXIS) if divides else PartitionSpec()


def shardings(tree, mesh: Mesh, role: str):
    """The pytree of `NamedSharding`s that `role` gives the leaves of `tree`."""
    return jax.tree.map(
        lambda x: NamedSharding(mesh, partition_spec(role, np.shape(x), mesh)), tree
    )


def put(tree, mesh: Mesh, role: str):
    """Place every leaf of `tree` (NumPy or jax arrays) on `mesh` by the rule of `role`.

    Arrays already laid out over the mesh's devices are resharded in place; anything
    else (NumPy, or a jax array on one local device) is copied from host memory, each
    process filling only its own devices (multi-host safe when every process holds the
    same value, which the engine's deterministic plans guarantee).
    """
    mesh_devices = set(mesh.devices.flat)

    def place(x, sharding):
        if isinstance(x, jax.Array) and x.sharding.device_set == mesh_devices:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree, shardings(tree, mesh, role))


def fetch(x: jax.Array) -> np.ndarray:
    """A global array as one NumPy array on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
