"""One adapter (or a candidate stack) meeting a base model: forms and compatibility.

Adapters reach the scoring and generation functions in several forms: factor form
``{module: {"A": [L, r, d_in], "B": [L, d_out, r]}}`` with a scale, dense form
``{module: {"delta": [L, d_out, d_in]}}`` (scale folded in), a ``(params, scale)``
pair, or an `AdapterLibrary` of one; stacks add a leading candidate axis ``C``.
`as_single_adapter` normalises them, `is_dense` and `num_stacked` read a stack's
form and size, and `check_adapter_for_base` says why a library does not fit a base
model (used by ``d2c score`` and ``d2c evaluate`` before any computation).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from d2c_jax.models.decoder import check_adapter


def num_stacked(tree) -> int:
    """Size of the leading (adapter or candidate) axis of a stacked pytree."""
    return int(jax.tree.leaves(tree)[0].shape[0])


def is_dense(candidates: Mapping[str, Mapping[str, Any]]) -> bool:
    """True for dense-delta adapters (``{module: {"delta": ...}}``), False for factors."""
    return all("delta" in v for v in candidates.values())


def as_single_adapter(adapter, scale=None):
    """Normalise an adapter argument to ``(params or None, scale)``.

    Accepts None; a factor dict ``{module: {"A": [L, r, d_in], "B": [L, d_out, r]}}``
    with `scale` (required); a dense dict ``{module: {"delta": [L, d_out, d_in]}}``; a
    ``(params, scale)`` tuple; or an object with ``params`` (leading axis of 1, e.g. an
    `AdapterLibrary` of one adapter) and ``scale``.
    """
    if adapter is None:
        return None, 1.0
    if isinstance(adapter, tuple) and len(adapter) == 2:
        adapter, scale = adapter
    if hasattr(adapter, "params") and hasattr(adapter, "scale"):
        n = num_stacked(adapter.params)
        if n != 1:
            raise ValueError(f"expected a single adapter, got a library of {n}")
        return jax.tree.map(lambda x: x[0], adapter.params), float(np.asarray(adapter.scale)[0])
    if is_dense(adapter):
        return adapter, 1.0
    if scale is None:
        raise ValueError("a factor-form adapter needs its scale (alpha / r)")
    return adapter, scale


def check_adapter_for_base(base, library) -> None:
    """Raise ValueError if an adapter library was made for another base model.

    Shapes (layers, d_in, d_out of every module) must match; and the base the library
    records (``base_model``) must be the same model by weights fingerprint whenever it
    can be read (`d2c_jax.models.identity.check_same_base`; an unreadable one whose
    name differs is only a warning).
    """
    from d2c_jax.models.identity import check_same_base

    check_same_base(base, getattr(library, "base_model", None))
    try:
        check_adapter(base.config, library.params)
    except ValueError as err:
        raise ValueError(f"the adapter does not fit base model {base.name!r}: {err}") from None
