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
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DEFAULT_VOCAB_CHUNK = 8192


def _chunking(vocab: int, vocab_chunk: int) -> tuple[int, int]:
    """(number of chunks, chunk size) covering `vocab` with chunks of at most `vocab_chunk`."""
    n = max(1, math.ceil(vocab / max(1, vocab_chunk)))
    return n, math.ceil(vocab / n)


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
        running_max, running_sum = carry
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
        return (new_max, running_sum), None

    n = hidden.shape[0]
    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32))
    if n_chunks == 1:
        (running_max, running_sum), _ = body(init, (chunks[0], starts[0]))
    else:
        (running_max, running_sum), _ = jax.lax.scan(body, init, (chunks, starts))
    target = cap(
        jnp.einsum("nd,nd->n", h, head[labels].astype(h.dtype), preferred_element_type=jnp.float32)
    )
    return running_max + jnp.log(running_sum) - target


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
    nll = token_nll(flat, head, labels.reshape(b * p), vocab_chunk, softcap).reshape(b, p)
    return jnp.where(mask, nll, 0.0), mask, pos


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
) -> jax.Array:
    """Per-example mean label NLL ``[M]`` (float32).

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

    Examples without any label get NLL 0.
    """
    nll, valid, _ = label_nll(
        hidden,
        head,
        tokens,
        loss_mask,
        max_labels=max_labels,
        vocab_chunk=vocab_chunk,
        final_norm=final_norm,
        softcap=softcap,
    )
    count = valid.sum(axis=1).astype(jnp.float32)
    return nll.sum(axis=1) / jnp.maximum(count, 1.0)


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
) -> jax.Array:
    """Per-example mean label NLL ``[num_examples]`` of *packed* rows.

    Several examples share a row of ``hidden [R, T, d]``; ``slots [R, T]`` gives the
    example (``0..num_examples-1``) each token belongs to (any value on padding, which
    has no labels). Label NLLs are summed per example with a segment sum.
    """
    nll, valid, pos = label_nll(
        hidden,
        head,
        tokens,
        loss_mask,
        max_labels=max_labels,
        vocab_chunk=vocab_chunk,
        final_norm=final_norm,
        softcap=softcap,
    )
    slot = jnp.take_along_axis(slots[:, 1:], pos, axis=1)
    slot = jnp.where(valid, slot, num_examples).reshape(-1)
    sums = jax.ops.segment_sum(nll.reshape(-1), slot, num_segments=num_examples + 1)
    counts = jax.ops.segment_sum(
        valid.reshape(-1).astype(jnp.float32), slot, num_segments=num_examples + 1
    )
    return sums[:num_examples] / jnp.maximum(counts[:num_examples], 1.0)
