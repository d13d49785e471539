"""Dense LoRA deltas <-> rank-r factors.

A LoRA adapter stores, per module and layer, ``A [r, d_in]`` and ``B [d_out, r]``
(PEFT orientation) and adds ``scale * B @ A`` (``[d_out, d_in]``) to the weight.
This module converts between the two forms, batched over any leading axes
(adapters, clusters, layers):

- ``factors_to_delta(A, B, scale)``: ``scale * B @ A``.
- ``delta_to_factors(delta, rank)``: the best rank-r approximation of ``delta``
  in Frobenius norm (Eckart-Young), by a truncated SVD ``delta ~ U_r S_r Vh_r``.
  The singular values are split symmetrically, ``A = sqrt(S_r) Vh_r`` and
  ``B = U_r sqrt(S_r)``, so A and B have equal norms per rank component and
  ``B @ A = U_r S_r Vh_r`` with scale 1. Singular vectors are defined only up to
  sign (and rotation within repeated singular values): compare ``B @ A``, never
  the factors themselves.

Pure functions of arrays: jittable and vmappable, no I/O.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_factors(a: jax.Array, b: jax.Array) -> None:
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"A and B must be at least 2-D, got A {a.shape} and B {b.shape}")
    if a.shape[:-2] != b.shape[:-2] or a.shape[-2] != b.shape[-1]:
        raise ValueError(
            f"A [..., r, d_in] and B [..., d_out, r] disagree: A {a.shape}, B {b.shape}"
        )


def factors_to_delta(a: jax.Array, b: jax.Array, scale: jax.Array | float = 1.0) -> jax.Array:
    """Dense delta ``scale * B @ A``.

    Args:
      a: ``[..., r, d_in]``.
      b: ``[..., d_out, r]`` with the same leading axes as `a`.
      scale: a scalar, or an array whose shape is a prefix of the leading axes
        (for example ``[N]`` for ``A [N, L, r, d_in]``): one scale per leading index.

    Returns:
      ``[..., d_out, d_in]`` in the promoted dtype of the inputs.
    """
    _check_factors(a, b)
    scale = jnp.asarray(scale)
    batch = a.shape[:-2]
    if scale.shape != batch[: scale.ndim]:
        raise ValueError(
            f"scale of shape {scale.shape} is not a prefix of the leading axes {batch} of A"
        )
    delta = jnp.einsum("...or,...ri->...oi", b, a)
    return delta * scale.reshape(scale.shape + (1,) * (delta.ndim - scale.ndim))


def delta_to_factors(delta: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Rank-`rank` factors of `delta` by truncated SVD, singular values split symmetrically.

    Args:
      delta: ``[..., d_out, d_in]``.
      rank: ``1 <= rank <= min(d_out, d_in)``.

    Returns:
      ``(A [..., rank, d_in], B [..., d_out, rank])`` with ``B @ A`` the best rank-r
      approximation of `delta` (scale 1).
    """
    if delta.ndim < 2:
        raise ValueError(f"delta must be at least 2-D [..., d_out, d_in], got {delta.shape}")
    d_out, d_in = delta.shape[-2:]
    if not 1 <= rank <= min(d_out, d_in):
        raise ValueError(
            f"rank must be in [1, {min(d_out, d_in)}] for delta {delta.shape}, got {rank}"
        )
    u, s, vh = jnp.linalg.svd(delta, full_matrices=False)
    root = jnp.sqrt(s[..., :rank])
    a = root[..., :, None] * vh[..., :rank, :]
    b = u[..., :, :rank] * root[..., None, :]
    return a, b
