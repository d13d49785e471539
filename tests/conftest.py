"""Shared test fixtures: tiny random models and a tokenizer that need no network.

Fixtures (use them in any test module, no import needed):

* ``tiny_tokenizer`` (session): a byte-level BPE fast tokenizer with 259 tokens:
  ``<|endoftext|>`` (0, document start, prepended by ``add_special_tokens=True``),
  ``<|im_start|>`` (1), ``<|im_end|>`` (2, eos and pad), then the 256 byte symbols;
  no merges, so every UTF-8 byte is one token. It carries SmolLM2's chat template.
* ``tiny_config`` (session): a 2-layer Llama `DecoderConfig` (hidden 64, 4 heads / 2 KV
  heads of dim 16, FFN 128, vocab 259, context 256, tied embeddings).
* ``tiny_base`` (session): a `BaseModel` with random weights (std 0.1, so logits are
  far from uniform) and ``tiny_tokenizer``; ``name="tiny-llama"``.
* ``make_tiny_base``: factory ``make_tiny_base(config=None, seed=0, std=0.1,
  name="tiny-llama") -> BaseModel``.
* ``make_lora``: factory ``make_lora(config, modules=("q_proj", "v_proj"), rank=4,
  n=None, seed=0, std=0.1) -> {module: {"A", "B"}}`` (NumPy float32; single adapter
  ``[L, ...]`` or stacked ``[n, L, ...]``); B is non-zero so the adapter changes
  the outputs.
* ``tiny_examples``: 12 prompt/target dicts over 3 tasks (``"task"`` key).
* ``write_jsonl``: ``write_jsonl(path, rows) -> path`` writes JSONL (dict rows are
  dumped, string rows written as they are, e.g. a malformed line).
* ``tiny_hf_dir`` (session): the ``tiny_base`` written as a Hugging Face directory
  (``config.json``, ``model.safetensors``, ``tokenizer.json``), loadable by
  ``load_base(str(path))`` and by transformers.
* ``real_base`` (session, mark the test ``@pytest.mark.slow``): the embedded
  SmolLM2-135M-Instruct via ``load_base("default")``.

* ``user_cache_dir`` (session, automatic): ``$D2C_JAX_CACHE`` points to a temp dir.
* ``release_compiled_programs`` (module, automatic): drops JAX's compiled programs
  after each test module (see its docstring).
* ``make_tiny_config``: factory ``make_tiny_config(**overrides) -> DecoderConfig`` (e.g.
  ``model_type="qwen2", attention_bias=True, tie_word_embeddings=False``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from d2c_jax.models import ensure_document_start

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS)}
    for ch in sorted(bytes_to_unicode().values()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=TINY_CHAT_TEMPLATE,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(TINY_SPECIALS)})
    return ensure_document_start(tokenizer)


def tiny_llama_config(**overrides):
    from d2c_jax.models import DecoderConfig

    fields = dict(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=256,
    )
    fields.update(overrides)
    return DecoderConfig(**fields)


def build_tiny_base(tokenizer, config=None, seed=0, std=0.1, name="tiny-llama", dtype=None):
    import jax.numpy as jnp

    from d2c_jax.models import BaseModel, Decoder, init_weights

    config = config or tiny_llama_config()
    weights = init_weights(config, seed=seed, std=std)
    model = Decoder(config, weights, dtype=dtype or jnp.float32)
    return BaseModel(model, tokenizer, name=name, source="tiny")


def random_lora(config, modules=("q_proj", "v_proj"), rank=4, n=None, seed=0, std=0.1):
    rng = np.random.default_rng(seed)
    lead = () if n is None else (n,)
    out = {}
    for m in modules:
        d_out, d_in = config.module_shape(m)
        a = std * rng.standard_normal((*lead, config.num_layers, rank, d_in))
        b = std * rng.standard_normal((*lead, config.num_layers, d_out, rank))
        out[m] = {"A": a.astype(np.float32), "B": b.astype(np.float32)}
    return out


def save_random_library(path, config, names, seed=0, std=0.1, rank=4, alpha=8):
    """Write a library directory of random float32 PEFT adapters, one per name."""
    import jax.numpy as jnp

    from d2c_jax.library import save_peft_adapter

    params = random_lora(config, rank=rank, n=len(names), seed=seed, std=std)
    for i, name in enumerate(names):
        save_peft_adapter(
            Path(path) / name,
            {m: {f: jnp.asarray(x[i]) for f, x in fs.items()} for m, fs in params.items()},
            rank=rank,
            alpha=alpha,
            base_model="tiny-llama",
            dtype=jnp.float32,
        )


TINY_TASKS = {
    "upper": [
        ("shout: cat", "CAT"),
        ("shout: dog", "DOG"),
        ("shout: sun", "SUN"),
        ("shout: sky", "SKY"),
    ],
    "reverse": [
        ("reverse: abc", "cba"),
        ("reverse: hello", "olleh"),
        ("reverse: jax", "xaj"),
        ("reverse: tree", "eert"),
    ],
    "count": [
        ("count: a b c", "3"),
        ("count: x y", "2"),
        ("count: p q r s", "4"),
        ("count: z", "1"),
    ],
}


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
    """Clear JAX's compilation caches after every test module.

    Each program XLA:CPU compiles keeps about three memory mappings until its cache
    entry goes; the whole suite compiles enough programs in one process to pass
    Linux's default ``vm.max_map_count`` (65,530), where the next compilation dies
    with a segmentation fault."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session", autouse=True)
def user_cache_dir(tmp_path_factory):
    """Every test's d2c-jax user cache (``$D2C_JAX_CACHE``, e.g. `d2c evaluate`'s
    single-adapter results) lies in a session temp dir, never in ``~/.cache``."""
    import os

    path = tmp_path_factory.mktemp("user_cache")
    previous = os.environ.get("D2C_JAX_CACHE")
    os.environ["D2C_JAX_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("D2C_JAX_CACHE", None)
    else:
        os.environ["D2C_JAX_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_config():
    return tiny_llama_config()


@pytest.fixture(scope="session")
def tiny_base(tiny_tokenizer, tiny_config):
    return build_tiny_base(tiny_tokenizer, tiny_config)


@pytest.fixture
def make_tiny_base(tiny_tokenizer):
    def make(config=None, seed=0, std=0.1, name="tiny-llama", dtype=None):
        return build_tiny_base(tiny_tokenizer, config, seed=seed, std=std, name=name, dtype=dtype)

    return make


@pytest.fixture
def make_tiny_config():
    return tiny_llama_config


@pytest.fixture
def make_lora():
    return random_lora


@pytest.fixture
def tiny_examples():
    return [
        {"prompt": p, "target": t, "task": task}
        for task, pairs in TINY_TASKS.items()
        for p, t in pairs
    ]


@pytest.fixture
def write_jsonl():
    """``write_jsonl(path, rows) -> path``: rows are dicts (dumped) or raw lines."""

    def write(path, rows):
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        return path

    return write


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tiny_base):
    from d2c_jax.models.hf import save_hf_weights

    path = tmp_path_factory.mktemp("tiny_hf")
    weights = {k: np.asarray(v) for k, v in tiny_base.model.weights().items() if k != "layers"}
    weights["layers"] = {k: np.asarray(v) for k, v in tiny_base.model.weights()["layers"].items()}
    save_hf_weights(path, tiny_base.config, weights, extra_config={"_name_or_path": "tiny-llama"})
    tiny_base.tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def real_base():
    from d2c_jax.models import load_base

    return load_base("default")


def numpy_weights(model) -> dict:
    """A model's weights as NumPy arrays (``layers`` stacked ``[L, ...]``)."""
    w = model.weights()
    out = {k: np.asarray(v) for k, v in w.items() if k != "layers"}
    out["layers"] = {k: np.asarray(v) for k, v in w["layers"].items()}
    return out


def llama_cpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (q/k rows for its RoPE)."""
    split = w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
    return split.swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_names() -> dict[str, str]:
    """Our weight names -> llama.cpp's (the norms, then the export's module names;
    llama.cpp itself rejects a file whose names are wrong)."""
    from d2c_jax.models.decoder import SPLIT_MODULES
    from d2c_jax.models.families.base import LLAMA_GGUF_NAMES

    names = ("attn_norm", "mlp_norm", *SPLIT_MODULES)
    return {name: LLAMA_GGUF_NAMES[name] for name in names}


def write_tiny_gguf(path, config, weights, tokenizer, added=None, merges=()):
    """A llama-arch F32 GGUF in llama.cpp's conventions (q/k rows permuted by the
    converter's own rule, `llama_cpp_permute`). ``added``: ``{tensor name: array}`` added
    to the file-layout weights; ``merges``: BPE merges (llama.cpp refuses a gpt2
    vocabulary without any; our loader needs none)."""
    import gguf

    added = added or {}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    writer.add_token_merges(list(merges))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    writer.add_tensor("token_embd.weight", weights["embed"])
    writer.add_tensor("output_norm.weight", weights["final_norm"])
    for layer in range(config.num_layers):
        for key, gname in gguf_tensor_names().items():
            w = weights["layers"][key][layer]
            if key in ("q_proj", "k_proj"):
                w = llama_cpp_permute(
                    w, config.num_heads if key == "q_proj" else config.num_kv_heads
                )
            name = f"blk.{layer}.{gname}.weight"
            writer.add_tensor(name, np.ascontiguousarray(w + added.get(name, 0.0), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
