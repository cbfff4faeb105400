"""Soak finding (seed 2026, 5 agents): a conflict copy held other bytes on one machine than its
record said, and everything looked in sync. One flush recorded the same name twice (a conflict
copy's record, then a pull's); the index kept the last file record but the blocks of both, so a
later pull "copied" a block of the first version from a file that held the second, trusting it
because the file matched its (current) record."""

from __future__ import annotations

import hashlib
from pathlib import Path

from agent.sync.index import FolderIndex
from agent.sync.model import FileInfo, FileType
from agent.sync.vectors import Vector

A = "A" * 32


def _file(name: str, data: bytes, n: int) -> FileInfo:
    return FileInfo(
        name, FileType.FILE, len(data), n, False, False, Vector().bump(A, n), 0, 128 * 1024,
        hashlib.sha256(data).digest(), A,
    )  # fmt: skip


def test_one_name_twice_in_a_batch_keeps_only_the_last_records_blocks(tmp_path: Path) -> None:
    index = FolderIndex(tmp_path / "i.db")
    first, second = _file("d1/b0.txt", b"SOAK m1 477\n..", 1), _file("d1/b0.txt", b"SOAK m3 532\n" + b"x" * 147, 2)
    index.update_local([first, _file("other.txt", b"other", 1), second])
    assert index.local("d1/b0.txt") == second.replace(sequence=index.local("d1/b0.txt").sequence)  # type: ignore[union-attr]
    assert index.find_block(first.hashes) == []  # the file does not hold these bytes any more
    assert index.find_block(second.hashes) == [("d1/b0.txt", 0)]
    assert index.sequence == 2  # one sequence number a name
    index.close()
