"""`kernels.merge_methods`: the registry, its use by MergeConfig, and the docs table."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernels.merge import MergeConfig
from kernels.merge_methods import MERGE_METHODS, METHODS, MergeMethod, get_method, methods_table

ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"


def _docs_section(title: str) -> str:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def test_docs_table_lists_exactly_the_registry():
    section = _docs_section("Merge methods")
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(METHODS)
    assert methods_table() in section  # every cell as the registry says


@pytest.mark.parametrize("name", METHODS)
def test_config_follows_the_registry(name):
    spec = get_method(name)
    density = 0.5 if spec.needs_density else None
    config = MergeConfig(name, density=density)
    assert config.spec is spec
    assert config.divisor == spec.default_divisor
    assert config.is_ties == (spec.consensus == "ties")
    assert config.sparsifies == (spec.sparsify != "none")
    if spec.needs_density:
        with pytest.raises(ValueError, match="density is required"):
            MergeConfig(name)
        with pytest.raises(ValueError, match=r"density must be in .0, 1\]"):
            MergeConfig(name, density=0.0 if spec.sparsify == "dare" else 1.5)
    else:
        with pytest.raises(ValueError, match="does not apply"):
            MergeConfig(name, density=0.5)


def test_registry_errors():
    with pytest.raises(ValueError, match="method must be one of ties, linear"):
        MergeConfig("nope")
    with pytest.raises(ValueError, match="sparsify must be one of"):
        MergeMethod("x", "random", "none", "none", "")
    assert all(MERGE_METHODS[name].name == name for name in METHODS)
