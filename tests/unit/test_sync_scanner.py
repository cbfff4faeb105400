"""The scanner finds creations, edits, deletions and renames, and skips symlinks and ignored names."""

from __future__ import annotations

import os
from pathlib import Path

from agent.sync.fs import FolderFS
from agent.sync.index import FolderIndex
from agent.sync.scanner import Scanner

ME = "A" * 32


def scan(s: Scanner, now: int = 1_700_000_000) -> dict[str, bool]:
    r = s.scan(now)
    s.index.update_local(r.changed)
    return {f.name: f.deleted for f in r.changed}


def test_scanner(tmp_path: Path) -> None:
    root = tmp_path / "f"
    root.mkdir()
    s = Scanner(FolderFS(root), FolderIndex(tmp_path / "i.db"), ME)
    (root / "a").write_bytes(b"1" * 200_000)
    (root / "d").mkdir()
    (root / "d/b").write_bytes(b"2")
    (root / "link").symlink_to("/etc/passwd")
    (root / ".tofuignore").write_text("*.tmp\n")
    (root / "x.tmp").write_bytes(b"ignored")
    assert scan(s) == {"a": False, "d": False, "d/b": False, ".tofuignore": False}
    assert scan(s) == {}
    (root / "d/b").write_bytes(b"22")
    assert scan(s) == {"d/b": False}
    os.rename(root / "a", root / "d/a2")
    assert scan(s) == {"a": True, "d/a2": False}
    assert s.index.find_block(s.index.local("d/a2").block_hash(0))  # type: ignore[union-attr]
    (root / "d/b").unlink()
    assert scan(s) == {"d/b": True}
    v1 = s.index.local("d/b")
    assert v1 is not None and v1.deleted and len(v1.version.counters) == 1
