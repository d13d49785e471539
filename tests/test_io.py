"""d2c_jax.io: atomic writers (old file intact on failure, no temporary left, unique
temporary names, umask-respecting modes), JSON without NaN, the atomic directory and
package versions."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from d2c_jax import io


def _leftovers(directory: Path, keep: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != keep)


def test_a_failure_mid_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    io.write_text_atomic(target, "old\n")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half of the new cont")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        io.write_atomic(target, half_then_fail)
    assert target.read_text() == "old\n"
    assert _leftovers(tmp_path, keep="out.json") == []
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C too
        io.write_atomic(target, lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt))
    assert target.read_text() == "old\n" and _leftovers(tmp_path, keep="out.json") == []


def test_a_failure_before_the_first_write_creates_nothing(tmp_path):
    target = tmp_path / "sub" / "new.bin"
    with pytest.raises(ValueError):
        io.write_atomic(target, lambda tmp: (_ for _ in ()).throw(ValueError("no")))
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_writers_create_parents_and_replace(tmp_path):
    target = tmp_path / "a" / "b" / "data.bin"
    assert io.write_bytes_atomic(target, b"\x00\x01") == target
    assert target.read_bytes() == b"\x00\x01"
    io.write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new"


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_get_the_mode_a_plain_open_gives(tmp_path, mask):
    old = os.umask(mask)
    try:
        assert io.umask() == mask and os.umask(mask) == mask  # reading it changes nothing
        path = io.write_text_atomic(tmp_path / f"f{mask:o}.txt", "x")
        plain = tmp_path / f"plain{mask:o}.txt"
        plain.write_text("x")
        with io.atomic_directory(tmp_path / f"d{mask:o}") as directory:
            (directory / "x").write_text("x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask == plain.stat().st_mode & 0o777
    assert (tmp_path / f"d{mask:o}").stat().st_mode & 0o777 == 0o777 & ~mask


def test_concurrent_writers_use_distinct_temporary_names(tmp_path):
    """Writers of one target each get their own temporary file: none sees another's
    bytes, and the target ends as one writer's whole content."""
    target = tmp_path / "shared.txt"
    seen, barrier = [], threading.Barrier(8)

    def writer(i: int) -> None:
        def write(tmp: Path) -> None:
            seen.append(tmp.name)
            barrier.wait(timeout=10)  # every writer holds its temporary file at once
            tmp.write_text(str(i) * 1000)

        io.write_atomic(target, write)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(seen)) == 8
    assert all(name.startswith(".shared.txt.") and name.endswith(".tmp") for name in seen)
    content = target.read_text()
    assert len(content) == 1000 and len(set(content)) == 1
    assert _leftovers(tmp_path, keep="shared.txt") == []


def test_json_writes_nan_and_infinity_as_null(tmp_path):
    path = io.write_json_atomic(
        tmp_path / "r.json", {"a": float("nan"), "b": [1.5, float("inf")], "é": "ü"}
    )
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == {"a": None, "b": [1.5, None], "é": "ü"}
    assert text.endswith("}\n") and "é" in text  # indented UTF-8, not \\u escapes


def test_atomic_directory_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    with io.atomic_directory(out) as directory:
        (directory / "a.txt").write_text("first")
    with pytest.raises(FileExistsError, match="already exists"):
        with io.atomic_directory(out):
            pass
    with pytest.raises(RuntimeError):
        with io.atomic_directory(out, overwrite=True) as directory:
            (directory / "a.txt").write_text("second")
            raise RuntimeError("failed")
    assert (out / "a.txt").read_text() == "first"
    with io.atomic_directory(out, overwrite=True) as directory:
        (directory / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert _leftovers(tmp_path, keep="out") == []


def test_versions_records_installed_and_missing_packages():
    found = io.versions(("jax", "no-such-package-d2c"))
    assert found["jax"].count(".") >= 1 and found["no-such-package-d2c"] == "not installed"
    assert io.versions(("no-such-package-d2c",), missing=None) == {"no-such-package-d2c": None}
    assert set(io.versions()) == set(io.RUN_PACKAGES)
