"""Engine edge cases found in review: write failures, races between a pull and local edits, a file
replaced by a directory (and back), FIFOs, long conflict names, and a trusted peer gone bad."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.sync import puller
from agent.sync.blocks import block_size_for, hash_bytes
from agent.sync.clock import Now
from agent.sync.engine import RETRY_PULL_AFTER, Outgoing, SyncEngine
from agent.sync.messages import FolderHello, IndexUpdate, Request, Response
from agent.sync.model import FileInfo, FileType
from agent.sync.names import MAX_COMPONENT_BYTES
from agent.sync.planner import conflict_name
from agent.sync.server import BlockServer
from agent.sync.vectors import Vector
from testkit.engines import A_ID, B_ID, Net, tree, wire, write

M_ID = "M" * 32  # a trusted peer gone bad


def pair(tmp_path: Path) -> Net:
    net = Net(tmp_path, [A_ID, B_ID])
    net.connect(A_ID, B_ID)
    net.settle()
    return net


def later(net: Net, dev: str, seconds: float = RETRY_PULL_AFTER + 1) -> None:
    """Let `seconds` pass for `dev` and run its timer (retries of failed names), then settle."""
    net.advance(seconds)
    net._send(dev, net.engines[dev].handle_timer(net.now))
    net.settle()


def finfo(name: str, data: bytes | None, dev: str, seq: int, *, size: int = 0, hashes: bytes = b"") -> FileInfo:
    bs = block_size_for(len(data) if data is not None else size)
    if data is not None:
        size, hashes = len(data), hash_bytes(data, bs)
    return FileInfo(name, FileType.FILE, size, 1_600_000_000 * 10**9, False, False, Vector.of({dev: seq}), seq, bs,
                    hashes, dev)  # fmt: skip


def hello_from(eng: SyncEngine, peer: str, now: Now) -> None:
    eng.peer_connected(peer, now)
    eng.on_peer_message(peer, wire(FolderHello("default", b"M" * 16, b"", 0)), now)


def requests_to(out: list[Outgoing], peer: str) -> list[Request]:
    return [m for p, m in out if p == peer and isinstance(m, Request)]


def finishes(fn: Callable[[], object], seconds: float = 5.0) -> bool:
    """Run `fn` in a thread; True if it returned within `seconds`."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive()


# -- write failures -------------------------------------------------------------------------------


def test_a_failed_block_write_never_commits_a_file_with_a_hole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    data = os.urandom(1_000_000)  # 8 blocks
    write(a / "f.bin", data)
    net.change(A_ID)
    real, calls = puller._write, []

    def flaky(job: puller.Job, chunk: bytes | memoryview, offset: int) -> None:
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(job, chunk, offset)

    monkeypatch.setattr(puller, "_write", flaky)
    net.settle()  # the error stays inside the engine: the peer did nothing wrong
    assert not (b / "f.bin").exists()
    assert net.engines[B_ID].index.local("f.bin") is None
    later(net, B_ID)
    assert (b / "f.bin").read_bytes() == data


def test_a_name_that_cannot_be_written_is_tried_again_later(tmp_path: Path) -> None:
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    write(a / "d/f", b"v1")
    net.change(A_ID)
    net.settle()
    if subprocess.run(["chattr", "+i", str(b / "d")], capture_output=True, check=False).returncode:
        pytest.skip("this file system has no immutable attribute")
    try:
        write(a / "d/f", b"v2", mtime_s=1_700_000_500)
        net.change(A_ID)
        net.settle()
        assert (b / "d/f").read_bytes() == b"v1"
    finally:
        subprocess.run(["chattr", "-i", str(b / "d")], check=True)
    later(net, B_ID)
    assert (b / "d/f").read_bytes() == b"v2"


# -- a pull racing local edits and deletions ------------------------------------------------------


def test_a_local_edit_seen_when_the_pull_starts_becomes_a_conflict(tmp_path: Path) -> None:
    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    write(a / "f.txt", b"base")
    net.change(A_ID)
    net.settle()
    write(b / "f.txt", b"edit on b (not scanned yet)", mtime_s=1_700_000_100)
    write(a / "f.txt", b"edit on a", mtime_s=1_700_000_200)
    net.change(A_ID, ["f.txt"])
    net.settle()
    net.change(B_ID, ["f.txt"])
    net.settle()
    assert tree(a) == tree(b)
    contents = sorted(v[0] for v in tree(b).values() if v[0] is not None)
    assert contents == [b"edit on a", b"edit on b (not scanned yet)"]


def test_a_queued_pull_overtaken_by_a_deletion_deletes(tmp_path: Path) -> None:
    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    write(a / "f2", b"two")
    net.change(A_ID)
    net.settle()
    eb = net.engines[B_ID]
    eb.max_jobs = 0  # stands for a busy puller: new pulls wait in the queue
    write(a / "f2", b"two edited", mtime_s=1_700_000_300)
    net.change(A_ID)
    net.settle()
    (a / "f2").unlink()
    net.change(A_ID)
    net.settle()
    assert "f2" in eb.deletes and "f2" in eb.queue
    eb.max_jobs = 128
    net.change(B_ID, [])
    net.settle()
    assert not (b / "f2").exists()
    rec = eb.index.local("f2")
    assert rec is not None and rec.deleted


def test_a_deletion_superseded_by_a_new_version_is_pulled_not_recorded(tmp_path: Path) -> None:
    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    write(a / "f.txt", b"base", mtime_s=1_700_000_050)
    net.change(A_ID)
    net.settle()
    eb = net.engines[B_ID]
    eb.max_jobs = 0
    write(a / "g", b"another file")
    net.change(A_ID)
    net.settle()  # g waits in the queue, so deletions wait too
    (a / "f.txt").unlink()
    net.change(A_ID)
    net.settle()
    write(a / "f.txt", b"recreated on A", mtime_s=1_700_000_300)
    net.change(A_ID)
    net.settle()
    assert "f.txt" in eb.deletes and "f.txt" in eb.queue
    write(b / "f.txt", b"edited on B", mtime_s=1_700_000_200)  # its event not handled yet
    eb.max_jobs = 128
    net.change(B_ID, [])
    net.settle()
    net.change(B_ID)
    net.change(A_ID)
    net.settle()
    assert tree(a) == tree(b)
    assert b"recreated on A" in {v[0] for v in tree(a).values()}, "A's newer version survives"


def test_an_exec_bit_set_during_a_download_is_not_lost(tmp_path: Path) -> None:
    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    write(a / "f", b"one")
    net.change(A_ID)
    net.settle()
    write(a / "f", os.urandom(1_000_000), mtime_s=1_700_000_300)
    net.change(A_ID, ["f"])
    net.step(limit=3)
    assert net.engines[B_ID].jobs
    os.chmod(b / "f", 0o755)  # noqa: S103 (a local change, not scanned yet)
    net.settle()
    net.change(B_ID)
    net.settle()
    assert tree(a) == tree(b)
    assert any(exe for _, exe in tree(b).values()), "the local exec bit survives (as the winner or a conflict copy)"


# -- files, directories and what sits at a name -------------------------------------------------


def test_a_file_replaced_by_a_directory_syncs(tmp_path: Path) -> None:
    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    write(a / "x", b"file")
    net.change(A_ID)
    net.settle()
    (a / "x").unlink()
    write(a / "x/inner", b"inner")
    net.change(A_ID)
    net.settle()
    assert tree(a) == tree(b)


def test_a_directory_replaced_by_a_file_syncs_and_other_deletions_still_apply(tmp_path: Path) -> None:
    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    write(a / "x/inner", b"inner")
    write(a / "unrelated.txt", b"u")
    net.change(A_ID)
    net.settle()
    (a / "x/inner").unlink()
    (a / "x").rmdir()
    write(a / "x", b"now a file")
    (a / "unrelated.txt").unlink()
    net.change(A_ID)
    net.settle()
    assert tree(a) == tree(b)
    assert net.engines[B_ID].status().state == "idle"


def test_a_directory_that_holds_new_files_is_kept_as_a_conflict_copy(tmp_path: Path) -> None:
    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    net.links.clear()
    write(a / "x", b"file on A")
    write(b / "x/inner", b"dir on B")
    net.change(A_ID)
    net.change(B_ID)
    net.connect(A_ID, B_ID)
    net.settle()
    assert tree(a) == tree(b)
    assert tree(a)["x"] == (b"file on A", False)
    assert any(k.endswith("/inner") and v[0] == b"dir on B" for k, v in tree(a).items())


def test_a_peer_announcing_a_file_and_its_own_child_does_not_wedge_the_folder(tmp_path: Path) -> None:
    net = Net(tmp_path, [A_ID, B_ID])
    write(net.root(A_ID) / "old.txt", b"to be deleted")
    net.change(A_ID)
    net.connect(A_ID, B_ID)
    net.settle()
    victim = net.engines[B_ID]
    hello_from(victim, M_ID, net.now)
    data = {"a": b"file a", "a/b": b"file a/b"}

    def serve(out: list[Outgoing]) -> None:
        for _ in range(50):
            reqs = requests_to(out, M_ID)
            if not reqs:
                return
            out = []
            for r in reqs:
                resp = Response(r.request_id, data[r.name][r.offset : r.offset + r.size])
                out += victim.on_peer_message(M_ID, wire(resp), net.now)

    files = (finfo("a", data["a"], M_ID, 1), finfo("a/b", data["a/b"], M_ID, 2))
    serve(victim.on_peer_message(M_ID, wire(IndexUpdate("default", files)), net.now))
    (net.root(A_ID) / "old.txt").unlink()
    net.change(A_ID)
    for _ in range(5):
        net.step()
        net.advance(1)
        serve(victim.handle_timer(net.now))
    assert not (net.root(B_ID) / "old.txt").exists(), "the honest peer's deletion is applied"


def test_a_stale_temp_file_does_not_keep_a_deleted_directory(tmp_path: Path) -> None:
    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    write(a / "d/small", b"s")
    net.change(A_ID)
    net.settle()
    write(a / "d/big", os.urandom(3_000_000))
    net.change(A_ID)
    eb = net.engines[B_ID]
    eb.max_inflight_bytes = 256 * 1024
    net.step(limit=4)
    assert eb.jobs, "B is pulling d/big"
    shutil.rmtree(a / "d")
    net.change(A_ID)
    net.settle()
    assert tree(a) == tree(b)
    assert not (b / "d").exists()


def test_an_event_for_a_file_replaced_by_a_symlink_records_a_deletion(tmp_path: Path) -> None:
    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    write(a / "f", b"data")
    net.change(A_ID)
    net.settle()
    (a / "f").unlink()
    os.symlink("/etc/passwd", a / "f")
    net.change(A_ID, ["f"])
    net.settle()
    rec = net.engines[A_ID].index.local("f")
    assert rec is not None and rec.deleted
    assert not (b / "f").exists()


def test_a_directory_swapped_for_a_symlink_before_its_fsync_does_not_fail_every_flush(tmp_path: Path) -> None:
    net = Net(tmp_path, [B_ID])
    eng = net.engines[B_ID]
    (tmp_path / "elsewhere").mkdir()
    (net.root(B_ID) / "d").symlink_to(tmp_path / "elsewhere")
    eng.dirty_dirs.add("d")  # a directory we wrote in, swapped since
    eng.pump(net.now)
    eng.pump(net.now)
    assert not eng.dirty_dirs


# -- FIFOs ----------------------------------------------------------------------------------------


def test_a_fifo_named_by_an_event_does_not_hang_the_scan(tmp_path: Path) -> None:
    net = pair(tmp_path)
    os.mkfifo(net.root(B_ID) / "pipe")
    assert finishes(lambda: net.change(B_ID, ["pipe"]))
    assert net.engines[B_ID].index.local("pipe") is None


def test_a_fifo_named_tofuignore_does_not_hang_the_scan(tmp_path: Path) -> None:
    net = pair(tmp_path)
    os.mkfifo(net.root(B_ID) / ".tofuignore")
    assert finishes(lambda: net.change(B_ID))


def test_a_request_for_a_file_replaced_by_a_fifo_does_not_hang_the_server(tmp_path: Path) -> None:
    net = Net(tmp_path, [B_ID])
    root = net.root(B_ID)
    write(root / "f", b"data")
    net.change(B_ID)
    rec = net.engines[B_ID].index.local("f")
    assert rec is not None
    server = BlockServer("default", root, tmp_path / "B.db")
    try:
        (root / "f").unlink()
        os.mkfifo(root / "f")
        got: list[list[Response]] = []
        assert finishes(lambda: got.append(server.serve([Request("default", "f", 0, 4, rec.block_hash(0), 1)])))
        assert got[0][0].data == b""
    finally:
        server.close()


# -- conflict names -------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["x" * 250 + ".txt", "é" * 127, "a." + "e" * 252, "ü" * 100 + ".tar.gz"])
def test_a_conflict_copy_of_a_long_name_is_a_valid_name(base: str) -> None:
    loser = FileInfo(f"d/{base}", FileType.FILE, 1, 1_700_000_000 * 10**9, False, False, Vector.of({A_ID: 1}), 1,
                     block_size_for(1), b"\0" * 32, A_ID)  # fmt: skip
    name = conflict_name(loser)
    last = name.rpartition("/")[2]
    assert len(last.encode()) <= MAX_COMPONENT_BYTES
    assert ".sync-conflict-20231114-221320-AAAAAAA" in last
    assert name.startswith("d/") and name == conflict_name(loser)


def test_a_conflict_on_a_long_name_keeps_both_versions(tmp_path: Path) -> None:
    net = pair(tmp_path)
    a, b = net.root(A_ID), net.root(B_ID)
    name = "x" * 240 + ".txt"
    write(a / name, b"base")
    net.change(A_ID)
    net.settle()
    net.links.clear()
    write(a / name, b"from a", mtime_s=1_700_000_100)
    write(b / name, b"from b", mtime_s=1_700_000_200)
    net.change(A_ID, [name])
    net.change(B_ID, [name])
    net.connect(A_ID, B_ID)
    net.settle()
    assert tree(a) == tree(b)
    assert sorted(v[0] for v in tree(a).values() if v[0] is not None) == [b"from a", b"from b"]


# -- a trusted peer gone bad ----------------------------------------------------------------------


def test_a_peer_answering_another_peers_request_id_does_not_steal_it(tmp_path: Path) -> None:
    from agent.errors import RemoteProtocolError

    net = Net(tmp_path, [A_ID, B_ID])
    data = os.urandom(1000)
    write(net.root(A_ID) / "f.bin", data)
    net.change(A_ID)
    net.connect(A_ID, B_ID)
    while not any(isinstance(m, Request) and s == B_ID for s, _, m in net.queue):
        net.step(limit=1)
    victim = net.engines[B_ID]
    req = next(m for s, _, m in net.queue if isinstance(m, Request) and s == B_ID)
    hello_from(victim, M_ID, net.now)
    with pytest.raises(RemoteProtocolError):
        victim.on_peer_message(M_ID, wire(Response(req.request_id, b"")), net.now)
    net.settle()  # the honest answer is taken
    assert (net.root(B_ID) / "f.bin").read_bytes() == data


def test_a_peer_that_never_answers_does_not_stop_pulls_from_another(tmp_path: Path) -> None:
    net = pair(tmp_path)
    victim = net.engines[B_ID]
    hello_from(victim, M_ID, net.now)
    size = 256 * 1024 * 1024
    nblocks = -(-size // block_size_for(size))
    claim = finfo("big.bin", None, M_ID, 1, size=size, hashes=secrets.token_bytes(32 * nblocks))
    assert requests_to(victim.on_peer_message(M_ID, wire(IndexUpdate("default", (claim,))), net.now), M_ID)
    write(net.root(A_ID) / "honest.txt", b"from the honest peer")
    net.change(A_ID)
    net.settle()
    assert (net.root(B_ID) / "honest.txt").read_bytes() == b"from the honest peer"


@pytest.mark.slow
def test_requests_cancelled_by_newer_versions_stay_bounded(tmp_path: Path) -> None:
    net = Net(tmp_path, [B_ID])
    victim = net.engines[B_ID]
    hello_from(victim, M_ID, net.now)
    size, bs = 64 * 1024 * 1024, 128 * 1024
    for seq in range(1, 60):
        f = FileInfo("churn.bin", FileType.FILE, size, 1, False, False, Vector.of({M_ID: seq}), seq, bs,
                     secrets.token_bytes(32 * (size // bs)), M_ID)  # fmt: skip
        victim.on_peer_message(M_ID, wire(IndexUpdate("default", (f,))), net.now)
    window = victim.max_inflight_bytes // bs
    assert len(victim.cancelled) + len(victim.requests) <= window


def test_request_ids_still_in_use_are_skipped_when_the_counter_wraps(tmp_path: Path) -> None:
    net = Net(tmp_path, [B_ID], request_id_mask=0x3)
    eng = net.engines[B_ID]
    eng.requests[eng.request_id_base | 0] = (M_ID, "x", 0)
    eng.cancelled[eng.request_id_base | 1] = (M_ID, 1)
    ids = [eng._new_request_id() for _ in range(4)]
    assert eng.request_id_base | 0 not in ids and eng.request_id_base | 1 not in ids


def test_a_peer_announcing_more_record_bytes_than_the_cap_is_refused(tmp_path: Path) -> None:
    from agent.errors import ErrorCode, RemoteProtocolError

    net = Net(tmp_path, [B_ID])
    victim = net.engines[B_ID]
    victim.max_remote_bytes = 4 * 1024 * 1024
    hello_from(victim, M_ID, net.now)
    size = 8 * 1024 * 1024 * 1024  # 8 GiB claims: 4096 blocks of 2 MiB, 128 KiB of hashes each
    nblocks = -(-size // block_size_for(size))

    def claim(i: int) -> FileInfo:
        return finfo(f"f{i}", None, M_ID, i + 1, size=size, hashes=secrets.token_bytes(32 * nblocks))

    victim.on_peer_message(M_ID, wire(IndexUpdate("default", tuple(claim(i) for i in range(20)))), net.now)
    victim.peer_disconnected(M_ID)
    hello_from(victim, M_ID, net.now)  # a new session counts what the database holds
    with pytest.raises(RemoteProtocolError) as err:
        victim.on_peer_message(M_ID, wire(IndexUpdate("default", tuple(claim(i) for i in range(20, 40)))), net.now)
    assert err.value.code is ErrorCode.LIMIT_EXCEEDED
    assert victim.index.count_remote(M_ID) == 20, "the refused message stored nothing"


def test_files_only_a_stalled_peer_has_do_not_hold_every_pull_slot(tmp_path: Path) -> None:
    from agent.sync.engine import STALL_TIMEOUT

    net = pair(tmp_path)
    victim = net.engines[B_ID]
    hello_from(victim, M_ID, net.now)
    size = 2 * 128 * 1024
    claims = tuple(
        finfo(f"m{k:03}", None, M_ID, k + 1, size=size, hashes=secrets.token_bytes(32 * 2))
        for k in range(victim.max_jobs)
    )
    asked = requests_to(victim.on_peer_message(M_ID, wire(IndexUpdate("default", claims)), net.now), M_ID)
    assert asked and len(victim.jobs) == victim.max_jobs, "every slot waits on the peer that never answers"
    write(net.root(A_ID) / "honest.txt", b"from the honest peer")
    net.change(A_ID)
    net.settle()
    assert not (net.root(B_ID) / "honest.txt").exists()
    assert victim.get_timer() <= net.mono + STALL_TIMEOUT
    later(net, B_ID, STALL_TIMEOUT + 1)
    assert (net.root(B_ID) / "honest.txt").read_bytes() == b"from the honest peer"
    assert not victim.jobs and victim.peers[M_ID].stalled
    # the stalled peer's late answer is taken quietly and clears the stall
    victim.on_peer_message(M_ID, wire(Response(asked[0].request_id, b"")), net.now)
    assert not victim.peers[M_ID].stalled


def test_unignoring_a_pattern_syncs_what_it_hid_at_once(tmp_path: Path) -> None:
    net = Net(tmp_path, [A_ID, B_ID])
    a, b = net.root(A_ID), net.root(B_ID)
    write(a / ".tofuignore", b"*.log\n")
    write(a / "local.log", b"A's log")
    write(b / "remote.log", b"B's log")
    net.change(A_ID)
    net.change(B_ID)
    net.connect(A_ID, B_ID)
    net.settle()
    assert not (a / "remote.log").exists() and not (b / "local.log").exists()
    # the pattern goes: only `.tofuignore` changed as far as the event says
    write(a / ".tofuignore", b"# nothing ignored\n")
    net.change(A_ID, [".tofuignore"])
    net.settle()
    assert (a / "remote.log").read_bytes() == b"B's log", "a peer's file the pattern hid is pulled"
    assert (b / "local.log").read_bytes() == b"A's log", "a local file the pattern hid is announced"


def test_a_new_pattern_stops_pulls_of_what_it_ignores(tmp_path: Path) -> None:
    net = Net(tmp_path, [A_ID, B_ID])
    write(net.root(B_ID) / "big.iso", b"x" * 100_000)
    net.change(B_ID)
    net.connect(A_ID, B_ID)
    net.step(limit=4)  # hellos and indexes: A needs big.iso
    eng = net.engines[A_ID]
    assert "big.iso" in eng.need
    write(net.root(A_ID) / ".tofuignore", b"*.iso\n")
    net.change(A_ID, [".tofuignore"])
    assert "big.iso" not in eng.need and not eng.jobs
    net.settle()
    assert not (net.root(A_ID) / "big.iso").exists()


def test_need_bytes_falls_while_a_large_file_arrives(tmp_path: Path) -> None:
    net = Net(tmp_path, [A_ID, B_ID])
    data = secrets.token_bytes(4 * 1024 * 1024)
    write(net.root(A_ID) / "big", data)
    net.change(A_ID)
    b = net.engines[B_ID]
    b.max_inflight_bytes = block_size_for(len(data))  # one block in flight: the transfer takes many steps
    net.connect(A_ID, B_ID)
    seen = []
    while net.queue:
        net.step(limit=1)
        seen.append(b.status().need_bytes)
    net.settle()
    assert (net.root(B_ID) / "big").read_bytes() == data and b.status().need_bytes == 0
    during = [x for x in seen if 0 < x < len(data)]
    assert len(set(during)) >= 3, f"need_bytes only took the values {sorted(set(seen))}"
    first = seen.index(len(data))
    assert seen[first:] == sorted(seen[first:], reverse=True), "it only ever falls once the pull began"


def test_deleting_a_directory_announced_over_several_messages_leaves_nothing(tmp_path: Path) -> None:
    net = Net(tmp_path, [A_ID, B_ID], max_files_per_message=3)  # the directory's record comes first, alone
    net.connect(A_ID, B_ID)
    net.settle()
    a, b = net.root(A_ID), net.root(B_ID)
    for i in range(10):
        write(a / "big" / "sub" / f"f{i}", b"x")
    net.change(A_ID)
    net.settle()
    assert len(tree(b)) == 12
    shutil.rmtree(a / "big")
    net.change(A_ID)
    net.settle()
    assert tree(b) == {}, "the emptied directories are deleted too"


def test_pulls_stop_before_the_disk_is_full_and_resume_when_there_is_room(tmp_path: Path) -> None:
    net = pair(tmp_path)
    b = net.engines[B_ID]
    disk = {"free": 10**9 + 50_000, "total": 100 * 10**9}  # 1 GB must stay free (1 %): 50 kB of room
    b.fs.free_space = lambda: (disk["free"], disk["total"])  # type: ignore[method-assign]
    write(net.root(A_ID) / "small", b"s" * 10_000)
    write(net.root(A_ID) / "large", b"l" * 100_000)
    net.change(A_ID)
    net.settle()
    assert (net.root(B_ID) / "small").exists() and not (net.root(B_ID) / "large").exists()
    assert b.status().failed_files == 1
    disk["free"] = 10 * 10**9
    later(net, B_ID)
    assert (net.root(B_ID) / "large").read_bytes() == b"l" * 100_000
    assert b.status().failed_files == 0
