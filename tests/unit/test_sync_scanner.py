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


def test_a_scan_in_chunks_finds_what_one_scan_finds(tmp_path: Path) -> None:
    """Chunks hold at most `max_files` new versions (a directory's files may top it up by the
    directory's own record), only the last is final, and the deletions come in the last."""
    root = tmp_path / "f"
    root.mkdir()
    s = Scanner(FolderFS(root), FolderIndex(tmp_path / "i.db"), ME)
    for i in range(25):
        (root / f"a{i}").write_bytes(b"x%d" % i)
    (root / "gone").write_bytes(b"old")
    scan(s)
    (root / "gone").unlink()
    for i in range(25):
        (root / f"b{i}").write_bytes(b"y%d" % i)
    chunks = list(s.scan_chunks(1_700_000_001, max_files=10))
    assert [len(c.changed) for c in chunks] == [10, 10, 6]
    assert [c.final for c in chunks] == [False, False, True]
    assert [f.name for f in chunks[-1].changed if f.deleted] == ["gone"]
    names = sorted(f.name for c in chunks for f in c.changed)
    assert names == sorted([f"b{i}" for i in range(25)] + ["gone"])


def test_a_large_file_ends_a_chunk(tmp_path: Path) -> None:
    root = tmp_path / "f"
    root.mkdir()
    s = Scanner(FolderFS(root), FolderIndex(tmp_path / "i.db"), ME)
    s.chunk_bytes = 100_000
    (root / "big").write_bytes(b"b" * 150_000)
    (root / "small").write_bytes(b"s")
    chunks = list(s.scan_chunks(1_700_000_000))
    assert len(chunks) >= 2 and chunks[-1].final
    assert sorted(f.name for c in chunks for f in c.changed) == ["big", "small"]
