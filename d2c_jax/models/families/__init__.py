"""The registry of model families, keyed by Hugging Face ``model_type`` and by GGUF
``general.architecture``.

Adding a family: one module here that defines ``FAMILY = Family(...)`` (see
`d2c_jax.models.families.base`), its name in `_MODULES`, and a parity test in
``tests/test_families.py`` (a tiny random transformers model of the family).
"""

from __future__ import annotations

import importlib

from d2c_jax.models.families.base import Family

_MODULES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "phi3",
    "olmo2",
    "smollm3",
    "granite",
)


def _collect() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for name in _MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        for attr in ("FAMILY", "MULTIMODAL"):
            family = getattr(module, attr, None)
            if family is not None:
                found[family.name] = family
    return found


FAMILIES: dict[str, Family] = _collect()
GGUF_ARCHS: dict[str, Family] = {f.gguf_arch: f for f in FAMILIES.values() if f.gguf_arch}


def family(model_type: str, source: str = "config.json") -> Family:
    """The family of a Hugging Face ``model_type``; ValueError naming the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not supported ({', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[model_type]


def gguf_family(arch: str, source: str = "GGUF") -> Family:
    """The family of a GGUF ``general.architecture``."""
    if arch not in GGUF_ARCHS:
        raise ValueError(
            f"{source}: GGUF architecture {arch!r} is not supported "
            f"({', '.join(sorted(GGUF_ARCHS))})"
        )
    return GGUF_ARCHS[arch]


def to_hf(config) -> dict:
    """A ``config.json`` dict for `config` (for the families that can write one)."""
    fam = family(config.model_type)
    if fam.to_hf is None:
        raise ValueError(f"writing a {config.model_type} config.json is not supported")
    return fam.to_hf(config)


__all__ = ["FAMILIES", "GGUF_ARCHS", "Family", "family", "gguf_family", "to_hf"]
