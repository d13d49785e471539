"""Decoder, loaders and tokenizer: parity with transformers (torch) and the real model."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2c_jax.models import (
    DEFAULT_MODEL_NAME,
    BaseModel,
    Decoder,
    default_gguf_path,
    init_weights,
    load_base,
)
from d2c_jax.models.families import family, to_hf
from d2c_jax.models.gguf import unpermute_qk
from d2c_jax.models.hf import load_hf_weights
from tests.conftest import llama_cpp_permute, numpy_weights, write_tiny_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def torch_model(config, weights):
    """transformers' LlamaForCausalLM / Qwen2ForCausalLM holding the same weights."""
    tcfg = transformers.AutoConfig.for_model(**to_hf(config))
    model = transformers.AutoModelForCausalLM.from_config(tcfg, dtype=torch.float32).eval()
    state = {
        "model.embed_tokens.weight": weights["embed"],
        "model.norm.weight": weights["final_norm"],
    }
    if "lm_head" in weights:
        state["lm_head.weight"] = weights["lm_head"]
    for key, stacked in weights["layers"].items():
        for layer in range(config.num_layers):
            state[f"model.layers.{layer}.{family(config.model_type).hf_names[key]}"] = stacked[
                layer
            ]
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids)).long()).logits.numpy()


LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"model_type": "qwen2", "attention_bias": True, "tie_word_embeddings": False},
        {"tie_word_embeddings": False, "rope_scaling": LLAMA3_SCALING, "num_kv_heads": 1},
    ],
    ids=["llama-tied", "qwen2-bias-untied", "llama3-rope-scaling-mqa"],
)
def test_logits_match_transformers_tiny(overrides, make_tiny_config):
    config = make_tiny_config(**overrides)
    weights = init_weights(config, seed=1, std=0.1)
    ours = Decoder(config, weights)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (3, 48)).astype(np.int32)
    got = np.asarray(jax.jit(lambda m, t: m(t))(ours, ids))
    want = torch_logits(torch_model(config, weights), ids)
    assert np.abs(want).max() > 1.0  # logits far from uniform: a meaningful comparison
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    if "rope_scaling" in overrides:  # the scaling path is exercised, not a no-op
        plain = Decoder(make_tiny_config(**{**overrides, "rope_scaling": None}), weights)
        assert np.abs(np.asarray(plain(ids)) - want).max() > 1e-3


def test_hf_dir_roundtrip(tiny_hf_dir, tiny_base):
    base = load_base(str(tiny_hf_dir))
    assert base.config == tiny_base.config
    assert base.name == "tiny-llama"
    ids = np.asarray([base.tokenizer("hello world")["input_ids"]], np.int32)
    assert ids[0, 0] == 0  # document start survives save/load
    np.testing.assert_array_equal(np.asarray(base.model(ids)), np.asarray(tiny_base.model(ids)))
    # transformers reads the same directory and agrees
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_hf_dir), dtype=torch.float32)
    want = torch_logits(ref.eval(), ids)
    np.testing.assert_allclose(np.asarray(base.model(ids)), want, atol=1e-4)


def test_bfloat16_close_to_float32(tiny_base, make_tiny_base):
    import jax.numpy as jnp

    b16 = make_tiny_base(dtype=jnp.bfloat16)
    ids = np.random.default_rng(0).integers(0, 259, (2, 32)).astype(np.int32)
    f32 = np.asarray(tiny_base.model(ids))
    bf = np.asarray(b16.model(ids))
    assert b16.model.embed[...].dtype == jnp.bfloat16
    assert np.abs(f32 - bf).max() < 0.1 * np.abs(f32).max()


def test_unpermute_inverts_llama_cpp():
    w = np.arange(8 * 64 * 3, dtype=np.float32).reshape(8 * 64, 3)
    assert not np.array_equal(llama_cpp_permute(w, 8), w)
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, 8), 8), w)


def test_gguf_loader_and_cache(tmp_path, monkeypatch, tiny_base):
    monkeypatch.setenv("D2C_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tiny_base.config, numpy_weights(tiny_base.model), tiny_base.tokenizer)
    first = load_base(str(path))
    assert first.config == tiny_base.config
    entries = list((tmp_path / "cache" / "models").iterdir())
    assert len(entries) == 1 and (entries[0] / "weights.safetensors").is_file()
    second = load_base(str(path))  # from the cache
    ids = np.asarray([first.tokenizer("hello there")["input_ids"]], np.int32)
    assert ids[0, 0] == 0 and first.tokenizer.eos_token_id == 2
    assert second.tokenizer("hello there")["input_ids"] == list(ids[0])
    want = np.asarray(tiny_base.model(ids))
    np.testing.assert_allclose(np.asarray(first.model(ids)), want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(second.model(ids)), want, atol=1e-6)


def test_unknown_base_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_base(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="directory has no config.json"):
        load_base(str(tmp_path / "empty"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="GGUF"):
        load_base(str(bad))


def test_hf_dir_errors(tmp_path, tiny_hf_dir):
    d = tmp_path / "m"
    d.mkdir()
    cfg = json.loads((tiny_hf_dir / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type"):
        load_base(str(d))
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf_weights(d)


def test_base_model_is_a_pytree(tiny_base):
    leaves, treedef = jax.tree.flatten(tiny_base)
    assert all(isinstance(x, jax.Array) for x in leaves)
    again = jax.tree.unflatten(treedef, leaves)
    assert isinstance(again, BaseModel) and again.tokenizer is tiny_base.tokenizer
    assert tiny_base.module_shapes(("q_proj", "k_proj", "down_proj")) == {
        "q_proj": (64, 64),
        "k_proj": (32, 64),
        "down_proj": (64, 128),
    }


# ------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_default_model_facts(real_base):
    c = real_base.config
    assert default_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert real_base.name == DEFAULT_MODEL_NAME
    assert (c.num_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.rope_theta == 100000.0 and c.tie_word_embeddings
    tok = real_base.tokenizer
    assert tok.eos_token_id == 2 and tok.convert_ids_to_tokens(2) == "<|im_end|>"
    # document start: <|endoftext|> (id 0) with add_special_tokens=True, nothing without
    assert tok("Hello")["input_ids"] == [0, 19556]
    assert tok("Hello", add_special_tokens=False)["input_ids"] == [19556]
    # SmolLM2 splits digits one by one before byte-level BPE
    ids = tok("12345", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["1", "2", "3", "4", "5"]
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_real_model_matches_transformers(real_base, tmp_path):
    """SmolLM2 logits vs transformers on the same (dequantized) weights.

    Tolerance 2e-3 absolute on logits of magnitude up to ~30: at the document-start
    position SmolLM2's residual stream reaches |h| ~ 2e4 (a "massive activation"),
    where one float32 ulp is ~2e-3. Measured against a float64 torch reference, torch
    float32 is off by ~1e-4 and ours by ~9e-4 (different GEMM accumulation order); the
    other positions agree to ~2e-4. A wrong RoPE permutation or norm gives errors of
    order 1-10. Greedy tokens must agree exactly.
    """
    from d2c_jax.models.hf import save_hf_weights

    save_hf_weights(tmp_path, real_base.config, numpy_weights(real_base.model))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    text = "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and"
    ids = np.asarray([real_base.tokenizer(text)["input_ids"]], np.int32)
    want = torch_logits(ref.eval(), ids)
    got = np.asarray(jax.jit(lambda b, t: b.model(t))(real_base, ids))
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)
    np.testing.assert_allclose(got[:, 1:], want[:, 1:], atol=5e-4, rtol=0)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.slow
def test_real_model_answers_paris(real_base):
    from d2c_jax.generation import generate

    out = generate(
        real_base,
        None,
        ["What is the capital of France?", "Name a primary color."],
        max_new_tokens=16,
        chat_template=True,
    )
    assert "Paris" in out[0], out


@pytest.mark.slow
def test_real_model_nll_is_sane(real_base):
    from d2c_jax.scoring import example_nll

    sentences = [
        "The sun rises in the east and sets in the west.",
        "She opened the window to let some fresh air into the room.",
        "Water boils at one hundred degrees Celsius at sea level.",
    ]
    tok = real_base.tokenizer
    ids = [tok(s)["input_ids"] for s in sentences]
    t_len = max(map(len, ids))
    tokens = np.zeros((len(ids), t_len), np.int32)
    mask = np.zeros((len(ids), t_len), np.float32)
    for i, x in enumerate(ids):
        tokens[i, : len(x)] = x
        mask[i, 1 : len(x)] = 1.0
    nll = np.asarray(jax.jit(example_nll)(real_base, None, 1.0, tokens, mask))
    # plain English under a 135M instruct model: ~2-3.5 nats/token (uniform would be 10.8;
    # the q/k permutation bug gives ~3.5 on such text but breaks chat answers)
    assert 1.0 < nll.mean() < 4.0, nll
    assert jnp.isfinite(nll).all()
