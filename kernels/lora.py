"""LoRA application as pure array functions (no I/O, no Python loops over adapters).

A LoRA-adapted linear layer computes ``y = x W^T + b + scale * (x A^T) B^T`` with PEFT
orientation: ``W [d_out, d_in]``, ``A [r, d_in]``, ``B [d_out, r]``. The low-rank term
is applied as two thin matmuls, never by forming ``W + scale * B @ A``: with many
candidates sharing one base weight, the base GEMM is shared and each candidate only
pays ``2 r (d_in + d_out)`` FLOPs per token.

A per-layer adapter slice (what the decoder sees inside its ``lax.scan`` over layers)
is one of

* factor form ``{"A": [r, d_in], "B": [d_out, r]}`` with a separate scalar ``scale``;
* dense form ``{"delta": [d_out, d_in]}`` with the scale already folded in (what a
  delta-space merge produces before truncation); `lora_linear` folds it into the
  weight (``x (W + delta)^T``, no extra GEMM), `lora_term` applies it as ``x delta^T``.

The candidate axis is added by the caller with ``jax.vmap`` over the whole forward
pass (`d2c_jax.scoring.candidate_nll`): XLA then turns the shared base weight into one
large GEMM over all candidates' tokens and the factor products into batched thin
matmuls.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

# Per-layer adapter slice for one module: {"A", "B"} (factor) or {"delta"} (dense).
LoraSlice = Mapping[str, jax.Array]


def lora_term(x: jax.Array, lora: LoraSlice, scale: jax.Array | float = 1.0) -> jax.Array:
    """The adapter's contribution for inputs ``x [..., d_in]``: ``[..., d_out]``.

    Factor form: ``scale * (x A^T) B^T``. Dense form: ``x delta^T`` (scale ignored,
    it is folded into the delta). Computed in ``x.dtype``.
    """
    if "delta" in lora:
        delta = lora["delta"].astype(x.dtype)
        return jnp.einsum("...i,oi->...o", x, delta)
    a = lora["A"].astype(x.dtype)
    b = lora["B"].astype(x.dtype)
    low = jnp.einsum("...i,ri->...r", x, a)
    low = low * jnp.asarray(scale, x.dtype)
    return jnp.einsum("...r,or->...o", low, b)


def lora_linear(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None = None,
    lora: LoraSlice | None = None,
    scale: jax.Array | float = 1.0,
) -> jax.Array:
    """``x W^T (+ b) (+ LoRA term)`` for ``x [..., d_in]``, ``weight [d_out, d_in]``.

    A dense slice ``{"delta"}`` is folded into the weight, ``x (W + delta)^T``: the delta
    already exists, so adding it costs ``d_out * d_in`` adds instead of a second GEMM
    of ``2 * d_out * d_in`` FLOPs per token (under a candidate vmap this gives one
    batched GEMM with a per-candidate weight). Factor slices are never folded.
    """
    if lora is not None and "delta" in lora:
        weight = weight.astype(x.dtype) + lora["delta"].astype(x.dtype)
        lora = None
    y = jnp.einsum("...i,oi->...o", x, weight.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(x.dtype)
    if lora is not None:
        y = y + lora_term(x, lora, scale)
    return y


def dense_delta(lora: LoraSlice, scale: jax.Array | float = 1.0) -> jax.Array:
    """The dense ``[..., d_out, d_in]`` update (``scale * B @ A``, or ``delta`` as is).

    `scale` is a scalar or has the leading (batch) shape of the factors, e.g. ``[C]``
    for ``A [C, L, r, d_in]``."""
    if "delta" in lora:
        return lora["delta"]
    delta = jnp.einsum("...or,...ri->...oi", lora["B"], lora["A"])
    s = jnp.asarray(scale, delta.dtype)
    return s.reshape(s.shape + (1,) * (delta.ndim - s.ndim)) * delta
