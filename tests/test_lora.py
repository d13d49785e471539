"""kernels/lora.py: LoRA terms equal the dense update they stand for."""

from __future__ import annotations

import jax
import numpy as np

from kernels.lora import dense_delta, lora_linear, lora_term


def _data(seed=0, c=3, n=5, d_in=12, d_out=7, r=4):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    return f(c, n, d_in), f(d_out, d_in), f(d_out), f(c, r, d_in), f(c, d_out, r), f(c)


def test_factor_term_equals_dense_update():
    x, w, b, a, bb, s = _data()
    got = lora_linear(x[0], w, b, {"A": a[0], "B": bb[0]}, s[0])
    want = x[0] @ (w + s[0] * bb[0] @ a[0]).T + b
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    delta = dense_delta({"A": a[0], "B": bb[0]}, s[0])
    np.testing.assert_allclose(
        lora_term(x[0], {"delta": delta}), x[0] @ delta.T, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        lora_term(x[0], {"delta": delta}, 123.0),
        lora_term(x[0], {"A": a[0], "B": bb[0]}, s[0]),
        rtol=1e-4,
        atol=1e-5,
    )


def multi_lora_linear(x, w, b, lora, scale=None):
    """The candidate axis as the engine adds it: vmap, base weight shared."""
    scale = np.ones(x.shape[0], x.dtype) if scale is None else scale
    return jax.vmap(lambda xc, lc, sc: lora_linear(xc, w, b, lc, sc))(x, lora, scale)


def test_candidate_axis_equals_loop():
    x, w, b, a, bb, s = _data(1)
    got = multi_lora_linear(x, w, b, {"A": a, "B": bb}, s)
    for c in range(x.shape[0]):
        np.testing.assert_allclose(
            got[c], lora_linear(x[c], w, b, {"A": a[c], "B": bb[c]}, s[c]), rtol=1e-5, atol=1e-5
        )
    deltas = dense_delta({"A": a, "B": bb}, s)
    assert deltas.shape == (3, 7, 12)
    np.testing.assert_allclose(
        multi_lora_linear(x, w, None, {"delta": deltas}), got - b, rtol=1e-4, atol=1e-4
    )


def test_gradients_flow_to_factors_only_through_the_term():
    x, w, b, a, bb, s = _data(2)
    loss = lambda ad: (lora_linear(x[0], w, b, ad, s[0]) ** 2).sum()
    g = jax.grad(loss)({"A": a[0], "B": bb[0]})
    y = lora_linear(x[0], w, b, {"A": a[0], "B": bb[0]}, s[0])
    # dL/dB = s * (2y)^T (x A^T)
    np.testing.assert_allclose(g["B"], s[0] * (2 * y).T @ (x[0] @ a[0].T), rtol=1e-4, atol=1e-4)
