"""Masked next-token cross-entropy without materialising full logits.

The LM head of SmolLM2 maps 576 features to 49,152 logits: for 8 candidates x 10
examples x 64 tokens the float32 logits alone would be about 1 GB. Here the logits are
produced one vocabulary chunk at a time inside a ``lax.scan`` that keeps a running
(max, sum-exp) pair per token, so peak memory is ``tokens x vocab_chunk``. The target
logit is a row gather of the head followed by a dot product. Each chunk body is
rematerialised under ``jax.checkpoint`` so the backward pass (LoRA training) also never
stores more than one chunk of logits.

Conventions (the loss contract of ``docs/ARCHITECTURE.md``): ``loss_mask[m, t] = 1``
marks token ``t`` of example ``m`` as a *label* (a target token or the final eos); it
is predicted from the hidden state at ``t - 1``, so ``loss_mask[:, 0]`` must be 0. An
example's loss is the mean NLL over its labels. Accumulation is float32 whatever the
model dtype.

Teacher-forced correctness from the same pass (``correctness=True``): the scan also
keeps, per label, the target's logit and the running max of the *other* logits (the
target column is masked in each chunk), so an example's exact match, token accuracy
and smallest margin come with its NLL at the cost of two masked maxima per chunk
(`ExampleScores`). A label counts as correct when its target is the *strict* argmax
(``margin = logit_target - max_other > 0``): a tie is wrong, although greedy decoding
(``jnp.argmax``, the lowest index among equal logits) may still pick the target, so a
teacher-forced exact match of 1 is a conservative statement about greedy decoding.
Target and other logits come from the same chunk GEMM (after the soft cap, if any),
so tied logits compare equal. Without the flag the scan body, the results and the
cost are those of the NLL alone.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

DEFAULT_VOCAB_CHUNK = 8192


class ExampleScores(NamedTuple):
    """Per-example teacher-forced scores, each ``[M]`` float32 (``correctness=True``).

    Attributes:
      nll: mean label NLL (what the functions return without ``correctness``).
      exact: 1 if every label (eos included) is the strict argmax of its logits, else 0.
        If it is 1, greedy decoding from the prompt reproduces the target and the eos
        (below: where the normalised generation metric can differ).
      accuracy: fraction of the labels that are the strict argmax.
      margin: smallest ``logit_target - max_other`` over the labels (> 0 iff ``exact``).
      soft: mean over labels of ``sigmoid(logit_target - max_other)``, the target's
        probability in a two-way softmax against its best rival: a smooth, bounded,
        parameter-free surrogate of ``accuracy``.

    An example without labels (a padding slot) has nll 0, exact 0, accuracy 0, soft 0
    and margin +inf.

    Against the generation metric (`d2c_jax.evaluate`: the greedy answer's first
    non-empty line, stripped, compared as text with the normalised target), ``exact =
    1`` implies a generated exact match: greedy decoding emits the target's tokens and
    then a stop, the answer decodes to the target text (byte-level BPE round-trips
    valid UTF-8) and both sides are normalised alike. That needs ``max_new_tokens`` to
    cover the target, the prompt tokenized as in scoring (``chat_template=False``, as
    evaluation does), and generation's logits (KV cache, one position at a time) to
    round like the teacher-forced ones: a margin within float rounding of 0 can flip.
    The converse does not hold; generation also counts as matched: an answer that
    goes on after the target on a new line instead of stopping (normalisation cuts
    it; here the eos label is wrong), blank lines or spaces around the target, the
    same text spelled as other tokens (a tokenizer with merges), special tokens that
    decoding skips, a tie that ``argmax`` breaks towards the target, and a multi-line
    target whose first line is reproduced. Invalid UTF-8 bytes decode to U+FFFD, so
    an answer's text need not re-encode to the tokens that produced it.
    """

    nll: jax.Array
    exact: jax.Array
    accuracy: jax.Array
    margin: jax.Array
    soft: jax.Array


def _chunking(vocab: int, vocab_chunk: int) -> tuple[int, int]:
    """(number of chunks, chunk size) covering `vocab` with chunks of at most `vocab_chunk`."""
    n = max(1, math.ceil(vocab / max(1, vocab_chunk)))
    return n, math.ceil(vocab / n)


def _token_terms(hidden, head, labels, vocab_chunk: int, softcap: float, correctness: bool):
    """The streamed scan shared by `token_nll` and `token_logits`: ``(nll, target,
    other)``, each ``[N]`` float32; ``target`` and ``other`` are None unless
    `correctness` (static: without it the scan is the NLL's alone)."""
    cap = lambda z: z if softcap <= 0 else softcap * jnp.tanh(z / softcap)
    vocab, dim = head.shape
    n_chunks, size = _chunking(vocab, vocab_chunk)
    padded = n_chunks * size
    if padded != vocab:
        head = jnp.pad(head, ((0, padded - vocab), (0, 0)))
    chunks = head.reshape(n_chunks, size, dim)
    starts = jnp.arange(n_chunks, dtype=jnp.int32) * size
    h = hidden

    @jax.checkpoint
    def body(carry, xs):
        running_max, running_sum = carry[:2]
        w, start = xs
        logits = cap(
            jnp.einsum("nd,vd->nv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
        )
        if padded != vocab:
            valid = (start + jnp.arange(size)) < vocab
            logits = jnp.where(valid[None, :], logits, -jnp.inf)
        new_max = jnp.maximum(running_max, logits.max(axis=-1))
        running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.exp(
            logits - new_max[:, None]
        ).sum(axis=-1)
        if not correctness:
            return (new_max, running_sum), None
        # [n, size]: each row's target column, where it falls in this chunk
        hit = (start + jnp.arange(size, dtype=jnp.int32))[None, :] == labels[:, None]
        target = jnp.maximum(carry[2], jnp.where(hit, logits, -jnp.inf).max(axis=-1))
        other = jnp.maximum(carry[3], jnp.where(hit, -jnp.inf, logits).max(axis=-1))
        return (new_max, running_sum, target, other), None

    n = hidden.shape[0]
    low = jnp.full((n,), -jnp.inf, jnp.float32)
    init = (low, jnp.zeros((n,), jnp.float32)) + ((low, low) if correctness else ())
    if n_chunks == 1:
        carry, _ = body(init, (chunks[0], starts[0]))
    else:
        carry, _ = jax.lax.scan(body, init, (chunks, starts))
    running_max, running_sum = carry[:2]
    target = cap(
        jnp.einsum("nd,nd->n", h, head[labels].astype(h.dtype), preferred_element_type=jnp.float32)
    )
    nll = running_max + jnp.log(running_sum) - target
    return (nll, *carry[2:]) if correctness else (nll, None, None)


def token_nll(
    hidden: jax.Array,
    head: jax.Array,
    labels: jax.Array,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    softcap: float = 0.0,
) -> jax.Array:
    """``-log softmax(hidden @ head^T)[label]`` for ``hidden [N, d]``, ``head [V, d]``,
    ``labels [N]`` -> ``[N]`` float32, computed over vocabulary chunks.

    ``softcap > 0`` caps every logit as ``softcap * tanh(logit / softcap)`` first (Gemma 2's
    final logit soft-capping)."""
    return _token_terms(hidden, head, labels, vocab_chunk, softcap, False)[0]


def token_logits(
    hidden: jax.Array,
    head: jax.Array,
    labels: jax.Array,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    softcap: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`token_nll` plus, from the same scan, the target logit and the largest other logit:
    ``(nll, target, other)``, each ``[N]`` float32, for ``hidden [N, d]``, ``head [V, d]``,
    ``labels [N]``. ``other`` is -inf for a one-token vocabulary. ``target`` is read from
    the chunk GEMM (the NLL keeps its row-gather dot product, so it is unchanged), so it
    compares with ``other`` exactly as the logits of two tokens compare."""
    return _token_terms(hidden, head, labels, vocab_chunk, softcap, True)


def label_positions(loss_mask: jax.Array, max_labels: int) -> tuple[jax.Array, jax.Array]:
    """Indices ``[..., P]`` of the first `max_labels` labelled positions of each row of
    ``loss_mask [..., T]`` (in order) and their validity ``[..., P]``.

    Rows with more than `max_labels` labels are truncated: the caller chooses
    ``max_labels >= loss_mask.sum(-1).max()`` (bucketed) to keep every label.
    """
    mask = loss_mask > 0
    order = jnp.argsort(~mask, axis=-1, stable=True)[..., :max_labels]
    valid = jnp.take_along_axis(mask, order, axis=-1)
    return order.astype(jnp.int32), valid


def label_nll(
    hidden: jax.Array,
    head: jax.Array,
    tokens: jax.Array,
    loss_mask: jax.Array,
    *,
    max_labels: int | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    final_norm=None,
    softcap: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """NLL of the labels of each row: ``(nll [B, P], valid [B, P], position [B, P])``.

    ``position`` is the index (into ``tokens[:, 1:]``) of each label, so label ``p`` of
    row ``b`` is token ``position[b, p] + 1``. ``P = T - 1`` unless `max_labels` is set
    (see `masked_example_nll`). Invalid entries have ``nll = 0``.
    """
    (nll, _), valid, pos = _label_terms(
        hidden, head, tokens, loss_mask, max_labels, vocab_chunk, final_norm, softcap, False
    )
    return nll, valid, pos


def label_logits(
    hidden: jax.Array,
    head: jax.Array,
    tokens: jax.Array,
    loss_mask: jax.Array,
    *,
    max_labels: int | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    final_norm=None,
    softcap: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """`label_nll` plus each label's target logit and largest other logit (`token_logits`):
    ``(nll, target, other, valid, position)``, each ``[B, P]``. Invalid entries have
    ``nll = 0``, ``target = 0`` and ``other = 0``."""
    (nll, (target, other)), valid, pos = _label_terms(
        hidden, head, tokens, loss_mask, max_labels, vocab_chunk, final_norm, softcap, True
    )
    return nll, target, other, valid, pos


def _label_terms(
    hidden, head, tokens, loss_mask, max_labels, vocab_chunk, final_norm, softcap, correctness
):
    """Shared body of `label_nll` and `label_logits`: ``((nll, logits), valid, pos)``
    with ``logits = (target, other)`` ``[B, P]`` if `correctness`, else None."""
    b, t, d = hidden.shape
    labels = tokens[:, 1:]
    mask = loss_mask[:, 1:] > 0
    h = hidden[:, :-1]
    if max_labels is not None and max_labels < t - 1:
        pos, mask = label_positions(mask, max_labels)
        h = jnp.take_along_axis(h, pos[..., None], axis=1)
        labels = jnp.take_along_axis(labels, pos, axis=1)
    else:
        pos = jnp.broadcast_to(jnp.arange(t - 1, dtype=jnp.int32), (b, t - 1))
    if final_norm is not None:
        h = final_norm(h)
    p = h.shape[1]
    flat = h.reshape(b * p, d)
    terms = _token_terms(flat, head, labels.reshape(b * p), vocab_chunk, softcap, correctness)
    nll, target, other = (
        None if x is None else jnp.where(mask, x.reshape(b, p), 0.0) for x in terms
    )
    return (nll, None if target is None else (target, other)), mask, pos


def _example_scores(reduce_sum, reduce_min, nll, valid, logits):
    """Per-example mean NLL (``logits`` None) or `ExampleScores`, from per-label ``nll``,
    ``valid`` and ``logits = (target, other)`` reduced per example by `reduce_sum` /
    `reduce_min` (label arrays -> ``[M]``)."""
    count = jnp.maximum(reduce_sum(valid.astype(jnp.float32)), 1.0)
    mean_nll = reduce_sum(nll) / count
    if logits is None:
        return mean_nll
    target, other = logits
    margin = jnp.where(valid, target - other, jnp.inf)
    correct = valid & (margin > 0)  # strict: a tie with another token is wrong
    hits = reduce_sum(correct.astype(jnp.float32))
    labelled = reduce_sum(valid.astype(jnp.float32))
    return ExampleScores(
        nll=mean_nll,
        exact=((labelled > 0) & (hits == labelled)).astype(jnp.float32),
        accuracy=hits / count,
        margin=reduce_min(margin),
        soft=reduce_sum(jnp.where(valid, jax.nn.sigmoid(margin), 0.0)) / count,
    )


def masked_example_nll(
    hidden: jax.Array,
    head: jax.Array,
    tokens: jax.Array,
    loss_mask: jax.Array,
    *,
    max_labels: int | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    final_norm=None,
    softcap: float = 0.0,
    correctness: bool = False,
) -> jax.Array | ExampleScores:
    """Per-example mean label NLL ``[M]`` (float32), or `ExampleScores` with `correctness`.

    Args:
      hidden: ``[M, T, d]`` hidden states (after the final norm unless `final_norm`
        is given, a function applied to the selected states only).
      head: ``[V, d]`` output embedding (tied or not).
      tokens: ``[M, T]`` int token ids.
      loss_mask: ``[M, T]`` label mask (see module docstring).
      max_labels: if set, only the first `max_labels` label positions of each example
        go through the head (a static compaction: the head is about a fifth of
        SmolLM2's FLOPs per token, and prompts are not labels). Must be at least the
        largest label count, or labels are dropped.
      vocab_chunk: vocabulary chunk size of the streamed logsumexp.
      softcap: final logit soft cap (`token_nll`).
      correctness: static; also the teacher-forced exact match, token accuracy,
        smallest margin and soft accuracy of each example, from the same scan.

    Examples without any label get NLL 0.
    """
    (nll, logits), valid, _ = _label_terms(
        hidden, head, tokens, loss_mask, max_labels, vocab_chunk, final_norm, softcap, correctness
    )
    return _example_scores(lambda x: x.sum(axis=1), lambda x: x.min(axis=1), nll, valid, logits)


def packed_example_nll(
    hidden: jax.Array,
    head: jax.Array,
    tokens: jax.Array,
    loss_mask: jax.Array,
    slots: jax.Array,
    num_examples: int,
    *,
    max_labels: int | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    final_norm=None,
    softcap: float = 0.0,
    correctness: bool = False,
) -> jax.Array | ExampleScores:
    """Per-example mean label NLL ``[num_examples]`` of *packed* rows (or `ExampleScores`
    of ``[num_examples]`` arrays with `correctness`, as in `masked_example_nll`).

    Several examples share a row of ``hidden [R, T, d]``; ``slots [R, T]`` gives the
    example (``0..num_examples-1``) each token belongs to (any value on padding, which
    has no labels). Label terms are reduced per example with segment sums (and a
    segment min for the margin).
    """
    (nll, logits), valid, pos = _label_terms(
        hidden, head, tokens, loss_mask, max_labels, vocab_chunk, final_norm, softcap, correctness
    )
    slot = jnp.take_along_axis(slots[:, 1:], pos, axis=1)
    slot = jnp.where(valid, slot, num_examples).reshape(-1)
    segments = dict(segment_ids=slot, num_segments=num_examples + 1)
    return _example_scores(
        lambda x: jax.ops.segment_sum(x.reshape(-1), **segments)[:num_examples],
        lambda x: jax.ops.segment_min(x.reshape(-1), **segments)[:num_examples],
        nll,
        valid,
        logits,
    )
