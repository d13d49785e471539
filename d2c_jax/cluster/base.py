"""The one interface every clustering method implements, and storage budgets.

A clustering method maps an `AdapterLibrary` of N adapters to an assignment
``assign [N]`` with values in ``[0, K)``, every cluster non-empty. Methods are
frozen dataclasses (their fields are their settings) with a `name` and

    fit(library, k, seed, objective=None) -> ClusteringResult

`objective` is the dev-set objective (`d2c_jax.cluster.objective.DevObjective`);
data-free methods ignore it, data-driven ones (D2C) require it. Same inputs and
seed give the same result.

Budgets (`resolve_budget`): ``"5"`` (K adapters), ``"12.5%"`` (a fraction of N,
rounded to the nearest integer) or ``"4MB"`` / ``"3.5MiB"`` / ``"900000B"`` (bytes of
merged rank-r adapters in bfloat16, rounded down). Documented edge cases, all
`ValueError`s naming the budget: K < 1 (including a percentage or byte budget
that rounds to 0) and K > N. A library of one adapter admits only K = 1, for which
every method returns the single cluster ``[0]``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, Protocol

import numpy as np

from d2c_jax.library import AdapterLibrary

_BYTE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


@dataclasses.dataclass(frozen=True)
class ClusteringResult:
    """What a clustering method returns.

    Attributes:
      method: the method's name.
      assign: ``[N]`` int, cluster of each adapter, every cluster in ``[0, K)`` non-empty.
      k: number of clusters K.
      log: per-iteration records (method-specific keys; D2C logs objective, moves
        applied, candidates scored and seconds).
      objective: the dev objective J of `assign` when the method computed it.
      info: method-specific summary (e.g. K-Means inertia).
    """

    method: str
    assign: np.ndarray
    k: int
    log: tuple[dict[str, Any], ...] = ()
    objective: float | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        check_assignment(self.assign, self.k)


class ClusteringMethod(Protocol):
    name: ClassVar[str]

    def fit(
        self, library: AdapterLibrary, k: int, seed: int, objective: Any | None = None
    ) -> ClusteringResult: ...


def check_assignment(assign: np.ndarray, k: int) -> None:
    """Raise unless `assign` is ``[N]`` ints in ``[0, k)`` with every cluster used."""
    assign = np.asarray(assign)
    if assign.ndim != 1 or not np.issubdtype(assign.dtype, np.integer):
        raise ValueError(
            f"assignment must be a 1-D integer array, got {assign.dtype} {assign.shape}"
        )
    used = set(assign.tolist())
    if used != set(range(k)):
        raise ValueError(
            f"assignment must use every cluster 0..{k - 1} exactly; uses {sorted(used)}"
        )


def membership_mask(assign: np.ndarray, k: int) -> np.ndarray:
    """``assign [N] -> mask [K, N]`` bool, row k = members of cluster k."""
    return np.asarray(assign)[None, :] == np.arange(k)[:, None]


def resolve_budget(budget: str | int, library: AdapterLibrary) -> int:
    """The number of clusters K that a budget allows (see module docstring)."""
    n = library.num_adapters
    text = str(budget).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+", text):
        k = int(text)
        what = f"budget {budget!r}"
    elif match := re.fullmatch(r"(\d+(?:\.\d+)?)%", text):
        fraction = float(match[1]) / 100
        k = int(np.floor(fraction * n + 0.5))
        what = f"budget {budget!r} ({fraction:.4g} of N={n} adapters rounds to K={k})"
    elif match := re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]i?b|b)", text):
        total = float(match[1]) * _BYTE_UNITS[match[2]]
        per_adapter = library.adapter_bytes()
        k = int(total // per_adapter)
        what = (
            f"budget {budget!r} ({per_adapter} bytes per merged rank-{library.rank} "
            f"adapter gives K={k})"
        )
    else:
        raise ValueError(
            f"budget {budget!r} is not understood; give K (e.g. 5), a percentage of the "
            "library (e.g. 12.5%) or bytes (e.g. 4MB)"
        )
    if k < 1:
        raise ValueError(f"{what}: K must be at least 1")
    if k > n:
        raise ValueError(f"{what}: K exceeds the library's N={n} adapters")
    return k
