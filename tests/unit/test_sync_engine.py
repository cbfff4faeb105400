"""Two or three engines over temp folders, joined in memory, converge."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import ErrorCode, RemoteProtocolError
from agent.sync import engine as engine_module
from agent.sync.engine import SyncEngine
from agent.sync.fs import FolderFS, temp_name_for
from agent.sync.messages import Index, IndexUpdate
from agent.sync.scanner import ScanResult
from testkit.engines import A_ID, B_ID, Net, tree, write


def pair(tmp_path: Path) -> Net:
    net = Net(tmp_path, [A_ID, B_ID])
    net.connect(A_ID, B_ID)
    net.settle()
    return net


def test_create_edit_delete_nested_empty(tmp_path: Path) -> None:
    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    write(a / "x.txt", b"hello")
    write(a / "d1/d2/deep.bin", os.urandom(300_000))
    write(a / "empty", b"")
    (a / "emptydir").mkdir()
    (a / "run.sh").write_bytes(b"#!/bin/sh\n")
    (a / "run.sh").chmod(0o755)
    net.change(A_ID)
    net.settle()
    assert tree(a) == tree(b)
    assert (b / "run.sh").stat().st_mode & 0o100
    assert (b / "x.txt").stat().st_mtime_ns == (a / "x.txt").stat().st_mtime_ns
    write(b / "x.txt", b"edited on b")
    net.change(B_ID, ["x.txt"])
    net.settle()
    assert (a / "x.txt").read_bytes() == b"edited on b"
    (a / "d1/d2/deep.bin").unlink()
    (a / "d1/d2").rmdir()
    net.change(A_ID)
    net.settle()
    assert not (b / "d1/d2").exists() and (b / "d1").is_dir()
    assert tree(a) == tree(b)


def test_index_goes_out_as_a_stream_within_a_window(tmp_path: Path) -> None:
    """A big index is handed over INDEX_WINDOW messages at a time, the next only once one was sent."""
    net = Net(tmp_path, [A_ID, B_ID], max_files_per_message=10)
    a, b = net.root(A_ID), net.root(B_ID)
    for i in range(35):
        write(a / f"d/f{i}", b"x%d" % i)
    net.change(A_ID)
    net.connect(A_ID, B_ID)
    net.step(limit=2)  # both hellos: A answers B's with the first part of its index only
    waiting = [m for src, _, m in net.queue if src == A_ID and isinstance(m, Index)]
    assert len(waiting) == engine_module.INDEX_WINDOW
    net.settle()
    assert tree(a) == tree(b)
    sent = [m for src, _, m in net.sent if src == A_ID and isinstance(m, Index)]
    assert type(sent[0]) is Index and all(type(m) is IndexUpdate for m in sent[1:])
    names = [f.name for m in sent for f in m.files]
    assert len(sent) == 4 and len(names) == len(set(names)) == 36  # 35 files and their directory
    assert [f.sequence for m in sent for f in m.files] == sorted(f.sequence for m in sent for f in m.files)


def test_a_peer_announcing_more_names_than_the_cap_is_refused(tmp_path: Path) -> None:
    """Known names may change forever at the cap; one new name past it closes the link."""
    net = Net(tmp_path, [A_ID, B_ID])
    net.engines[B_ID].max_remote_records = 15
    a = net.root(A_ID)
    for i in range(15):
        write(a / f"f{i:02}", b"x")
    net.change(A_ID)
    net.connect(A_ID, B_ID)
    net.settle()
    for round_ in range(3):
        write(a / "f00", b"edit %d" % round_)
        net.change(A_ID, ["f00"])
        net.settle()
    assert (net.root(B_ID) / "f00").read_bytes() == b"edit 2"
    write(a / "one-too-many", b"x")
    net.change(A_ID, ["one-too-many"])
    with pytest.raises(RemoteProtocolError) as refused:
        net.settle()
    assert refused.value.code is ErrorCode.LIMIT_EXCEEDED
    assert not (net.root(B_ID) / "one-too-many").exists()


def test_rename_reuses_blocks(tmp_path: Path) -> None:
    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    write(a / "big.bin", os.urandom(1_000_000))
    net.change(A_ID)
    net.settle()
    before = len(net.requests(B_ID))
    (a / "sub").mkdir()
    (a / "big.bin").rename(a / "sub/moved.bin")
    net.change(A_ID)
    net.settle()
    assert tree(a) == tree(b)
    assert not (b / "big.bin").exists()
    assert len(net.requests(B_ID)) == before


def test_one_byte_edit_transfers_one_block(tmp_path: Path) -> None:
    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    data = bytearray(os.urandom(8 * 1024 * 1024))
    write(a / "large", bytes(data))
    net.change(A_ID)
    net.settle()
    first = len(net.requests(B_ID))
    data[4 * 1024 * 1024 + 5] ^= 0xFF
    write(a / "large", bytes(data))
    net.change(A_ID, ["large"])
    net.settle()
    assert (b / "large").read_bytes() == bytes(data)
    assert len(net.requests(B_ID)) - first == 1


def test_conflict_keeps_both_with_same_names(tmp_path: Path) -> None:
    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    write(a / "doc.txt", b"base")
    net.change(A_ID)
    net.settle()
    net.links.clear()  # offline: both edit
    write(a / "doc.txt", b"from a", mtime_s=1_700_000_100)
    write(b / "doc.txt", b"from b", mtime_s=1_700_000_200)
    net.change(A_ID, ["doc.txt"])
    net.change(B_ID, ["doc.txt"])
    net.connect(A_ID, B_ID)
    net.settle()
    ta, tb = tree(a), tree(b)
    assert ta == tb
    assert ta["doc.txt"][0] == b"from b"  # newer mtime wins
    conflicts = [n for n in ta if ".sync-conflict-" in n]
    assert conflicts == ["doc.sync-conflict-20231114-221500-AAAAAAA.txt"]
    assert ta[conflicts[0]][0] == b"from a"


def test_delete_vs_edit_keeps_edit(tmp_path: Path) -> None:
    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    write(a / "f", b"v1")
    net.change(A_ID)
    net.settle()
    net.links.clear()
    (a / "f").unlink()
    write(b / "f", b"v2 edited")
    net.change(A_ID)
    net.change(B_ID, ["f"])
    net.connect(A_ID, B_ID)
    net.settle()
    assert (a / "f").read_bytes() == b"v2 edited" == (b / "f").read_bytes()
    assert tree(a) == tree(b)


def test_bad_block_is_refused(tmp_path: Path) -> None:
    import dataclasses

    from agent.sync.messages import Response

    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    write(a / "f.bin", os.urandom(200_000))
    net.change(A_ID)
    real = net.engines[A_ID]._serve
    calls = []

    def evil(req):  # type: ignore[no-untyped-def]
        resp = real(req)
        calls.append(req)
        return dataclasses.replace(resp, data=b"x" * len(resp.data)) if len(calls) == 1 else resp

    net.engines[A_ID]._serve = evil  # type: ignore[method-assign]
    net.settle()
    assert (b / "f.bin").read_bytes() == (a / "f.bin").read_bytes()
    assert net.engines[B_ID].peers[A_ID].bad_blocks == 1
    assert any(isinstance(m, Response) for _, _, m in net.sent)


def test_resume_does_not_rerequest_finished_blocks(tmp_path: Path) -> None:
    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    write(a / "big", os.urandom(6 * 1024 * 1024))  # 48 blocks of 128 KiB
    net.change(A_ID)
    net.engines[B_ID].max_inflight_bytes = 256 * 1024
    net.step(limit=40)  # index exchange plus some blocks, then the receiver dies
    done_before = len(net.requests(B_ID))
    answered = len([m for _, d, m in net.sent if d == B_ID and type(m).__name__ == "Response"])
    assert 0 < answered < 48
    net.crash(B_ID)
    assert not (b / "big").exists()
    net.open(B_ID)
    net.connect(A_ID, B_ID)
    net.settle()
    assert (b / "big").read_bytes() == (a / "big").read_bytes()
    # every block answered before the crash is reused from the temp file
    assert len(net.requests(B_ID)) - done_before == 48 - answered
    assert not [p for p in os.listdir(b) if p.startswith(".tofu-tmp-")]


def test_local_change_during_download_is_a_conflict(tmp_path: Path) -> None:
    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    write(a / "f", b"one")
    net.change(A_ID)
    net.settle()
    write(a / "f", os.urandom(1_000_000))
    net.change(A_ID, ["f"])
    net.step(limit=3)  # B learns of the new version and starts fetching
    assert net.engines[B_ID].jobs
    write(b / "f", b"edited on b during the download")  # not yet scanned by B
    net.settle()
    ta, tb = tree(a), tree(b)
    assert ta == tb
    contents = {v[0] for k, v in ta.items()}
    assert b"edited on b during the download" in contents and (a / "f").stat().st_size in (1_000_000, 31)
    assert len([n for n in ta if ".sync-conflict-" in n]) == 1


def test_symlink_in_folder_is_not_written_through(tmp_path: Path) -> None:
    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    outside = tmp_path / "outside"
    outside.mkdir()
    (b / "d").symlink_to(outside)
    write(a / "d/evil.txt", b"pwned")
    net.change(A_ID)
    net.settle()
    assert os.listdir(outside) == []
    assert (b / "d").is_symlink()


def test_three_devices_converge(tmp_path: Path) -> None:
    from testkit.engines import C_ID

    net = Net(tmp_path, [A_ID, B_ID, C_ID])
    net.connect(A_ID, B_ID)
    net.connect(B_ID, C_ID)
    for dev in (A_ID, B_ID, C_ID):
        write(net.root(dev) / f"from-{dev[0]}/file", dev.encode())
        net.change(dev)
    net.settle()
    assert tree(net.root(A_ID)) == tree(net.root(B_ID)) == tree(net.root(C_ID))
    assert len(tree(net.root(C_ID))) == 6


def test_events_of_our_own_writes_are_dropped_but_a_later_edit_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    for i in range(300):  # more than the 256 names that would otherwise become one full scan
        write(a / f"d{i % 3}/f{i}", str(i).encode())
    net.change(A_ID)
    net.settle()
    eng = net.engines[B_ID]
    names = [f"d{i % 3}/f{i}" for i in range(300)]
    assert all(n in eng.written for n in names)
    scans: list[list[str] | None] = []
    real_scan = eng.scanner.scan_chunks

    def counting_scan(now_s: int, ns: list[str] | None = None) -> Iterator[ScanResult]:
        scans.append(ns)
        return real_scan(now_s, ns)

    monkeypatch.setattr(eng.scanner, "scan_chunks", counting_scan)
    write(b / "d0/f0", b"edited on b after the pull")
    net.change(B_ID, names)  # the watcher reports our 300 renames, and the one edit among them
    assert scans == [["d0/f0"]]
    assert not any(n in eng.written for n in names)
    net.settle()
    assert (a / "d0/f0").read_bytes() == b"edited on b after the pull"
    assert tree(a) == tree(b)


def test_a_temp_file_replaced_before_the_commit_is_not_renamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between completing a temp file and renaming it, someone puts another file at its name: the
    flush sees a different inode, renames nothing, and the name is fetched again."""
    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    write(a / "sub/x.bin", b"the real content")
    eng = net.engines[B_ID]
    real_sync = eng.fs.sync_temps
    swapped: list[str] = []

    def sync_then_swap(names: list[str]) -> set[str]:
        lost = real_sync(names)
        if not swapped:
            tmp = b / "sub" / temp_name_for("sub/x.bin")
            tmp.unlink()
            tmp.write_bytes(b"planted by someone else")
            swapped.append("sub/x.bin")
        return lost

    monkeypatch.setattr(eng.fs, "sync_temps", sync_then_swap)
    net.change(A_ID)
    net.settle()
    assert swapped
    assert (b / "sub/x.bin").read_bytes() == b"the real content"


def test_directory_cache_follows_our_own_rmdir(tmp_path: Path) -> None:
    fs = FolderFS(tmp_path)
    try:
        with fs.batch():
            fs.mkdir("x/y")
            fd, _ = fs.open_temp("x/y/f")
            os.close(fd)
            fs.remove_temp("x/y/f")
            assert fs.rmdir("x/y") and fs.rmdir("x")
            fs.mkdir("x/y")  # a new directory, not the cached fd of the removed one
            fd, _ = fs.open_temp("x/y/f")
            os.close(fd)
        assert (tmp_path / "x/y" / temp_name_for("x/y/f")).is_file()
    finally:
        fs.close()


def test_a_long_scan_announces_chunk_by_chunk(tmp_path: Path) -> None:
    """A scan hands its chunks over one call at a time: the peer fetches the first files while
    we have not yet looked at the rest."""
    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    ea = net.engines[A_ID]
    ea.scanner.chunk_files = 10
    for i in range(35):
        write(a / f"d/f{i:02}", b"a%d" % i)
    net._send(A_ID, ea.on_local_change(["d"], net.now))
    assert ea.scan_pending and ea.status().state == "scanning"
    first = [m for _, _, m in net.queue if isinstance(m, IndexUpdate)]
    assert 0 < sum(len(m.files) for m in first) <= 11  # the directory and ten files
    net.step()
    assert ea.scan_pending
    assert 0 < len(list((b / "d").iterdir())) < 35  # B already has the first chunk's files
    net.finish_scan(A_ID)
    net.settle()
    assert tree(a) == tree(b)
    assert ea.status().state == "idle"


def scanning(tmp_path: Path, dev: str, files: int, chunk: int) -> tuple[Net, Path, Path, SyncEngine]:
    """A pair in which `dev` has `files` new files and has begun scanning them, `chunk` per chunk."""
    net = pair(tmp_path)
    eng = net.engines[dev]
    eng.scanner.chunk_files = chunk
    for i in range(files):
        write(net.root(dev) / f"f{i}", b"%d" % i)
    net._send(dev, eng.on_local_change([f"f{i}" for i in range(files)], net.now))
    assert eng.status().state == "scanning"
    return net, net.root(A_ID), net.root(B_ID), eng


def test_no_pull_starts_or_commits_while_a_scan_runs(tmp_path: Path) -> None:
    """The scan compares the disk with the records it read when it began: until its last chunk
    nothing else may change those records, so pulls wait."""
    net, a, b, eb = scanning(tmp_path, B_ID, files=3, chunk=1)
    write(a / "from-a", b"fetched once B's scan is over")
    net.change(A_ID, ["from-a"])
    net.step()
    assert "from-a" in eb.need and not eb.jobs and not (b / "from-a").exists()
    net.finish_scan(B_ID)
    net.settle()
    assert tree(a) == tree(b)


def test_names_that_change_during_a_scan_are_scanned_after_it(tmp_path: Path) -> None:
    net, a, b, ea = scanning(tmp_path, A_ID, files=5, chunk=2)
    write(a / "later", b"seen after the first scan")
    net._send(A_ID, ea.on_local_change(["later"], net.now))
    net.finish_scan(A_ID)
    assert ea.index.local("later") is not None
    net.settle()
    assert tree(a) == tree(b)


def test_a_scan_that_fails_midway_does_not_hold_pulls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk or database error in a chunk ends that scan: pulls go on, a full rescan follows."""
    net, a, b, eb = scanning(tmp_path, B_ID, files=3, chunk=1)

    def broken(files: list[object]) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(eb.index, "update_local", broken)
    with pytest.raises(OSError):
        eb.continue_scan(net.now)
    monkeypatch.undo()
    assert not eb.scan_pending and eb.status().state == "idle"
    assert eb.get_timer() <= net.mono + engine_module.RETRY_SCAN_AFTER
    write(a / "from-a", b"still fetched")
    net.change(A_ID, ["from-a"])
    net.advance(eb.get_timer() - net.mono)
    net.settle()
    assert tree(a) == tree(b)


def test_events_arriving_all_the_time_do_not_starve_a_scan(tmp_path: Path) -> None:
    """Each call advances the scan in progress, also when it brings more names to queue."""
    net, a, b, ea = scanning(tmp_path, A_ID, files=4, chunk=1)
    for i in range(10):
        write(a / f"busy{i}", b"%d" % i)
        net._send(A_ID, ea.on_local_change([f"busy{i}"], net.now))
    assert ea.index.local("f3") is not None  # the first scan got to its end meanwhile
    net.finish_scan(A_ID)
    net.settle()
    assert tree(a) == tree(b)
