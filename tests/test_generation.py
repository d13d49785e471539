"""`d2c_jax.generation`: KV-cache greedy decoding, and the `generate` CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from d2c_jax.cli import main as cli_main
from d2c_jax.generation import generate
from d2c_jax.models import forward_hidden, logits_from_hidden


@jax.jit
def _last_logits(base, adapter, scale, tokens, length):
    h, _ = forward_hidden(base, tokens, adapter=adapter, scale=scale)
    return logits_from_hidden(base, h[0, length - 1])


def greedy_without_cache(base, adapter, scale, ids, steps, width=64):
    """Reference greedy decoding: a full forward per step on a right-padded buffer."""
    buf = np.zeros((1, width), np.int32)
    buf[0, : len(ids)] = ids
    n, out = len(ids), []
    for _ in range(steps):
        nxt = int(jnp.argmax(_last_logits(base, adapter, scale, buf, n)))
        out.append(nxt)
        buf[0, n] = nxt
        n += 1
    return out


def test_generation_with_kv_cache_matches_plain_greedy(tiny_base, make_lora):
    tok = tiny_base.tokenizer
    lora = make_lora(tiny_base.config, seed=3)
    prompts = ["hi", "a much longer prompt here", "mid size"]
    for adapter in (None, lora):
        outs = generate(
            tiny_base, adapter, prompts, max_new_tokens=6, chat_template=False, scale=2.0
        )
        for prompt, out in zip(prompts, outs, strict=True):
            ref = greedy_without_cache(tiny_base, adapter, 2.0, tok(prompt)["input_ids"], 6)
            stops = {tok.eos_token_id, 0}
            cut = next((i for i, t in enumerate(ref) if t in stops), len(ref))
            assert out == tok.decode(ref[:cut], skip_special_tokens=True)
    # batching in several groups gives the same as one group
    again = generate(tiny_base, None, prompts, max_new_tokens=6, chat_template=True, batch_size=2)
    assert again == generate(tiny_base, None, prompts, max_new_tokens=6, chat_template=True)


def test_cli_generate(tiny_hf_dir, capsys):
    code = cli_main(
        [
            "generate",
            "--base",
            str(tiny_hf_dir),
            "--prompt",
            "hello",
            "--prompt",
            "x",
            "--max-new-tokens",
            "4",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["prompt"] for o in out] == ["hello", "x"]
