"""The block server answers from its own read-only index connection, beside a busy engine."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.sync.fs import FolderFS
from agent.sync.index import FolderIndex
from agent.sync.messages import BlockError, Request
from agent.sync.scanner import Scanner
from agent.sync.server import BlockServer

ME = "A" * 32


def setup(tmp_path: Path) -> tuple[Path, FolderIndex, BlockServer]:
    root = tmp_path / "f"
    root.mkdir()
    index = FolderIndex(tmp_path / "i.db")
    return root, index, BlockServer("default", root, tmp_path / "i.db")


def record(root: Path, index: FolderIndex, name: str, data: bytes) -> Request:
    """Write and scan `name`; a request for its first block."""
    (root / name).write_bytes(data)
    info = Scanner(FolderFS(root), index, ME).hash_file(name)
    assert info is not None
    index.update_local([info])
    return Request("default", name, 0, len(data), info.block_hash(0), 7)


def test_serves_while_the_engine_holds_a_write_transaction(tmp_path: Path) -> None:
    root, index, server = setup(tmp_path)
    req = record(root, index, "a", b"hello")
    index._db.execute("BEGIN IMMEDIATE")  # the engine in the middle of recording a scan chunk
    try:
        index._db.execute("DELETE FROM files")
        (resp,) = server.serve([req])  # answers at once, from the last committed state
    finally:
        index._db.execute("ROLLBACK")
    assert resp.data == b"hello" and resp.error is BlockError.NONE
    server.close()


def test_sees_records_committed_after_it_opened_and_never_writes(tmp_path: Path) -> None:
    root, index, server = setup(tmp_path)
    req = record(root, index, "late", b"recorded after the server opened")
    (resp,) = server.serve([req])
    assert resp.data == b"recorded after the server opened"
    assert server.serve([Request("default", "nothing", 0, 1, b"\0" * 32, 8)])[0].error is BlockError.NOT_FOUND
    with pytest.raises(sqlite3.OperationalError):
        server.index._db.execute("DELETE FROM files")
    server.close()


def test_a_data_directory_with_uri_characters_in_its_path(tmp_path: Path) -> None:
    odd = tmp_path / "home #1 ?100% sure"
    odd.mkdir()
    root, index, server = setup(odd)
    req = record(root, index, "a", b"found")
    assert server.serve([req])[0].data == b"found"
    server.close()


def test_an_unreadable_index_answers_changed_instead_of_raising(tmp_path: Path) -> None:
    """A database error must not end the link's send loop (or the agent): the requester is told
    this source cannot serve, and asks another or waits for our next index update."""
    root, index, server = setup(tmp_path)
    req = record(root, index, "a", b"x")
    server.index._db.close()  # as if the database became unreadable
    assert server.serve([req])[0].error is BlockError.CHANGED
