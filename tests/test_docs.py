"""docs/ARCHITECTURE.md: its module table covers every module of the engine.

Modules are the Python files of `kernels/` and `d2c_jax/` as git tracks them (the
filesystem when not in a git checkout). A row names a file (`d2c_jax/scoring.py`)
or a package directory (`d2c_jax/commands/`), which covers the files under it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"


def _modules() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "kernels", "d2c_jax"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        out = [
            str(p.relative_to(ROOT)) for d in ("kernels", "d2c_jax") for p in (ROOT / d).rglob("*")
        ]
    return sorted(p for p in out if p.endswith(".py") and "/data/" not in p and (ROOT / p).exists())


def _table_rows() -> list[str]:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    start = text.index("## Modules\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"^\| `([^`]+)` \|", text[start:end], flags=re.MULTILINE)


def test_module_table_covers_every_module():
    rows = _table_rows()
    missing = [
        m
        for m in _modules()
        if m != "kernels/__init__.py"
        and m not in rows
        and not any(r.endswith("/") and m.startswith(r) for r in rows)
    ]
    assert not missing, f"docs/ARCHITECTURE.md's module table lacks {missing}"


def test_module_table_names_only_existing_modules():
    stale = [r for r in _table_rows() if not (ROOT / r).exists()]
    assert not stale, f"docs/ARCHITECTURE.md's module table names missing paths {stale}"
