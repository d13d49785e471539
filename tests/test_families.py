"""Every model family against transformers + PEFT (torch), on tiny random models.

Each family's model is built and saved by transformers itself (hidden 64, three layers,
a sliding window of 8 where the family has one, shorter than the 24-token test
sequence), with every parameter perturbed (norm weights away from 1 or 0, biases away
from 0) so a missing ``1 + w``, bias or norm cannot pass. Our `load_base` reads the
directory; logits must match transformers' within 1e-4 (float32) with no adapter, with
a PEFT adapter on q and v (q, k, v fused for Phi-3) and on every linear module, and
greedy generation must give the same 16 tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

from d2c_jax.generation import generate
from d2c_jax.library import AdapterLibrary
from d2c_jax.models import load_base
from d2c_jax.models.families import FAMILIES

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SLIDE, FULL = "sliding_attention", "full_attention"
COMMON = dict(
    vocab_size=259,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    tie_word_embeddings=False,
)
GEMMA = dict(sliding_window=8, query_pre_attn_scalar=24, hidden_activation="gelu_pytorch_tanh")
# model_type -> (config overrides, PEFT's attention modules of the "q,v" adapter)
CASES = {
    "llama": (dict(attention_bias=True), ("q_proj", "v_proj")),
    "mistral": (dict(sliding_window=8), ("q_proj", "v_proj")),
    "qwen2": (
        dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
        ("q_proj", "v_proj"),
    ),
    "qwen3": (
        dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
        ("q_proj", "v_proj"),
    ),
    "gemma2": (
        dict(
            **GEMMA,
            attn_logit_softcapping=20.0,
            final_logit_softcapping=10.0,
            tie_word_embeddings=True,
        ),
        ("q_proj", "v_proj"),
    ),
    "gemma3_text": (
        dict(
            **GEMMA,
            tie_word_embeddings=True,
            layer_types=[SLIDE, SLIDE, FULL],
            rope_parameters={
                SLIDE: {"rope_type": "default", "rope_theta": 10000.0},
                FULL: {"rope_type": "default", "rope_theta": 1000000.0},
            },
        ),
        ("q_proj", "v_proj"),
    ),
    "phi3": (
        dict(
            sliding_window=8,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
            },
        ),
        ("qkv_proj",),
    ),
    "olmo2": (dict(), ("q_proj", "v_proj")),
    "smollm3": (dict(no_rope_layers=[1, 0, 1]), ("q_proj", "v_proj")),
    "granite": (
        dict(
            embedding_multiplier=3.0,
            residual_multiplier=0.5,
            attention_multiplier=0.2,
            logits_scaling=4.0,
        ),
        ("q_proj", "v_proj"),
    ),
}
TEXT = ["the quick brown fox jumps over it", "a b c d e f g h i j k l m n o p q r s"]


def _perturb(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.15 * torch.randn(p.shape, generator=gen))


def _torch_model(model_type, seed=0, overrides=None):
    """A tiny random transformers model of a family (`CASES` settings unless given)."""
    overrides = CASES[model_type][0] if overrides is None else overrides
    cfg = transformers.AutoConfig.for_model(model_type, **{**COMMON, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    _perturb(model, seed)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def family_case(request, tmp_path_factory, tiny_tokenizer):
    """``(model_type, torch model, our BaseModel, token ids [2, T])`` for one family."""
    model_type = request.param
    model = _torch_model(model_type)
    path = tmp_path_factory.mktemp(model_type)
    model.save_pretrained(str(path))
    tiny_tokenizer.save_pretrained(str(path))
    base = load_base(str(path))
    ids = tiny_tokenizer(TEXT, add_special_tokens=True)["input_ids"]
    length = min(len(x) for x in ids)
    assert length > 2 * 8  # longer than the sliding window
    return model_type, model, base, np.array([x[:length] for x in ids], np.int32)


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.numpy()


def _lora(model, tmp_path, modules, seed):
    """A PEFT adapter with non-zero B on `modules`, saved and read back by us."""
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(modules), init_lora_weights=False
    )
    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(model, config)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    library = AdapterLibrary.load([tmp_path / "adapter"])
    params = {m: {k: np.asarray(v[0]) for k, v in f.items()} for m, f in library.params.items()}
    return peft_model, params, float(np.asarray(library.scale)[0])


def test_registry_covers_the_families():
    assert set(CASES) | {"gemma3"} == set(FAMILIES)


def test_logits_match_transformers(family_case):
    model_type, model, base, ids = family_case
    ours = np.asarray(base.model(ids))
    np.testing.assert_allclose(ours, _torch_logits(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("which", ["attention", "all_linear"])
def test_logits_with_peft_adapter(family_case, tmp_path, which):
    model_type, model, base, ids = family_case
    modules = CASES[model_type][1] if which == "attention" else base.config.lora_modules
    fresh = _torch_model(model_type)  # PEFT wraps the model in place
    peft_model, params, scale = _lora(fresh, tmp_path, modules, seed=1)
    assert set(params) == set(modules)
    theirs = _torch_logits(peft_model, ids)
    ours = np.asarray(base.model(ids, adapter=params, scale=scale))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    assert np.abs(theirs - _torch_logits(model, ids)).max() > 1e-2  # the adapter matters


def test_greedy_generation_matches(family_case, tiny_tokenizer):
    model_type, model, base, _ = family_case
    prompt = "tell me a story"
    ids = tiny_tokenizer(prompt, add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=2
        )[0, len(ids) :].tolist()
    cut = out.index(2) if 2 in out else len(out)
    theirs = tiny_tokenizer.decode(out[:cut], skip_special_tokens=True)
    ours = generate(base, None, [prompt], max_new_tokens=16, chat_template=False)[0]
    assert ours == theirs


# ------------------------------------------------------------ the real Gemma 3 270M

REAL_TEXT = (
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"
)


@pytest.mark.slow
def test_real_gemma3_matches_transformers_and_llama_cpp():
    """`--base gemma3-270m` against transformers' Gemma3ForCausalLM on the same GGUF
    (dequantized by transformers, float32) and against llama.cpp on the file itself.

    transformers: logits within 5e-4 (measured 3.8e-5: the same float32 weights, another
    summation order through 18 layers). llama.cpp multiplies quantized weights by
    8-bit-quantized activations, so only its argmax is compared; its distance to ours is
    reported as the floor an exported adapter's logits are judged against.
    """
    from d2c_jax.models import KNOWN_BASES
    from d2c_jax.models.loading import GEMMA3_MODEL_NAME, gemma3_gguf_path

    base = load_base("gemma3-270m")
    assert KNOWN_BASES[base.fingerprint] == GEMMA3_MODEL_NAME
    path = gemma3_gguf_path()
    ids = base.tokenizer(REAL_TEXT, add_special_tokens=True)["input_ids"]
    assert ids[0] == 2  # Gemma's tokenizer adds its BOS
    ours = np.asarray(base.model(np.array([ids], np.int32)))[0]
    assert base.tokenizer.decode([int(ours[-1].argmax())]).strip() == "Rome"

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    assert type(model).__name__ == "Gemma3ForCausalLM"
    theirs = _torch_logits(model, np.array([ids]))[0]
    print("gemma3-270m: max |transformers - ours| logit", np.abs(theirs - ours).max())
    np.testing.assert_allclose(ours, theirs, atol=5e-4, rtol=0)

    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(
        model_path=str(path),
        logits_all=True,
        n_ctx=128,
        n_threads=2,
        verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )
    llm.eval([int(i) for i in ids])
    cpp = np.array(llm.scores[: len(ids)], np.float32)
    print("gemma3-270m: max |llama.cpp - ours| logit (quantized floor)", np.abs(cpp - ours).max())
    assert (cpp.argmax(-1) == ours.argmax(-1)).mean() >= 0.9
