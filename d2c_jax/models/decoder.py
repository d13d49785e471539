"""The decoder every model family runs: one Flax NNX module, its config, its forward.

Families (`d2c_jax.models.families`) differ in a handful of named choices, not in
structure: where the RMSNorms sit (`norm_layout`), whether a norm scales by ``w`` or
``1 + w`` (`norm_offset`), q/k norms per head or over the projection (`qk_norm`), the
MLP activation, soft-capping, multipliers, fused projections, and which layers use a
sliding window or no RoPE. `DecoderConfig` names each choice; a family module maps
its ``config.json`` / GGUF metadata onto them and its weight names onto ours. Scoring,
generation, training, merging checks and export see only this module.

Weights use Hugging Face / PEFT orientation ``[d_out, d_in]``, stacked along a leading
layer axis ``L`` so the forward is one ``lax.scan`` (compiles once, whatever the depth):

    embed [V, d]   final_norm [d]   lm_head [V, d] (untied only)
    layers.attn_norm / mlp_norm [L, d]               (pre norms: "pre", "sandwich")
    layers.post_attn_norm / post_mlp_norm [L, d]     (after the block: "sandwich", "post")
    layers.q_norm / k_norm [L, hd] ("head") or [L, H*hd] ("projection")
    layers.q_proj [L, Hq*hd, d]   k_proj / v_proj [L, Hkv*hd, d]   o_proj [L, d, Hq*hd]
    layers.qkv_proj [L, (Hq+2Hkv)*hd, d]                             (fused_qkv, Phi-3)
    layers.q_bias / k_bias / v_bias [L, out]                         (attention_bias)
    layers.o_bias [L, d]                                             (output_bias)
    layers.gate_proj / up_proj [L, F, d]   down_proj [L, d, F]
    layers.gate_up_proj [L, 2F, d]                                   (fused_gate_up)

Per-layer choices (sliding window, RoPE on or off, local RoPE base) travel through the
scan as ``[L]`` arrays, so a 5:1 local/global stack is still one compiled layer.

Adapters enter as ``{module: {"A": [L, r, d_in], "B": [L, d_out, r]}}`` with a scalar
``scale``, or as dense ``{module: {"delta": [L, d_out, d_in]}}`` (scale folded in); module
names are the family's (`DecoderConfig.lora_modules`). A candidate axis is added by
``jax.vmap`` over the adapter (and the tokens) with the model unbatched.
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

FULL, SLIDING = "full_attention", "sliding_attention"
SPLIT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
NORM_LAYOUTS = {
    "pre": ("attn_norm", "mlp_norm"),
    "sandwich": ("attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm"),
    "post": ("post_attn_norm", "post_mlp_norm"),
}
ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "longrope")
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}

Weights = dict[str, Any]  # {"embed", "final_norm", ["lm_head"], "layers": {name: [L, ...]}}


def _freeze(value):
    """Hashable form of a JSON-like value (dicts become sorted pairs, lists tuples)."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value):
    if (
        isinstance(value, tuple)
        and value
        and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in value)
    ):
        return {k: _thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a decoder-only LM. Frozen and hashable (static under jit).

    A zero means "the usual value" where noted, so families set only what they change.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    model_type: str = "llama"  # the family's registry key (Hugging Face `model_type`)
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 2048
    # attention
    attention_bias: bool = False  # bias on q, k, v
    output_bias: bool = False  # bias on o_proj (Llama's attention_bias sets both; Qwen2 has none)
    qk_norm: str = "none"  # "head": per head before RoPE (Qwen3, Gemma 3); "projection" (OLMo 2)
    attention_scale: float = 0.0  # softmax scale; 0: head_dim ** -0.5
    attn_softcap: float = 0.0  # scores -> cap * tanh(scores / cap) (Gemma 2); 0: off
    layer_types: tuple[str, ...] = ()  # per layer FULL or SLIDING; (): all FULL
    sliding_window: int = 0  # a SLIDING layer's query sees keys less than this many back
    # rotary embedding
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # HF rope parameters (type, factor, ...) as pairs
    rope_local_theta: float = 0.0  # SLIDING layers' base (Gemma 3); 0: rope_theta
    partial_rotary_factor: float = 1.0  # rotate only this leading fraction of each head
    rope_layers: tuple[bool, ...] = ()  # per layer: RoPE on (SmolLM3's NoPE layers); ()
    # block
    norm_layout: str = "pre"  # see NORM_LAYOUTS
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + w): 1.0 for Gemma
    hidden_act: str = "silu"  # "silu" or "gelu_tanh"
    fused_qkv: bool = False  # one qkv_proj (Phi-3)
    fused_gate_up: bool = False  # one gate_up_proj, gate first (Phi-3)
    # multipliers
    embed_scale: float = 1.0  # embeddings x this (Gemma: sqrt(hidden); Granite)
    residual_multiplier: float = 1.0  # block outputs x this before the residual add (Granite)
    logit_scale: float = 1.0  # logits x this (Granite: 1 / logits_scaling)
    final_softcap: float = 0.0  # logits -> cap * tanh(logits / cap) (Gemma 2); 0: off

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        if self.head_dim == 0:
            set_("head_dim", self.hidden_size // self.num_heads)
        if not self.layer_types:
            set_("layer_types", (FULL,) * self.num_layers)
        if not self.rope_layers:
            set_("rope_layers", (True,) * self.num_layers)
        set_("layer_types", tuple(self.layer_types))
        set_("rope_layers", tuple(bool(x) for x in self.rope_layers))
        if self.rope_scaling is not None:
            set_("rope_scaling", _freeze(dict(_thaw(self.rope_scaling))) or None)
        self._validate()

    def _validate(self):
        problems = []
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads={self.num_heads} is not a multiple of {self.num_kv_heads}")
        if len(self.layer_types) != self.num_layers or set(self.layer_types) - {FULL, SLIDING}:
            problems.append(f"layer_types {self.layer_types} (one of {FULL}, {SLIDING} per layer)")
        if SLIDING in self.layer_types and self.sliding_window <= 0:
            problems.append("sliding layers need sliding_window > 0")
        if len(self.rope_layers) != self.num_layers:
            problems.append(f"rope_layers has {len(self.rope_layers)} entries, not one per layer")
        if self.rope_type not in ROPE_TYPES:
            problems.append(
                f"rope type {self.rope_type!r} is not supported ({', '.join(ROPE_TYPES)})"
            )
        if self.norm_layout not in NORM_LAYOUTS:
            problems.append(f"norm_layout {self.norm_layout!r}")
        if self.qk_norm not in ("none", "head", "projection"):
            problems.append(f"qk_norm {self.qk_norm!r}")
        if self.hidden_act not in ACTIVATIONS:
            problems.append(f"hidden_act {self.hidden_act!r} is not supported (silu, gelu_tanh)")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            problems.append(f"partial_rotary_factor {self.partial_rotary_factor}")
        if problems:
            raise ValueError("unsupported architecture: " + "; ".join(problems))

    # ------------------------------------------------------------------ derived

    @property
    def rope_type(self) -> str:
        scaling = dict(self.rope_scaling or ())
        return scaling.get("rope_type", scaling.get("type", "default"))

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def context_limit(self) -> int:
        """Longest sequence this config computes exactly (dynamic / long RoPE switch
        their frequencies past their original context, which we do not)."""
        scaling = dict(self.rope_scaling or ())
        if self.rope_type == "longrope":
            return int(
                scaling.get("original_max_position_embeddings", self.max_position_embeddings)
            )
        return self.max_position_embeddings

    @property
    def lora_modules(self) -> tuple[str, ...]:
        """The linear modules an adapter may target (PEFT's names for this family)."""
        qkv = ("qkv_proj",) if self.fused_qkv else ("q_proj", "k_proj", "v_proj")
        mlp = ("gate_up_proj",) if self.fused_gate_up else ("gate_proj", "up_proj")
        return (*qkv, "o_proj", *mlp, "down_proj")

    @property
    def norm_names(self) -> tuple[str, ...]:
        qk = ("q_norm", "k_norm") if self.qk_norm != "none" else ()
        return (*NORM_LAYOUTS[self.norm_layout], *qk)

    def module_shape(self, module: str) -> tuple[int, int]:
        """``(d_out, d_in)`` of a LoRA-able module."""
        d, f = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shapes = {
            "q_proj": (q, d),
            "k_proj": (kv, d),
            "v_proj": (kv, d),
            "qkv_proj": (q + 2 * kv, d),
            "o_proj": (d, q),
            "gate_proj": (f, d),
            "up_proj": (f, d),
            "gate_up_proj": (2 * f, d),
            "down_proj": (d, f),
        }
        if module not in self.lora_modules:
            raise ValueError(
                f"module {module!r} is not a linear module of this {self.model_type} model "
                f"(expected one of {', '.join(self.lora_modules)})"
            )
        return shapes[module]

    def flops_per_token(self, context: int = 0) -> float:
        """Forward FLOPs per token: 2 x (matmul weights incl. the head) + attention."""
        matmul = sum(math.prod(self.module_shape(m)) for m in self.lora_modules) * self.num_layers
        head = self.vocab_size * self.hidden_size
        attn = 2 * self.num_layers * self.num_heads * self.head_dim * context
        return 2.0 * (matmul + head) + 2.0 * attn

    # --------------------------------------------------------------- plain form

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (caches, manifests); `from_dict` inverts it."""
        out = dataclasses.asdict(self)
        out["rope_scaling"] = _thaw(self.rope_scaling) if self.rope_scaling else None
        out["layer_types"], out["rope_layers"] = list(self.layer_types), list(self.rope_layers)
        return out

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> DecoderConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    def identity_fields(self) -> dict[str, Any]:
        """Architecture fields that tensor shapes do not pin down (for fingerprints).

        The five Llama ones always; every other field only where it differs from its
        default, so a Llama model's fingerprint does not depend on this list growing.
        """
        fields = {
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        skip = {
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "rope_theta",
            "rms_norm_eps",
            "tie_word_embeddings",
            "max_position_embeddings",
            "model_type",
            "attention_bias",
            "rope_scaling",
        }
        plain = {"layer_types": (FULL,) * self.num_layers, "rope_layers": (True,) * self.num_layers}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in skip and value != plain.get(f.name, f.default):
                fields[f.name] = value
        return fields


# --------------------------------------------------------------------- weights


def weight_shapes(config: DecoderConfig) -> Weights:
    """Shapes of every weight in the canonical layout (see module docstring)."""
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    layers = {name: (c.num_layers, c.hidden_size) for name in NORM_LAYOUTS[c.norm_layout]}
    if c.qk_norm == "head":
        layers.update(q_norm=(c.num_layers, c.head_dim), k_norm=(c.num_layers, c.head_dim))
    elif c.qk_norm == "projection":
        layers.update(q_norm=(c.num_layers, q), k_norm=(c.num_layers, kv))
    for m in c.lora_modules:
        layers[m] = (c.num_layers, *c.module_shape(m))
    if c.attention_bias:
        layers.update(
            q_bias=(c.num_layers, q), k_bias=(c.num_layers, kv), v_bias=(c.num_layers, kv)
        )
    if c.output_bias:
        layers["o_bias"] = (c.num_layers, c.hidden_size)
    shapes: Weights = {
        "embed": (c.vocab_size, c.hidden_size),
        "final_norm": (c.hidden_size,),
        "layers": layers,
    }
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (c.vocab_size, c.hidden_size)
    return shapes


def init_weights(config: DecoderConfig, seed: int = 0, std: float = 0.02) -> Weights:
    """Random weights (NumPy float32): normal(std) matrices and biases, norms near 1
    (near 0 where the norm scales by 1 + w)."""
    rng = np.random.default_rng(seed)
    centre = 1.0 - config.norm_offset

    def make(name, shape):
        if name.endswith("norm"):
            return (centre + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (std * rng.standard_normal(shape)).astype(np.float32)

    shapes = weight_shapes(config)
    out: Weights = {k: make(k, v) for k, v in shapes.items() if k != "layers"}
    out["layers"] = {k: make(k, v) for k, v in shapes["layers"].items()}
    return out


def flatten_weights(weights: Weights) -> dict[str, Any]:
    """``{"embed": ..., "layers.q_proj": ...}``: one level, for files and checks."""
    flat = {k: v for k, v in weights.items() if k != "layers"}
    flat.update({f"layers.{k}": v for k, v in weights.get("layers", {}).items()})
    return flat


def unflatten_weights(flat: Mapping[str, Any]) -> Weights:
    weights: Weights = {"layers": {}}
    for k, v in flat.items():
        if k.startswith("layers."):
            weights["layers"][k[len("layers.") :]] = v
        else:
            weights[k] = v
    return weights


def check_weights(config: DecoderConfig, weights: Weights, source: str = "weights") -> None:
    """Raise ValueError naming the first missing, extra or mis-shaped weight."""
    expected = flatten_weights(weight_shapes(config))
    flat = flatten_weights(weights)
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    if missing or extra:
        raise ValueError(f"{source}: missing weights {missing}, unexpected weights {extra}")
    for k, shape in expected.items():
        if tuple(flat[k].shape) != tuple(shape):
            raise ValueError(f"{source}: {k} has shape {tuple(flat[k].shape)}, expected {shape}")


def check_adapter(config: DecoderConfig, adapter: Mapping[str, Mapping[str, Any]] | None) -> None:
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


class DecoderLayers(nnx.Module):
    """The decoder layers' weights, each stacked along a leading layer axis."""

    def __init__(self, layers: Mapping[str, Any], dtype):
        for name, value in layers.items():
            setattr(self, name, nnx.Param(jnp.asarray(value, dtype)))
        self.names = tuple(sorted(layers))

    def as_dict(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.names}


class Decoder(nnx.Module):
    """A causal LM of any registered family. ``model(tokens)`` returns logits ``[B, T, V]``.

    Prefer `forward_hidden` + `kernels.loss` for losses (no full logits), and the
    functions of `d2c_jax.scoring` for scoring many adapters.
    """

    def __init__(self, config: DecoderConfig, weights: Weights | None = None, *, dtype=jnp.float32):
        if weights is None:
            weights = init_weights(config)
        check_weights(config, weights)
        self.config = config
        self.dtype = jnp.dtype(dtype).name
        self.embed = nnx.Param(jnp.asarray(weights["embed"], dtype))
        self.final_norm = nnx.Param(jnp.asarray(weights["final_norm"], dtype))
        untied = not config.tie_word_embeddings
        self.lm_head = nnx.Param(jnp.asarray(weights["lm_head"], dtype)) if untied else None
        self.layers = DecoderLayers(weights["layers"], dtype)

    def head(self) -> jax.Array:
        """The ``[V, d]`` output projection (the embedding when tied), times `logit_scale`."""
        head = self.embed[...] if self.lm_head is None else self.lm_head[...]
        scale = self.config.logit_scale
        return head if scale == 1.0 else head * jnp.asarray(scale, head.dtype)

    def norm_hidden(self, hidden: jax.Array) -> jax.Array:
        """The final norm, for losses that apply it to selected positions only."""
        return rms_norm(hidden, self.final_norm[...], self.config)

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


def rms_norm(x: jax.Array, weight: jax.Array, config: DecoderConfig) -> jax.Array:
    """RMSNorm as Hugging Face computes it: normalise in float32; Llama-style casts back
    then scales by ``w``, Gemma-style scales by ``1 + w`` in float32 then casts."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + config.rms_norm_eps)
    if config.norm_offset:
        return (normed * (config.norm_offset + weight.astype(jnp.float32))).astype(x.dtype)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_inv_freq(config: DecoderConfig, local: bool = False) -> tuple[np.ndarray, float]:
    """Inverse frequencies ``[rotary_dim / 2]`` (float32) and the cos/sin scale.

    `local`: the sliding layers' table (`rope_local_theta`, unscaled), as Gemma 3 has.
    """
    dim = config.rotary_dim
    theta = config.rope_local_theta if local else config.rope_theta
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float64)
    scaling = {} if local else dict(config.rope_scaling or ())
    kind = "default" if local else config.rope_type
    attention_factor = 1.0
    if kind == "llama3":
        inv = _llama3_scaling(inv, scaling)
    elif kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "longrope":  # the short factors: exact up to `context_limit`
        inv = inv / np.asarray(scaling["short_factor"], np.float64)
        original = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
        factor = scaling.get("factor") or config.max_position_embeddings / original
        attention_factor = scaling.get("attention_factor") or (
            1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        )
    return inv.astype(np.float32), float(attention_factor)


def _llama3_scaling(inv: np.ndarray, scaling: Mapping[str, Any]) -> np.ndarray:
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled)


def rope_tables(
    config: DecoderConfig, positions: jax.Array, local: bool = False
) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[..., T, rotary_dim]`` (float32) for integer ``positions [..., T]``."""
    inv, attention_factor = rope_inv_freq(config, local)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * attention_factor, jnp.sin(emb) * attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on the first ``cos.shape[-1]`` dims of ``x [B, T, H, hd]``."""
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = (rot.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def attention(q, k, v, mask, config: DecoderConfig) -> jax.Array:
    """Grouped-query attention. ``q [B, T, Hq, hd]``, ``k, v [B, S, Hkv, hd]``,
    ``mask [B, T, S]`` (True = may attend) -> ``[B, T, Hq * hd]``."""
    b, t, hq, hd = q.shape
    kv = config.num_kv_heads
    q = q.reshape(b, t, kv, hq // kv, hd)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (config.attention_scale or 1.0 / math.sqrt(hd))
    if config.attn_softcap:
        scores = config.attn_softcap * jnp.tanh(scores / config.attn_softcap)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, hq * hd)


def _proj(h, lw, la, scale, module, bias=None):
    return lora_linear(h, lw[module], bias, None if la is None else la.get(module), scale)


def _qkv(c: DecoderConfig, h, lw, la, scale):
    """Projected q, k, v ``[B, T, H*hd]`` (fused or split, with biases and OLMo 2's
    whole-projection norm)."""
    q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    if c.fused_qkv:
        qkv = _proj(h, lw, la, scale, "qkv_proj")
        q, k, v = jnp.split(qkv, [q_size, q_size + kv_size], axis=-1)
    else:
        bias = lambda name: lw[name] if c.attention_bias else None
        q = _proj(h, lw, la, scale, "q_proj", bias("q_bias"))
        k = _proj(h, lw, la, scale, "k_proj", bias("k_bias"))
        v = _proj(h, lw, la, scale, "v_proj", bias("v_bias"))
    if c.qk_norm == "projection":
        q, k = rms_norm(q, lw["q_norm"], c), rms_norm(k, lw["k_norm"], c)
    return q, k, v


def _attention_block(c: DecoderConfig, h, lw, la, scale, rope, use_rope, mask, cache, index):
    b, t, _ = h.shape
    q, k, v = _qkv(c, h, lw, la, scale)
    q = q.reshape(b, t, c.num_heads, c.head_dim)
    k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
    v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
    if c.qk_norm == "head":
        q, k = rms_norm(q, lw["q_norm"], c), rms_norm(k, lw["k_norm"], c)
    cos, sin = rope
    rotate = lambda z: apply_rope(z, cos, sin)
    if use_rope is None:  # every layer rotates
        q, k = rotate(q), rotate(k)
    else:
        q, k = jnp.where(use_rope, rotate(q), q), jnp.where(use_rope, rotate(k), k)
    if cache is not None:
        ck, cv = cache
        k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), index, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), index, axis=1)
        cache = (k, v)
    o_bias = lw["o_bias"] if c.output_bias else None
    return _proj(attention(q, k, v, mask, c), lw, la, scale, "o_proj", o_bias), cache


def _mlp_block(c: DecoderConfig, h, lw, la, scale):
    act = ACTIVATIONS[c.hidden_act]
    if c.fused_gate_up:
        gate, up = jnp.split(_proj(h, lw, la, scale, "gate_up_proj"), 2, axis=-1)
    else:
        gate, up = _proj(h, lw, la, scale, "gate_proj"), _proj(h, lw, la, scale, "up_proj")
    return _proj(act(gate) * up, lw, la, scale, "down_proj")


def _residual(c: DecoderConfig, x, block, lw, pre: str, post: str):
    """``x + m * post(block(pre(x)))`` with the norms this layout has."""
    norms = NORM_LAYOUTS[c.norm_layout]
    h = rms_norm(x, lw[pre], c) if pre in norms else x
    out, extra = block(h)
    if post in norms:
        out = rms_norm(out, lw[post], c)
    if c.residual_multiplier != 1.0:
        out = out * c.residual_multiplier
    return x + out, extra


def decoder_layer(c: DecoderConfig, x, lw, la, scale, rope, use_rope, mask, cache=None, index=0):
    """One decoder layer on ``x [B, T, d]``.

    `lw` holds this layer's weights, `la` this layer's adapter slices (or None), `rope`
    its ``(cos, sin)`` tables, `use_rope` a traced bool (None: always), `mask` ``[B, T, S]``. With
    `cache` = ``(k, v)`` each ``[B, S, Hkv, hd]``, the new keys and values are written at
    slot `index` and attention runs over all S slots; returns ``(x, new_cache)``.
    """
    attn = lambda h: _attention_block(c, h, lw, la, scale, rope, use_rope, mask, cache, index)
    x, cache = _residual(c, x, attn, lw, "attn_norm", "post_attn_norm")
    mlp = lambda h: (_mlp_block(c, h, lw, la, scale), None)
    x, _ = _residual(c, x, mlp, lw, "mlp_norm", "post_mlp_norm")
    return x, cache


def _as_model(model):
    # BaseModel (d2c_jax.models) wraps the module; accept either.
    return getattr(model, "model", model)


def _layer_inputs(c: DecoderConfig, positions, key_positions, mask):
    """What differs between layers: ``(per-layer scanned flags, pick)`` where the flags
    are ``(sliding [L], use_rope [L])`` and ``pick(flags) -> (rope, use_rope, mask)``
    selects this layer's tables and mask (the selects vanish when all layers agree)."""
    sliding = np.array([kind == SLIDING for kind in c.layer_types])
    rope = rope_tables(c, positions)
    local = rope_tables(c, positions, local=True) if c.rope_local_theta else rope
    near = (positions[:, :, None] - key_positions[:, None, :]) < max(c.sliding_window, 1)
    all_rope = all(c.rope_layers)

    def pick(flags):
        is_sliding, use_rope = flags
        if sliding.all():
            return local, use_rope, mask & near
        if not sliding.any():
            return rope, use_rope, mask
        tables = tuple(jnp.where(is_sliding, lo, g) for lo, g in zip(local, rope, strict=True))
        return tables, use_rope, jnp.where(is_sliding, mask & near, mask)

    flags = (jnp.asarray(sliding), None if all_rope else jnp.asarray(c.rope_layers))
    return flags, pick


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
    key_positions: jax.Array | None = None,
    final_norm: bool = True,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Hidden states ``[B, T, d]`` (after the final norm unless ``final_norm=False``).

    Args:
      model: `Decoder` (or a BaseModel wrapping one).
      tokens: ``[B, T]`` int token ids.
      adapter: one adapter, ``{module: {"A": [L, r, d_in], "B": [L, d_out, r]}}`` with
        `scale`, or ``{module: {"delta": [L, d_out, d_in]}}``; None for the base model.
      positions: ``[B, T]`` RoPE positions (default ``0..T-1``).
      mask: ``[B, T, S]`` attention mask (default causal over T; right padding needs no
        mask because no real token attends to a later slot). Sliding layers further
        keep only keys with ``position - key_position < sliding_window``.
      cache: ``(k, v)`` each ``[L, B, S, Hkv, hd]``: write this block at `cache_index`
        and attend over the cache (then `mask` and `key_positions` are required).
      key_positions: ``[B, S]`` position of every key slot (default `positions`).
    """
    model = _as_model(model)
    c = model.config
    b, t = tokens.shape
    x = model.embed[...][tokens]
    if c.embed_scale != 1.0:
        x = x * jnp.asarray(c.embed_scale, x.dtype)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if mask is None:
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    key_positions = positions if key_positions is None else key_positions
    flags, pick = _layer_inputs(c, positions, key_positions, mask)

    def body(x, xs):
        lw, la, layer_cache, layer_flags = xs
        rope, use_rope, layer_mask = pick(layer_flags)
        return decoder_layer(
            c, x, lw, la, scale, rope, use_rope, layer_mask, layer_cache, cache_index
        )

    xs = (model.layers.as_dict(), adapter, cache, flags)
    x, new_cache = jax.lax.scan(body, x, xs)
    if final_norm:
        x = model.norm_hidden(x)
    return x, new_cache


def logits_from_hidden(model, hidden: jax.Array) -> jax.Array:
    """Full logits ``[..., V]`` (float32). Only for few positions (generation, tests)."""
    model = _as_model(model)
    logits = jnp.einsum(
        "...d,vd->...v",
        hidden,
        model.head().astype(hidden.dtype),
        preferred_element_type=jnp.float32,
    )
    cap = model.config.final_softcap
    return cap * jnp.tanh(logits / cap) if cap else logits
