"""Generation: batched greedy decoding with a KV cache under base + one adapter.

`generate(base, adapter, prompts, max_new_tokens, chat_template)` is what ``d2c
generate`` and held-out evaluation (`d2c_jax.evaluate`) call. Prompts are
left-padded to a length bucket and decoded ``batch_size`` at a time by one jitted
``lax.while_loop`` (`_generate_tokens`): tokens ``[B, P]`` in, ``[B, max_new_tokens]``
out, KV cache ``[layers, B, P + max_new_tokens, kv_heads, head_dim]`` twice.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from d2c_jax.adapters import as_single_adapter
from d2c_jax.examples import DEFAULT_BUCKET, round_up
from d2c_jax.models.decoder import check_adapter, forward_hidden, logits_from_hidden


def _stop_ids(tokenizer) -> tuple[int, ...]:
    ids = {int(tokenizer.eos_token_id)}
    end = tokenizer.get_vocab().get("<|endoftext|>")
    if end is not None:
        ids.add(int(end))
    return tuple(sorted(ids))


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "stop_ids"))
def _generate_tokens(base, adapter, scale, tokens, valid, *, max_new_tokens, stop_ids):
    """Greedy decoding of left-padded prompts ``tokens [B, P]`` (``valid`` marks real
    tokens) with a KV cache; returns ``[B, max_new_tokens]`` (stop id repeated after a
    stop)."""
    model = getattr(base, "model", base)
    c = model.config
    b, p = tokens.shape
    s = p + max_new_tokens
    dtype = model.embed[...].dtype
    cache_shape = (c.num_layers, b, s, c.num_kv_heads, c.head_dim)
    cache = (jnp.zeros(cache_shape, dtype), jnp.zeros(cache_shape, dtype))
    key_valid = jnp.concatenate([valid, jnp.ones((b, max_new_tokens), bool)], axis=1)
    slots = jnp.arange(s)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    n_valid = valid.sum(axis=1).astype(jnp.int32)
    # every cache slot's position, for sliding-window layers
    new_positions = n_valid[:, None] + jnp.arange(max_new_tokens, dtype=jnp.int32)
    key_positions = jnp.concatenate([positions, new_positions], axis=1)
    mask = key_valid[:, None, :] & (slots[None, None, :] <= jnp.arange(p)[None, :, None])
    hidden, cache = forward_hidden(
        model,
        tokens,
        adapter=adapter,
        scale=scale,
        positions=positions,
        mask=mask,
        cache=cache,
        cache_index=0,
        key_positions=key_positions,
    )
    first = jnp.argmax(logits_from_hidden(model, hidden[:, -1]), axis=-1).astype(jnp.int32)
    stops = jnp.asarray(stop_ids, jnp.int32)
    out = jnp.full((b, max_new_tokens), stop_ids[0], jnp.int32)

    def cond(state):
        step, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, nxt, done, out = state
        out = out.at[:, step].set(jnp.where(done, stop_ids[0], nxt))
        done = done | jnp.isin(nxt, stops)
        slot = p + step
        step_mask = key_valid[:, None, :] & (slots <= slot)[None, None, :]
        h, cache = forward_hidden(
            model,
            nxt[:, None],
            adapter=adapter,
            scale=scale,
            positions=(n_valid + step)[:, None],
            mask=step_mask,
            cache=cache,
            cache_index=slot,
            key_positions=key_positions,
        )
        nxt = jnp.argmax(logits_from_hidden(model, h[:, 0]), axis=-1).astype(jnp.int32)
        return step + 1, cache, nxt, done, out

    state = (jnp.asarray(0, jnp.int32), cache, first, jnp.zeros((b,), bool), out)
    *_, out = jax.lax.while_loop(cond, body, state)
    return out


def generate(
    base,
    adapter,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    chat_template: bool = True,
    *,
    scale: float | None = None,
    batch_size: int = 16,
    bucket: int = DEFAULT_BUCKET,
) -> list[str]:
    """Batched greedy generation with a KV cache; stops at eos (or ``<|endoftext|>``).

    Args:
      base: `BaseModel`.
      adapter: None, or an adapter as accepted by `as_single_adapter` (factor form
        needs `scale`).
      prompts: user messages (``chat_template=True``: wrapped as one user turn with
        the tokenizer's chat template and tokenized without special tokens) or raw
        text (``chat_template=False``: tokenized with ``add_special_tokens=True``).
      max_new_tokens: generation length limit.
      batch_size: prompts per jitted call (prompts are left-padded to a bucket).

    Returns the decoded continuations (special tokens skipped; not stripped).
    """
    params, scale = as_single_adapter(adapter, scale)
    if params is not None:
        check_adapter(base.config, params)
    tok = base.tokenizer
    if chat_template and not tok.chat_template:
        raise ValueError(
            f"the tokenizer of base model {base.name!r} has no chat template "
            "(a pretrained, not instruction-tuned, model?): give raw prompts (d2c generate --raw)"
        )
    if chat_template:
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
        ids = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    else:
        ids = tok(list(prompts), add_special_tokens=True)["input_ids"] if prompts else []
    stop_ids = _stop_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]
    results: list[str] = []
    for lo in range(0, len(ids), batch_size):
        group = ids[lo : lo + batch_size]
        longest = max(len(x) for x in group)
        if longest + max_new_tokens > base.config.context_limit:
            raise ValueError(
                f"prompt of {longest} tokens + {max_new_tokens} new tokens exceed the context "
                f"of {base.config.context_limit}"
            )
        p_len = round_up(longest, bucket)
        rows = len(group)
        b = batch_size if len(ids) > batch_size else rows  # fixed batch shape across groups
        tokens = np.full((b, p_len), pad, np.int32)
        valid = np.zeros((b, p_len), bool)
        for i in range(b):
            x = group[min(i, rows - 1)]
            tokens[i, p_len - len(x) :] = x
            valid[i, p_len - len(x) :] = True
        out = np.asarray(
            _generate_tokens(
                base,
                params,
                jnp.asarray(scale, jnp.float32),
                tokens,
                valid,
                max_new_tokens=max_new_tokens,
                stop_ids=stop_ids,
            )
        )
        for row in out[:rows]:
            row = list(row)
            cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
            results.append(tok.decode(row[:cut], skip_special_tokens=True))
    return results
