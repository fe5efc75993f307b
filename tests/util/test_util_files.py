"""ttt.util.files: the package's one atomic writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ttt.util.files import atomic_open, atomic_write_json, atomic_write_text


def test_atomic_open_replaces_on_success_and_leaves_nothing_on_error(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "t.bin"
    with atomic_open(target, "wb") as f:
        f.write(b"new")
        assert not target.exists()  # invisible until the block ends
    assert target.read_bytes() == b"new"
    with pytest.raises(KeyboardInterrupt), atomic_open(target, "wb") as f:
        f.write(b"partial")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"new" and sorted(p.name for p in target.parent.iterdir()) == ["t.bin"]


def test_atomic_write_text_and_json(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.txt", "héllo\n")
    atomic_write_json(tmp_path / "b.json", {"path": tmp_path})
    assert (tmp_path / "a.txt").read_text() == "héllo\n"
    assert json.loads((tmp_path / "b.json").read_text()) == {"path": str(tmp_path)}
