"""kernels/loss.py: streamed cross-entropy equals the full-logits computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.loss import (
    ExampleScores,
    label_positions,
    masked_example_nll,
    packed_example_nll,
    token_logits,
    token_nll,
)


def full_nll(h, head, labels):
    logits = h @ head.T
    return -jax.nn.log_softmax(logits, axis=-1)[jnp.arange(len(labels)), labels]


@pytest.mark.parametrize("chunk", [1000, 64, 37, 1])
def test_token_nll_matches_full_softmax(chunk):
    rng = np.random.default_rng(0)
    h = rng.standard_normal((20, 16)).astype(np.float32)
    head = (3 * rng.standard_normal((259, 16))).astype(np.float32)
    labels = rng.integers(0, 259, 20)
    np.testing.assert_allclose(
        token_nll(h, head, labels, chunk), full_nll(h, head, labels), rtol=1e-5, atol=1e-5
    )
    g = jax.grad(lambda h: token_nll(h, head, labels, chunk).sum())(h)
    want = jax.grad(lambda h: full_nll(h, head, labels).sum())(h)
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5)


def test_label_positions_and_compaction():
    mask = np.array([[0, 0, 1, 1, 0, 0], [0, 1, 0, 1, 1, 0]], np.float32)
    pos, valid = label_positions(mask, 3)
    np.testing.assert_array_equal(pos[0, :2], [2, 3])
    assert valid.tolist() == [[True, True, False], [True, True, True]]
    np.testing.assert_array_equal(pos[1], [1, 3, 4])

    rng = np.random.default_rng(1)
    hidden = rng.standard_normal((2, 6, 8)).astype(np.float32)
    head = rng.standard_normal((50, 8)).astype(np.float32)
    tokens = rng.integers(0, 50, (2, 6))
    full = masked_example_nll(hidden, head, tokens, mask)
    np.testing.assert_allclose(
        masked_example_nll(hidden, head, tokens, mask, max_labels=3, vocab_chunk=16),
        full,
        rtol=1e-5,
    )
    # by hand: label t predicted from position t - 1
    ref = full_nll(hidden[0, 1:3], head, tokens[0, 2:4]).mean()
    np.testing.assert_allclose(full[0], ref, rtol=1e-5)
    # an example without labels scores 0, never NaN
    assert float(masked_example_nll(hidden, head, tokens, np.zeros_like(mask))[0]) == 0.0


# ------------------------------------------------------------------ teacher-forced correctness


def numpy_scores(hidden, head, tokens, loss_mask, slots=None, num_examples=None, softcap=0.0):
    """Per-example (nll, exact, accuracy, margin, soft) from full float64 logits; label t of
    row b belongs to example ``slots[b, t]`` (default: example b)."""
    logits = np.einsum("btd,vd->btv", hidden.astype(np.float64), head.astype(np.float64))
    if softcap > 0:
        logits = softcap * np.tanh(logits / softcap)
    b, t, _ = hidden.shape
    if slots is None:
        slots, num_examples = np.broadcast_to(np.arange(b)[:, None], (b, t)), b
    per = [[] for _ in range(num_examples)]
    for r in range(b):
        for p in range(1, t):
            if loss_mask[r, p] > 0:
                z = logits[r, p - 1]
                y = tokens[r, p]
                other = np.delete(z, y).max() if len(z) > 1 else -np.inf
                nll = np.logaddexp.reduce(z) - z[y]
                per[slots[r, p]].append((nll, z[y] - other))
    out = []
    for terms in per:
        if not terms:
            out.append((0.0, 0.0, 0.0, np.inf, 0.0))
            continue
        nll, margin = np.array(terms).T
        correct = margin > 0
        soft = (1 / (1 + np.exp(-margin))).mean()
        out.append((nll.mean(), float(correct.all()), correct.mean(), margin.min(), soft))
    return np.array(out).T  # [5, M]


def check_scores(got, want, margins_apart=1e-3):
    """`ExampleScores` against `numpy_scores`; correctness is compared only where every
    reference margin of the example is clear of 0 (float32 vs float64 rounding)."""
    nll, exact, accuracy, margin, soft = want
    np.testing.assert_allclose(got.nll, nll, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.margin, margin, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(got.soft, soft, rtol=1e-4, atol=1e-4)
    clear = np.abs(margin) > margins_apart
    np.testing.assert_array_equal(np.asarray(got.exact)[clear], exact[clear])
    clear_all = np.isinf(margin) | clear
    np.testing.assert_allclose(np.asarray(got.accuracy)[clear_all], accuracy[clear_all], atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(
    m=st.integers(1, 4),
    t=st.integers(2, 9),
    vocab=st.integers(2, 70),
    chunk=st.integers(1, 80),
    softcap=st.sampled_from([0.0, 4.0]),
    compact=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_correctness_matches_full_logits(m, t, vocab, chunk, softcap, compact, seed):
    """Exact match, accuracy, smallest margin and soft accuracy of `masked_example_nll`
    against plain NumPy on the full logits; the NLL is the NLL-only result, bit for bit."""
    rng = np.random.default_rng(seed)
    d = 6
    hidden = rng.standard_normal((m, t, d)).astype(np.float32)
    head = (2 * rng.standard_normal((vocab, d))).astype(np.float32)
    tokens = rng.integers(0, vocab, (m, t))
    mask = (rng.random((m, t)) < 0.6).astype(np.float32)
    mask[:, 0] = 0
    # make some labels the argmax so exact match is 1 somewhere
    logits = np.einsum("btd,vd->btv", hidden, head)
    greedy = rng.random((m, t)) < 0.7
    tokens[:, 1:] = np.where(greedy[:, 1:], logits[:, :-1].argmax(-1), tokens[:, 1:])
    labels = int(mask.sum(1).max())
    kw = dict(vocab_chunk=chunk, softcap=softcap, max_labels=max(labels, 1) if compact else None)
    got = masked_example_nll(hidden, head, tokens, mask, correctness=True, **kw)
    assert isinstance(got, ExampleScores)
    check_scores(got, numpy_scores(hidden, head, tokens, mask, softcap=softcap))
    np.testing.assert_array_equal(got.nll, masked_example_nll(hidden, head, tokens, mask, **kw))


@settings(max_examples=10, deadline=None)
@given(
    rows=st.integers(1, 3),
    t=st.integers(3, 10),
    examples=st.integers(1, 5),
    chunk=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_packed_correctness_matches_full_logits(rows, t, examples, chunk, seed):
    """`packed_example_nll`: label terms are reduced per slot (several examples to a row,
    examples without labels get the documented empty values)."""
    rng = np.random.default_rng(seed)
    vocab, d = 29, 5
    hidden = rng.standard_normal((rows, t, d)).astype(np.float32)
    head = (2 * rng.standard_normal((vocab, d))).astype(np.float32)
    logits = np.einsum("btd,vd->btv", hidden, head)
    tokens = rng.integers(0, vocab, (rows, t))
    tokens[:, 1:] = np.where(
        rng.random((rows, t - 1)) < 0.7, logits[:, :-1].argmax(-1), tokens[:, 1:]
    )
    slots = np.sort(rng.integers(0, examples, (rows, t)), axis=1)
    mask = (rng.random((rows, t)) < 0.7).astype(np.float32)
    mask[:, 0] = 0
    got = packed_example_nll(
        hidden, head, tokens, mask, slots, examples, vocab_chunk=chunk, correctness=True
    )
    check_scores(got, numpy_scores(hidden, head, tokens, mask, slots, examples))
    np.testing.assert_array_equal(
        got.nll, packed_example_nll(hidden, head, tokens, mask, slots, examples, vocab_chunk=chunk)
    )


@pytest.mark.parametrize("chunk", [50, 7, 3])
def test_a_tie_is_not_a_correct_label(chunk):
    """A target tied with another token (a duplicated head row, in the same chunk or
    another) is not the strict argmax: margin 0, accuracy and exact match exclude it."""
    rng = np.random.default_rng(3)
    vocab, d = 10, 4
    head = rng.standard_normal((vocab, d)).astype(np.float32)
    hidden = rng.standard_normal((1, 3, d)).astype(np.float32)
    logits = hidden[0] @ head.T
    tokens = np.array([[0, logits[0].argmax(), logits[1].argmax()]])
    mask = np.array([[0, 1, 1]], np.float32)
    clear = masked_example_nll(hidden, head, tokens, mask, vocab_chunk=chunk, correctness=True)
    assert float(clear.exact[0]) == 1.0 and float(clear.margin[0]) > 0
    tied = head.copy()
    twin = (int(tokens[0, 2]) + 5) % vocab  # same chunk for chunk=50, another for 3 and 7
    tied[twin] = tied[tokens[0, 2]]
    got = masked_example_nll(hidden, tied, tokens, mask, vocab_chunk=chunk, correctness=True)
    assert float(got.margin[0]) == 0.0
    assert float(got.exact[0]) == 0.0
    assert float(got.accuracy[0]) == 0.5
    z = hidden[0, 0] @ tied.T  # the first label is still the strict argmax
    first = z[tokens[0, 1]] - np.delete(z, tokens[0, 1]).max()
    np.testing.assert_allclose(got.soft[0], (1 / (1 + np.exp(-first)) + 0.5) / 2, rtol=1e-5)


def test_token_logits_one_token_vocabulary_and_empty_examples():
    hidden = np.ones((2, 3), np.float32)
    head = np.ones((1, 3), np.float32)
    nll, target, other = token_logits(hidden, head, np.zeros(2, np.int32))
    np.testing.assert_allclose(nll, 0.0, atol=1e-6)
    np.testing.assert_allclose(target, 3.0)
    assert np.isneginf(np.asarray(other)).all()
    rng = np.random.default_rng(0)
    h = rng.standard_normal((2, 4, 3)).astype(np.float32)
    mask = np.zeros((2, 4), np.float32)
    mask[1, 2:] = 1
    got = masked_example_nll(
        h,
        rng.standard_normal((9, 3)).astype(np.float32),
        np.zeros((2, 4), int),
        mask,
        correctness=True,
    )
    assert [float(x[0]) for x in got] == [0.0, 0.0, 0.0, np.inf, 0.0]


def test_teacher_forced_exact_match_implies_greedy_generation(tiny_base):
    """If every label (eos included) is the strict argmax, greedy generation reproduces
    the target and stops, so the generation metric's exact match is 1 as well.

    The tiny model's eos embedding row is scaled up (tied head) so that some greedy
    answers stop; each answer becomes a target. Answers of bytes that are not valid
    UTF-8 decode to U+FFFD and re-encode to other tokens (teacher forcing then says
    not exact: one of the differences listed in `ExampleScores`)."""
    from d2c_jax.evaluate import exact_match
    from d2c_jax.examples import encode_examples
    from d2c_jax.generation import generate
    from d2c_jax.models import BaseModel
    from d2c_jax.scoring import example_nll

    weights = jax.tree.map(np.array, tiny_base.model.weights())
    weights["embed"][tiny_base.tokenizer.eos_token_id] *= 3.0
    model = type(tiny_base.model)(tiny_base.config, weights)
    base = BaseModel(model, tiny_base.tokenizer, name="tiny-llama", source="tiny")
    rng = np.random.default_rng(0)
    prompts = ["".join(rng.choice(list("abcdefgh xyz"), rng.integers(2, 9))) for _ in range(32)]
    answers = generate(base, None, prompts, max_new_tokens=12, chat_template=False)
    examples = [
        {"prompt": p, "target": a} for p, a in zip(prompts, answers, strict=True) if a.strip()
    ]
    # a target one byte off an exactly reproduced one is never exact
    examples += [{"prompt": e["prompt"], "target": e["target"][:-1] + "q"} for e in examples]
    enc = encode_examples(base, examples, task_key=None)
    score = jax.jit(example_nll, static_argnames="correctness")
    got = score(base, None, 1.0, enc.tokens, enc.loss_mask, correctness=True)
    exact = np.asarray(got.exact) == 1
    assert exact.sum() >= 3
    np.testing.assert_array_equal(exact, np.asarray(got.margin) > 0)
    longest = int(enc.num_labels.max())
    again = generate(base, None, [e["prompt"] for e in examples], longest + 4, chat_template=False)
    for i in np.flatnonzero(exact):
        assert again[i] == examples[i]["target"]
        assert exact_match([again[i]], [examples[i]["target"]]) == 1.0
    half = len(examples) // 2
    for i in np.flatnonzero(exact[:half]):
        assert not exact[half + i] and again[half + i] != examples[half + i]["target"]
