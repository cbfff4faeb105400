"""A folder whose root or marker is missing (deleted, moved, a disk not mounted) stops instead of
announcing every file as deleted; it resumes when the root is back."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from agent.sync.clock import Now
from agent.sync.engine import ROOT_RECHECK, SyncEngine
from agent.sync.index import FolderIndex
from agent.sync.names import MARKER
from agent.sync.server import BlockServer
from testkit.engines import A_ID, B_ID, Net, tree, write


def synced_pair(tmp_path: Path) -> Net:
    net = Net(tmp_path, [A_ID, B_ID])
    net.connect(A_ID, B_ID)
    for i in range(3):
        write(net.root(A_ID) / "d" / f"f{i}", b"x" * (i + 1))
    net.change(A_ID)
    net.settle()
    assert len(tree(net.root(B_ID))) == 4
    return net


def stopped(eng: SyncEngine) -> bool:
    """Whether `eng` is stopped (a call, so checks before and after an action are not narrowed)."""
    return eng.halted is not None


def tick(net: Net, dev: str, seconds: float = ROOT_RECHECK + 1) -> None:
    net.advance(seconds)
    net._send(dev, net.engines[dev].handle_timer(net.now))
    net.settle()


def test_a_new_folder_gets_its_root_and_marker(tmp_path: Path) -> None:
    root = tmp_path / "not" / "there"
    eng = SyncEngine("default", root, FolderIndex(tmp_path / "i.db"), A_ID)
    eng.start(Now(1_000.0, 1_700_000_000.0))
    assert (root / MARKER).is_dir() and eng.halted is None
    assert eng.status().state == "idle"
    eng.close()
    eng.index.close()


def test_an_existing_folder_without_a_marker_is_adopted_on_first_start(tmp_path: Path) -> None:
    root = tmp_path / "music"
    write(root / "song", b"la")
    eng = SyncEngine("default", root, FolderIndex(tmp_path / "i.db"), A_ID)
    eng.start(Now(1_000.0, 1_700_000_000.0))
    assert (root / MARKER).is_dir()
    assert [f.name for f in eng.index.local_files()] == ["song"], "the marker itself is never synced"
    eng.close()
    eng.index.close()


def test_a_deleted_root_stops_the_folder_instead_of_deleting_everywhere(tmp_path: Path) -> None:
    net = synced_pair(tmp_path)
    a = net.root(A_ID)
    moved = tmp_path / "moved-away"
    a.rename(moved)  # the user moved the folder (or its disk went away)
    net.change(A_ID)
    net.settle()
    eng = net.engines[A_ID]
    assert eng.halted is not None and MARKER in eng.halted
    st = eng.status()
    assert st.state == "error" and st.error == eng.halted
    assert all(not f.deleted for f in eng.index.local_files()), "nothing was recorded as deleted"
    assert len(tree(net.root(B_ID))) == 4, "the peer keeps its files"
    assert not a.exists(), "a stopped folder does not recreate its root"
    # it looks again on its timer, and resumes when the folder is back
    assert eng.get_timer() <= net.mono + ROOT_RECHECK
    moved.rename(a)
    write(a / "d" / "new", b"made while stopped")
    tick(net, A_ID)
    assert not stopped(eng) and eng.status().state == "idle"
    assert (net.root(B_ID) / "d" / "new").read_bytes() == b"made while stopped"
    assert len(tree(net.root(B_ID))) == 5


def test_an_unmounted_disk_leaves_an_empty_directory_and_is_not_a_deletion(tmp_path: Path) -> None:
    net = synced_pair(tmp_path)
    a = net.root(A_ID)
    disk = tmp_path / "disk"
    a.rename(disk)
    a.mkdir()  # the empty mount point
    net.change(A_ID)
    net.settle()
    assert net.engines[A_ID].halted is not None
    assert len(tree(net.root(B_ID))) == 4
    # a file a peer adds meanwhile is not written into the mount point
    write(net.root(B_ID) / "later", b"from B")
    net.change(B_ID)
    net.settle()
    assert list(a.iterdir()) == []
    # "mounted" again: a different directory at the same path, with its marker
    a.rmdir()
    disk.rename(a)
    tick(net, A_ID)
    assert net.engines[A_ID].halted is None
    assert (a / "later").read_bytes() == b"from B"
    assert tree(a) == tree(net.root(B_ID))


def test_a_removed_marker_stops_the_folder_and_recreating_it_adopts_the_directory(tmp_path: Path) -> None:
    net = synced_pair(tmp_path)
    a = net.root(A_ID)
    os.rmdir(a / MARKER)
    shutil.rmtree(a / "d")
    net.change(A_ID)
    net.settle()
    assert net.engines[A_ID].halted is not None
    assert len(tree(net.root(B_ID))) == 4
    # the user says "yes, this is the folder as it is now": the deletions go out
    (a / MARKER).mkdir()
    tick(net, A_ID)
    assert net.engines[A_ID].halted is None
    assert tree(net.root(B_ID)) == {}


def test_a_root_gone_in_the_middle_of_a_chunked_scan_records_nothing(tmp_path: Path) -> None:
    net = synced_pair(tmp_path)
    eng = net.engines[A_ID]
    eng.scanner.chunk_files = 1
    write(net.root(A_ID) / "e" / "g", b"1")
    write(net.root(A_ID) / "e" / "h", b"2")
    net.advance(1)
    eng.next_scan = 0
    eng.handle_timer(net.now)  # the first chunk
    assert not stopped(eng)
    seq = eng.index.sequence
    shutil.rmtree(net.root(A_ID))
    chunks = 0
    while eng.scan_pending:  # the scan was cut in chunks: the root goes away between two of them
        eng.continue_scan(net.now)
        chunks += 1
    assert chunks >= 1
    assert stopped(eng) and eng.index.sequence == seq


def test_the_block_server_reopens_a_root_that_came_back(tmp_path: Path) -> None:
    net = synced_pair(tmp_path)
    a = net.root(A_ID)
    server = BlockServer("default", a, tmp_path / "A.db")
    try:
        moved = tmp_path / "elsewhere"
        a.rename(moved)
        a.mkdir()
        (a / MARKER).mkdir()
        write(a / "d" / "f0", b"y")  # a different directory, as after a remount
        assert server.fs.refresh()
        assert server.fs.lstat("d/f0") is not None and server.fs.lstat("d/f1") is None
    finally:
        server.close()


def test_a_symlinked_root_is_followed_but_nothing_inside_it(tmp_path: Path) -> None:
    real = tmp_path / "data" / "sync"
    write(real / "a.txt", b"hello")
    (tmp_path / "Sync").symlink_to(real)
    (real / "out").symlink_to(tmp_path)  # a symlink inside stays a local thing
    eng = SyncEngine("default", tmp_path / "Sync", FolderIndex(tmp_path / "i.db"), A_ID)
    eng.start(Now(1_000.0, 1_700_000_000.0))
    assert not stopped(eng)
    assert [f.name for f in eng.index.local_files()] == ["a.txt"]
    eng.close()
    eng.index.close()
