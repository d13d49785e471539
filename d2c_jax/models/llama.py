"""Llama-family decoder (Llama 2/3.x, SmolLM, Qwen2-style qkv bias) in Flax NNX.

The model is `LlamaForCausalLM`, an ``nnx.Module`` whose per-layer weights are
stacked along a leading layer axis ``L`` (so the forward is one ``lax.scan`` over
layers and compiles once, whatever the depth). In Flax 0.12 an NNX module is a JAX
pytree, so it can be passed straight into ``jax.jit`` / ``jax.vmap`` /
``jax.value_and_grad`` (its `config` is static pytree metadata).

Weights use Hugging Face / PEFT orientation ``[d_out, d_in]`` and PEFT module names:

    embed [V, d]               final_norm [d]           lm_head [V, d] (untied only)
    layers.attn_norm [L, d]    layers.mlp_norm [L, d]
    layers.q_proj [L, Hq*hd, d]   layers.k_proj / v_proj [L, Hkv*hd, d]
    layers.o_proj [L, d, Hq*hd]   layers.q_bias / k_bias / v_bias [L, out] (attention_bias)
    layers.gate_proj / up_proj [L, F, d]   layers.down_proj [L, d, F]

RoPE is the "rotate half" form of Hugging Face (the GGUF loader undoes llama.cpp's
interleaving permutation of q/k rows before weights get here).

Adapters enter the forward as ``{module: {"A": [L, r, d_in], "B": [L, d_out, r]}}``
with a scalar ``scale``, or as dense deltas ``{module: {"delta": [L, d_out, d_in]}}``
(scale folded in); see `kernels.lora`. A candidate axis is added by ``jax.vmap``
over the adapter (and the tokens) with the model unbatched.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels.lora import lora_linear

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NORM_NAMES = ("attn_norm", "mlp_norm")
BIAS_NAMES = ("q_bias", "k_bias", "v_bias")

Weights = dict[str, Any]  # {"embed", "final_norm", ["lm_head"], "layers": {name: [L, ...]}}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family decoder. Frozen and hashable (static under jit).

    `rope_scaling` is a tuple of ``(key, value)`` pairs (hashable) in Hugging Face's
    ``rope_scaling`` vocabulary; types ``"llama3"`` and ``"linear"`` are supported.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0 means hidden_size // num_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # bias on q, k, v (Qwen2)
    max_position_embeddings: int = 2048
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    model_type: str = "llama"  # "llama" or "qwen2": only used when writing config.json

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.rope_scaling is not None:
            kind = dict(self.rope_scaling).get("rope_type", dict(self.rope_scaling).get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise ValueError(f"rope_scaling type {kind!r} is not supported (llama3, linear)")

    # ----------------------------------------------------------------- shapes

    def module_shape(self, module: str) -> tuple[int, int]:
        """``(d_out, d_in)`` of a LoRA-able module."""
        d, f = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shapes = {
            "q_proj": (q, d),
            "k_proj": (kv, d),
            "v_proj": (kv, d),
            "o_proj": (d, q),
            "gate_proj": (f, d),
            "up_proj": (f, d),
            "down_proj": (d, f),
        }
        if module not in shapes:
            raise ValueError(f"unknown module {module!r}; expected one of {LORA_MODULES}")
        return shapes[module]

    def flops_per_token(self, context: int = 0) -> float:
        """Forward FLOPs per token: 2 x (matmul weights incl. the head) + attention."""
        matmul = sum(math.prod(self.module_shape(m)) for m in LORA_MODULES) * self.num_layers
        head = self.vocab_size * self.hidden_size
        attn = 2 * self.num_layers * self.num_heads * self.head_dim * context
        return 2.0 * (matmul + head) + 2.0 * attn

    # ------------------------------------------------------------ HF config

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> LlamaConfig:
        """From a Hugging Face ``config.json`` dict (llama, mistral-free llama-likes, qwen2)."""
        model_type = cfg.get("model_type", "llama")
        if model_type not in ("llama", "qwen2"):
            raise ValueError(f"model_type {model_type!r} is not supported (llama, qwen2)")
        if model_type == "qwen2" and cfg.get("use_sliding_window", False):
            raise ValueError("qwen2 with use_sliding_window=true is not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg.get('hidden_act')!r} is not supported (silu)")
        if cfg.get("mlp_bias", False):
            raise ValueError("mlp_bias=true is not supported")
        heads = cfg["num_attention_heads"]
        scaling = cfg.get("rope_scaling")
        theta = cfg.get("rope_theta")
        params = cfg.get("rope_parameters")  # transformers 5 nests rope settings here
        if isinstance(params, Mapping):
            theta = params.get("rope_theta", theta)
            if params.get("rope_type", "default") != "default":
                scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        if isinstance(scaling, Mapping):
            if scaling.get("rope_type", scaling.get("type")) == "default":
                scaling = None
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rope_theta=float(theta if theta is not None else 10000.0),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),  # HF default
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            model_type=model_type,
        )

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict for this architecture."""
        cfg = {
            "architectures": [
                "Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"
            ],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
        }
        if self.model_type == "llama":
            cfg["attention_bias"] = self.attention_bias
            cfg["mlp_bias"] = False
        elif not self.attention_bias:
            raise ValueError("a qwen2 config always has attention bias")
        return cfg


# --------------------------------------------------------------------- weights


def weight_shapes(config: LlamaConfig) -> Weights:
    """Shapes of every weight in the canonical layout (see module docstring)."""
    c = config
    layers = {
        "attn_norm": (c.num_layers, c.hidden_size),
        "mlp_norm": (c.num_layers, c.hidden_size),
    }
    for m in LORA_MODULES:
        layers[m] = (c.num_layers, *c.module_shape(m))
    if c.attention_bias:
        for name, m in zip(BIAS_NAMES, ("q_proj", "k_proj", "v_proj"), strict=True):
            layers[name] = (c.num_layers, c.module_shape(m)[0])
    shapes: Weights = {
        "embed": (c.vocab_size, c.hidden_size),
        "final_norm": (c.hidden_size,),
        "layers": layers,
    }
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (c.vocab_size, c.hidden_size)
    return shapes


def init_weights(config: LlamaConfig, seed: int = 0, std: float = 0.02) -> Weights:
    """Random weights (NumPy float32): normal(std) matrices and biases, norms near 1."""
    rng = np.random.default_rng(seed)

    def make(name, shape):
        if name.endswith("norm"):
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (std * rng.standard_normal(shape)).astype(np.float32)

    shapes = weight_shapes(config)
    out: Weights = {k: make(k, v) for k, v in shapes.items() if k != "layers"}
    out["layers"] = {k: make(k, v) for k, v in shapes["layers"].items()}
    return out


def check_weights(config: LlamaConfig, weights: Weights, source: str = "weights") -> None:
    """Raise ValueError naming the first missing, extra or mis-shaped weight."""
    expected = weight_shapes(config)
    flat_expected = {k: v for k, v in expected.items() if k != "layers"}
    flat_expected.update({f"layers.{k}": v for k, v in expected["layers"].items()})
    flat = {k: v for k, v in weights.items() if k != "layers"}
    flat.update({f"layers.{k}": v for k, v in weights.get("layers", {}).items()})
    missing = sorted(set(flat_expected) - set(flat))
    extra = sorted(set(flat) - set(flat_expected))
    if missing or extra:
        raise ValueError(f"{source}: missing weights {missing}, unexpected weights {extra}")
    for k, shape in flat_expected.items():
        if tuple(flat[k].shape) != tuple(shape):
            raise ValueError(f"{source}: {k} has shape {tuple(flat[k].shape)}, expected {shape}")


class LlamaLayers(nnx.Module):
    """The decoder layers' weights, each stacked along a leading layer axis."""

    def __init__(self, layers: Mapping[str, Any], dtype):
        for name, value in layers.items():
            setattr(self, name, nnx.Param(jnp.asarray(value, dtype)))
        self.names = tuple(sorted(layers))

    def as_dict(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.names}


class LlamaForCausalLM(nnx.Module):
    """Llama-family causal LM. ``model(tokens)`` returns logits ``[B, T, V]``.

    Prefer `forward_hidden` + `kernels.loss` for losses (no full logits), and the
    functions of `d2c_jax.scoring` for scoring many adapters.
    """

    def __init__(self, config: LlamaConfig, weights: Weights | None = None, *, dtype=jnp.float32):
        if weights is None:
            weights = init_weights(config)
        check_weights(config, weights)
        self.config = config
        self.dtype = jnp.dtype(dtype).name
        self.embed = nnx.Param(jnp.asarray(weights["embed"], dtype))
        self.final_norm = nnx.Param(jnp.asarray(weights["final_norm"], dtype))
        untied = not config.tie_word_embeddings
        self.lm_head = nnx.Param(jnp.asarray(weights["lm_head"], dtype)) if untied else None
        self.layers = LlamaLayers(weights["layers"], dtype)

    def head(self) -> jax.Array:
        """The ``[V, d]`` output projection (the embedding when tied)."""
        return self.embed[...] if self.lm_head is None else self.lm_head[...]

    def weights(self) -> Weights:
        """The weights as a plain dict of arrays (canonical layout)."""
        out = {
            "embed": self.embed[...],
            "final_norm": self.final_norm[...],
            "layers": self.layers.as_dict(),
        }
        if self.lm_head is not None:
            out["lm_head"] = self.lm_head[...]
        return out

    def __call__(self, tokens, adapter=None, scale=1.0, positions=None):
        hidden, _ = forward_hidden(self, tokens, adapter=adapter, scale=scale, positions=positions)
        return logits_from_hidden(self, hidden)


# --------------------------------------------------------------------- math


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Hugging Face LlamaRMSNorm: normalise in float32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies ``[head_dim / 2]`` (float32), with llama3 scaling if configured."""
    hd = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    scaling = dict(config.rope_scaling or ())
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old = scaling.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    elif kind == "linear":
        inv = inv / scaling["factor"]
    return inv.astype(np.float32)


def rope_tables(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[..., T, head_dim]`` (float32) for integer ``positions [..., T]``."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(config))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on ``x [B, T, H, hd]`` with tables ``[B, T, hd]``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x.dtype)


def attention(q, k, v, mask, num_kv_heads: int) -> jax.Array:
    """Grouped-query attention. ``q [B, T, Hq, hd]``, ``k, v [B, S, Hkv, hd]``,
    ``mask [B, T, S]`` (True = may attend) -> ``[B, T, Hq * hd]``."""
    b, t, hq, hd = q.shape
    g = hq // num_kv_heads
    q = q.reshape(b, t, num_kv_heads, g, hd)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(hd)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, hq * hd)


def _layer_slice(adapter, module):
    return None if adapter is None else adapter.get(module)


def decoder_layer(
    config: LlamaConfig, x, lw, la, scale, cos, sin, mask, cache=None, cache_index=None
):
    """One decoder layer on ``x [B, T, d]``.

    `lw` holds this layer's weights, `la` this layer's adapter slices (or None).
    With `cache` = ``(k, v)`` each ``[B, S, Hkv, hd]``, the new keys and values are
    written at slot `cache_index` and attention runs over all S slots under `mask`
    ``[B, T, S]``; returns ``(x, new_cache)``.
    """
    c = config
    b, t, _ = x.shape
    bias = lambda name: lw.get(name) if c.attention_bias else None
    h = rms_norm(x, lw["attn_norm"], c.rms_norm_eps)
    q = lora_linear(h, lw["q_proj"], bias("q_bias"), _layer_slice(la, "q_proj"), scale)
    k = lora_linear(h, lw["k_proj"], bias("k_bias"), _layer_slice(la, "k_proj"), scale)
    v = lora_linear(h, lw["v_proj"], bias("v_bias"), _layer_slice(la, "v_proj"), scale)
    q = apply_rope(q.reshape(b, t, c.num_heads, c.head_dim), cos, sin)
    k = apply_rope(k.reshape(b, t, c.num_kv_heads, c.head_dim), cos, sin)
    v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
    if cache is not None:
        ck, cv = cache
        k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=1)
        cache = (k, v)
    a = attention(q, k, v, mask, c.num_kv_heads)
    x = x + lora_linear(a, lw["o_proj"], None, _layer_slice(la, "o_proj"), scale)
    h = rms_norm(x, lw["mlp_norm"], c.rms_norm_eps)
    gate = lora_linear(h, lw["gate_proj"], None, _layer_slice(la, "gate_proj"), scale)
    up = lora_linear(h, lw["up_proj"], None, _layer_slice(la, "up_proj"), scale)
    x = x + lora_linear(
        jax.nn.silu(gate) * up, lw["down_proj"], None, _layer_slice(la, "down_proj"), scale
    )
    return x, cache


def _as_model(model):
    # BaseModel (d2c_jax.models) wraps the module; accept either.
    return getattr(model, "model", model)


def check_adapter(config: LlamaConfig, adapter: Mapping[str, Mapping[str, Any]] | None) -> None:
    """Raise ValueError if an adapter's modules or shapes do not fit `config`.

    Accepts single-adapter leaves (``A [L, r, d_in]``) or any number of leading batch
    axes (``A [..., L, r, d_in]``)."""
    if adapter is None:
        return
    for module, leaves in adapter.items():
        d_out, d_in = config.module_shape(module)
        if "delta" in leaves:
            got = tuple(leaves["delta"].shape[-3:])
            want = (config.num_layers, d_out, d_in)
        else:
            a, b = leaves["A"], leaves["B"]
            got = (a.shape[-3], a.shape[-1], b.shape[-2], a.shape[-2] == b.shape[-1])
            want = (config.num_layers, d_in, d_out, True)
        if got != want:
            raise ValueError(
                f"adapter module {module!r} does not fit this base model "
                f"(layers {config.num_layers}, d_out {d_out}, d_in {d_in}): "
                f"got {jax.tree.map(lambda x: tuple(x.shape), dict(leaves))}"
            )


def forward_hidden(
    model,
    tokens: jax.Array,
    *,
    adapter: Mapping[str, Mapping[str, jax.Array]] | None = None,
    scale: jax.Array | float = 1.0,
    positions: jax.Array | None = None,
    mask: jax.Array | None = None,
    cache: tuple[jax.Array, jax.Array] | None = None,
    cache_index: jax.Array | int = 0,
    final_norm: bool = True,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Hidden states ``[B, T, d]`` (after the final norm unless ``final_norm=False``).

    Args:
      model: `LlamaForCausalLM` (or a BaseModel wrapping one).
      tokens: ``[B, T]`` int token ids.
      adapter: one adapter, ``{module: {"A": [L, r, d_in], "B": [L, d_out, r]}}`` with
        `scale`, or ``{module: {"delta": [L, d_out, d_in]}}``; None for the base model.
      positions: ``[B, T]`` RoPE positions (default ``0..T-1``).
      mask: ``[B, T, S]`` attention mask (default causal over T; right padding needs no
        mask because no real token attends to a later slot).
      cache: ``(k, v)`` each ``[L, B, S, Hkv, hd]``: write this block at `cache_index`
        and attend over the cache (then `mask` is required). Returns the new cache.
    """
    model = _as_model(model)
    c = model.config
    b, t = tokens.shape
    x = model.embed[...][tokens]
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if mask is None:
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    cos, sin = rope_tables(c, positions)
    layers = model.layers.as_dict()

    def body(x, xs):
        lw, la, layer_cache = xs
        x, new_cache = decoder_layer(c, x, lw, la, scale, cos, sin, mask, layer_cache, cache_index)
        return x, new_cache

    x, new_cache = jax.lax.scan(body, x, (layers, adapter, cache))
    if final_norm:
        x = rms_norm(x, model.final_norm[...], c.rms_norm_eps)
    return x, new_cache


def logits_from_hidden(model, hidden: jax.Array) -> jax.Array:
    """Full logits ``[..., V]`` (float32). Only for few positions (generation, tests)."""
    model = _as_model(model)
    head = model.head()
    return jnp.einsum(
        "...d,vd->...v", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32
    )
