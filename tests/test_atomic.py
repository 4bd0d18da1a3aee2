"""sgmft.atomic: a file or folder is complete at its final path, or untouched."""

from __future__ import annotations

import os
import stat

import pytest

from sgmft import atomic


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_text_and_bytes(tmp_path):
    p = atomic.write_text(tmp_path / "sub" / "a.txt", "héllo\n")
    assert p.read_text(encoding="utf-8") == "héllo\n"
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o644          # not mkstemp's 0600
    atomic.write_bytes(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01" and _leftovers(p.parent) == []
    atomic.write_json(tmp_path / "j.json", {"a": "é"})
    assert (tmp_path / "j.json").read_text(encoding="utf-8") == '{\n  "a": "é"\n}\n'


def test_failed_write_leaves_the_old_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError):
        with atomic.atomic_file(p, "w", encoding="utf-8") as f:
            f.write("half of the new")
            raise RuntimeError("crash")
    assert p.read_text(encoding="utf-8") == "old" and _leftovers(tmp_path) == []


def test_atomic_dir_replaces_or_keeps(tmp_path):
    d = tmp_path / "model"
    with atomic.atomic_dir(d) as t:
        (t / "w.bin").write_bytes(b"1")
    assert (d / "w.bin").read_bytes() == b"1"
    with atomic.atomic_dir(d) as t:                     # replaces the whole folder
        (t / "v.bin").write_bytes(b"2")
    assert sorted(x.name for x in d.iterdir()) == ["v.bin"]
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_dir(d) as t:
            (t / "u.bin").write_bytes(b"3")
            raise KeyboardInterrupt
    assert sorted(x.name for x in d.iterdir()) == ["v.bin"] and _leftovers(tmp_path) == []


def test_replace_dir_puts_the_old_folder_back_when_the_move_fails(tmp_path, monkeypatch):
    d, t = tmp_path / "store", tmp_path / ".store.tmp"
    d.mkdir(), t.mkdir()
    (d / "old").write_text("old")
    real = os.replace

    def failing(src, dst):
        if str(src) == str(t):
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing)
    with pytest.raises(OSError):
        atomic.replace_dir(t, d)
    assert (d / "old").read_text() == "old"


def test_no_hand_written_temp_then_rename_left():
    """The library's temp-then-rename writes all go through sgmft.atomic."""
    import ast
    from pathlib import Path

    import sgmft

    root = Path(sgmft.__file__).parent
    offenders = []
    for f in root.rglob("*.py"):
        if f.name == "atomic.py":
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("replace", "rename", "mkstemp", "mkdtemp") \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in ("os", "tempfile"):
                offenders.append(f"{f.relative_to(root)}:{node.lineno}")
    assert offenders == []
