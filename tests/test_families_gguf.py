"""Every family llama.cpp runs, as GGUF: our loader, llama.cpp's logits, and export.

For each family with a llama.cpp architecture, a tiny random transformers model (as in
`tests/test_families.py`, with settings llama.cpp can express: its Gemma softmax scale
is the head size, its Gemma 3 pattern is five local layers to one global) is written as
an F32 GGUF the way llama.cpp's converter writes it: its tensor names, q/k rows
permuted for the architectures it permutes, Gemma's norms stored as ``1 + w``. Then

* our GGUF loader gives the logits of our Hugging Face loader (which
  `tests/test_families.py` checks against transformers) within 1e-5;
* llama.cpp (llama-cpp-python) on that file gives our logits within 2e-4 (5e-3 for
  GELU families, see `_atol`): llama.cpp is the independent reference for every naming,
  permutation, norm and pattern rule;
* an adapter exported by `d2c export`'s writer on every linear module loads in llama.cpp
  without a warning and its logits follow ours as closely.
"""

from __future__ import annotations

import numpy as np
import pytest

from d2c_jax.export import GGUFBase, write_gguf_adapter
from d2c_jax.models import load_base
from d2c_jax.models.families import family
from tests.conftest import llama_cpp_permute, random_lora
from tests.test_families import CASES, COMMON, _torch_model

torch = pytest.importorskip("torch")
llama_cpp = pytest.importorskip("llama_cpp")

# model_type -> config overrides llama.cpp can express (CASES' where they already can)
GGUF_CASES = {
    "llama": CASES["llama"][0],
    "qwen2": dict(),  # llama.cpp's qwen2 has no sliding window
    "qwen3": dict(),
    "gemma2": dict(
        sliding_window=8,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=20.0,
        final_logit_softcapping=10.0,
        tie_word_embeddings=True,
    ),
    "gemma3_text": dict(
        num_hidden_layers=6, sliding_window=8, query_pre_attn_scalar=16, tie_word_embeddings=True
    ),
    "phi3": dict(
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
        }
    ),
    "olmo2": dict(),
    "smollm3": dict(num_hidden_layers=4),  # llama.cpp: no RoPE in every fourth layer
    "granite": CASES["granite"][0],
}


def _kv(writer, config) -> None:
    """The metadata llama.cpp reads for this family (``<arch>.<key>``)."""
    c, arch = config, writer.arch
    writer.add_block_count(c.num_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.rotary_dim)
    if c.sliding_window:
        writer.add_sliding_window(c.sliding_window)
    if c.attn_softcap:
        writer.add_float32(f"{arch}.attn_logit_softcapping", c.attn_softcap)
    if c.final_softcap:
        writer.add_float32(f"{arch}.final_logit_softcapping", c.final_softcap)
    if arch == "granite":
        writer.add_float32(f"{arch}.embedding_scale", c.embed_scale)
        writer.add_float32(f"{arch}.residual_scale", c.residual_multiplier)
        writer.add_float32(f"{arch}.attention.scale", c.attention_scale)
        writer.add_float32(f"{arch}.logit_scale", 1.0 / c.logit_scale)


def _tokenizer_kv(writer, tokenizer) -> None:
    """The tiny byte-level vocabulary, with byte 0xFF's symbol respelled "ab" so the one
    merge llama.cpp asks for ("a b") has its result in the vocabulary (ids are fed
    directly; no test text has that byte)."""
    tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    tokens[tokens.index("\u00ff")] = "ab"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)


def write_family_gguf(path, base) -> None:
    """`base`'s weights as llama.cpp's converter writes its family (see module docstring)."""
    import gguf

    config = base.config
    fam = family(config.model_type)
    shift = np.float32(fam.gguf_norm_shift)
    weights = base.model.weights()
    writer = gguf.GGUFWriter(str(path), fam.gguf_arch)
    writer.add_name("tiny")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _kv(writer, config)
    _tokenizer_kv(writer, base.tokenizer)
    f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
    writer.add_tensor("token_embd.weight", f32(weights["embed"]))
    writer.add_tensor("output_norm.weight", f32(weights["final_norm"]) + shift)
    if "lm_head" in weights:
        writer.add_tensor("output.weight", f32(weights["lm_head"]))
    heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}
    heads.update(q_bias=config.num_heads, k_bias=config.num_kv_heads)
    for key, stacked in weights["layers"].items():
        suffix = "bias" if key.endswith("_bias") else "weight"
        for layer in range(config.num_layers):
            w = f32(stacked[layer])
            if fam.gguf_permute_qk and key in heads:
                w = f32(llama_cpp_permute(w, heads[key]))
            if key.endswith("norm"):
                w = w + shift
            writer.add_tensor(f"blk.{layer}.{fam.gguf_names[key]}.{suffix}", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=sorted(GGUF_CASES))
def gguf_case(request, tmp_path_factory, tiny_tokenizer):
    """``(our base from the HF directory, the same model as GGUF, the GGUF's path)``."""
    model_type = request.param
    model = _torch_model(model_type, overrides=GGUF_CASES[model_type])
    path = tmp_path_factory.mktemp(f"gguf_{model_type}")
    model.save_pretrained(str(path / "hf"))
    tiny_tokenizer.save_pretrained(str(path / "hf"))
    hf_base = load_base(str(path / "hf"))
    write_family_gguf(path / "tiny.gguf", hf_base)
    return hf_base, load_base(str(path / "tiny.gguf")), path / "tiny.gguf"


def _atol(config) -> float:
    """2e-4, or 5e-3 where the MLP is GELU: ggml evaluates GELU from an f16 table, about
    1e-3 off per activation (a semantic error shows as differences near 1)."""
    return 5e-3 if config.hidden_act == "gelu_tanh" else 2e-4


def _ids(n=40, seed=1):
    return np.random.default_rng(seed).integers(3, COMMON["vocab_size"], n).astype(np.int32)


def _llama(path, lora=None):
    return llama_cpp.Llama(
        model_path=str(path),
        lora_path=None if lora is None else str(lora),
        logits_all=True,
        n_ctx=64,
        n_batch=64,
        n_threads=2,
        seed=0,
        verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )


def _cpp_logits(llm, ids):
    llm.reset()
    llm.eval([int(i) for i in ids])
    return np.array(llm.scores[: len(ids)], np.float32)


def test_gguf_loads_as_the_hf_model(gguf_case):
    hf_base, gguf_base, _ = gguf_case
    assert gguf_base.config == hf_base.config
    ids = _ids()[None]
    np.testing.assert_allclose(
        np.asarray(gguf_base.model(ids)), np.asarray(hf_base.model(ids)), atol=1e-5, rtol=0
    )


def test_llama_cpp_logits_and_exported_adapter(gguf_case, tmp_path, capfd):
    hf_base, gguf_base, path = gguf_case
    ids = _ids()
    ours = np.asarray(gguf_base.model(ids[None]))[0]
    atol = _atol(gguf_base.config)
    np.testing.assert_allclose(_cpp_logits(_llama(path), ids), ours, atol=atol, rtol=0)

    config = gguf_base.config
    params = random_lora(config, modules=config.lora_modules, rank=4, seed=3, std=0.3)
    base = GGUFBase.read(path)
    write_gguf_adapter(tmp_path / "a.gguf", params, 1.5, base, dtype="f32")
    capfd.readouterr()
    llm = _llama(path, tmp_path / "a.gguf")
    lora_lines = [line for line in capfd.readouterr().err.splitlines() if "lora" in line.lower()]
    assert not [line for line in lora_lines if "warn" in line.lower() or "error" in line.lower()]
    with_adapter = np.asarray(gguf_base.model(ids[None], adapter=params, scale=1.5))[0]
    assert np.abs(with_adapter - ours).max() > 0.1  # the adapter matters
    np.testing.assert_allclose(_cpp_logits(llm, ids), with_adapter, atol=atol, rtol=0)
