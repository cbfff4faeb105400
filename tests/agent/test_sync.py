"""Real agents on loopback syncing a folder: every kind of change, big files, conflicts, crashes, hostile peers.

One pair of agents (alpha, beta; static peers) serves most tests, each in its own subdirectory;
tests that stop or kill an agent leave the pair connected again. Waits are conditions with
deadlines, never sleeps.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ProtocolError
from agent.host.paths import resolve_paths
from agent.identity import keys as identity
from agent.net import transport
from agent.sync.blocks import block_size_for, hash_bytes
from agent.sync.messages import FolderHello, Index, Request, Response, SyncMessage
from agent.sync.model import FileInfo, FileType
from agent.sync.vectors import Vector
from agent.wire.handshake import Connection, HandshakeComplete, MessageReceived, PeerAuthenticated, PeerClosed, Role
from agent.wire.messages import WireMessage
from testkit import ROOT
from testkit.agents import AgentProc, cli
from testkit.homes import new_home
from testkit.wait import wait_for

pytestmark = pytest.mark.slow  # agent processes: many starts, restarts and handshakes

MiB = 1024 * 1024


class Pair:
    """Two connected agents, each syncing `HOME/f` as folder `default`."""

    def __init__(self) -> None:
        self.homes = [new_home(), new_home()]
        self.a = AgentProc(self.homes[0], "alpha")
        self.b = AgentProc(self.homes[1], "beta")
        self.a.start("--folder", str(self.fa), peers=[self.b])
        self.b.start("--folder", str(self.fb), peers=[self.a])
        self.ida = self.a.identity()["device_id"]
        self.idb = self.b.identity()["device_id"]
        self.connected()

    @property
    def fa(self) -> Path:
        return self.homes[0] / "f"

    @property
    def fb(self) -> Path:
        return self.homes[1] / "f"

    def connected(self) -> None:
        self.a.wait_peer(self.idb, connected=True, timeout=20)
        self.b.wait_peer(self.ida, connected=True, timeout=20)

    def restart_b(self, sig: str = "term") -> None:
        if sig == "kill":
            self.b.kill()
        else:
            self.b.stop()

    def start_b(self) -> None:
        self.b.start("--folder", str(self.fb), peers=[self.a])
        self.connected()

    def close(self) -> None:
        for p in (self.a, self.b):
            p.kill()
        for h in self.homes:
            shutil.rmtree(h, ignore_errors=True)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    p = Pair()
    try:
        yield p
    finally:
        p.close()


def snapshot(root: Path) -> dict[str, tuple[str, int, int | None, str | None]]:
    """{name: (kind, mode bits, mtime_ns, sha256)} of everything under `root` but our temp files."""
    out: dict[str, tuple[str, int, int | None, str | None]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if name.startswith(".tofu-tmp-") or rel.split("/")[0] in (".tofu-folder", ".tofu-versions"):  # ours
                continue
            st = path.lstat()
            if path.is_symlink():
                out[rel] = ("link", 0, None, None)
            elif path.is_dir():
                out[rel] = ("dir", 0, None, None)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[rel] = ("file", st.st_mode & 0o100, st.st_mtime_ns, digest)
    return out


def _matching(a: Path, b: Path) -> bool:
    """`a` and `b` look the same now; False also when an agent moved a file while we walked."""
    try:
        return a.exists() and snapshot(a) == snapshot(b)
    except (FileNotFoundError, NotADirectoryError):
        return False  # a rename or delete in progress: look again


def same_tree(a: Path, b: Path, timeout: float = 30.0, what: str = "the folders to match") -> None:
    """Wait until `a` and `b` hold the same names, content, exec bits and mtimes."""
    try:
        wait_for(lambda: _matching(a, b), timeout, what)
    except AssertionError:
        sa, sb = snapshot(a) if a.exists() else {}, snapshot(b) if b.exists() else {}
        diff = {k: (sa.get(k), sb.get(k)) for k in sa.keys() | sb.keys() if sa.get(k) != sb.get(k)}
        raise AssertionError(f"{what}: still differing: {dict(list(diff.items())[:10])}") from None


def folder_status(agent: AgentProc) -> dict[str, Any]:
    st = agent.status()
    assert st is not None
    folder: dict[str, Any] = st["folders"][0]
    return folder


def write(path: Path, data: bytes, mtime_s: float | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime_s is not None:
        os.utime(path, (mtime_s, mtime_s))


def big_random(path: Path, size: int, stage_dir: Path) -> None:
    """A file of `size` random bytes, written outside the folder and moved into place in one rename."""
    stage = stage_dir / ("stage-" + secrets.token_hex(4))
    with stage.open("wb") as fh:
        left = size
        while left:
            n = min(left, 8 * MiB)
            fh.write(os.urandom(n))
            left -= n
    path.parent.mkdir(parents=True, exist_ok=True)
    stage.rename(path)


class HostilePeer:
    """A blocking client that speaks the protocol honestly up to OPEN and then says what it likes."""

    def __init__(self, home: Path, port: int) -> None:
        self.ident = identity.load_or_create(resolve_paths(home), "mallory", dt.datetime.now(dt.UTC))
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = transport.client_context().wrap_socket(raw)
        server_fp = identity.fingerprint_of_cert(self.sock.getpeercert(binary_form=True) or b"")
        self.conn = Connection(Role.CLIENT, self.ident, secrets.token_bytes(32), server_fp_tls=server_fp)
        self.received: list[WireMessage] = []
        self.closed_code: str | None = None
        self.conn.initiate(time.monotonic())
        self._flush()
        deadline = time.monotonic() + 10
        while not self._open and time.monotonic() < deadline:
            self._pump_once()
        assert self._open, "handshake with the agent did not complete"

    _open = False

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def _pump_once(self, timeout: float = 1.0) -> bool:
        """Read once and handle events; False at EOF or close."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return True
        except (OSError, ssl.SSLError):
            data = b""
        try:
            self.conn.receive_data(data, time.monotonic())
            while (event := self.conn.next_event()) is not None:
                match event:
                    case PeerAuthenticated():
                        self.conn.accept(time.monotonic())
                    case HandshakeComplete():
                        self._open = True
                    case MessageReceived():
                        self.received.append(event.message)
                    case PeerClosed():
                        self.closed_code = event.code.value
                        return False
            self._flush()
        except ProtocolError:
            return False
        return bool(data)

    def send(self, msg: SyncMessage) -> None:
        self.conn.send(msg)
        self._flush()

    def offer(self, folder: str, files: dict[str, bytes | None], until: Callable[[], bool] = lambda: False) -> None:
        """Say hello and announce `files` (None: a directory), then serve their blocks until closed."""
        infos = []
        for seq, (name, data) in enumerate(files.items(), start=1):
            vec = Vector().bump(self.ident.device_id, int(time.time()))
            if data is None:
                infos.append(FileInfo(name, FileType.DIR, 0, 0, False, False, vec, seq, 0, b"", self.ident.device_id))
            else:
                bs = block_size_for(len(data))
                infos.append(
                    FileInfo(name, FileType.FILE, len(data), time.time_ns(), False, False, vec, seq, bs,
                             hash_bytes(data, bs), self.ident.device_id)
                )  # fmt: skip
        self.send(FolderHello(folder, secrets.token_bytes(16), b"", 0))
        self.send(Index(folder, tuple(infos)))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not until() and self._pump_once(0.2):
            for msg in self.received:
                if isinstance(msg, Request):
                    data = files.get(msg.name) or b""
                    self.send(Response(msg.request_id, data[msg.offset : msg.offset + msg.size]))
            self.received.clear()

    def close(self) -> None:
        self.sock.close()


def test_create_edit_delete_rename_nested_empty(pair: Pair) -> None:
    a, b = pair.fa / "basic", pair.fb / "basic"
    write(a / "x.txt", b"hello", mtime_s=1_600_000_000)
    write(a / "d1" / "d2" / "d3" / "deep.bin", os.urandom(300_000))
    write(a / "empty", b"")
    (a / "emptydir" / "inner").mkdir(parents=True)
    write(a / "run.sh", b"#!/bin/sh\necho hi\n")
    (a / "run.sh").chmod(0o755)
    same_tree(a, b, what="creation to reach beta")
    assert (b / "run.sh").stat().st_mode & 0o100, "exec bit kept"
    assert (b / "x.txt").stat().st_mtime_ns == 1_600_000_000 * 10**9, "mtime kept"
    assert (b / "empty").stat().st_size == 0
    write(b / "x.txt", b"edited on beta")
    same_tree(a, b, what="an edit on beta to reach alpha")
    assert (a / "x.txt").read_bytes() == b"edited on beta"
    (a / "d1").rename(a / "moved")
    (a / "run.sh").rename(a / "moved" / "run2.sh")
    same_tree(a, b, what="renames to reach beta")
    assert not (b / "d1").exists() and (b / "moved" / "d2" / "d3" / "deep.bin").exists()
    (a / "moved" / "d2" / "d3" / "deep.bin").unlink()
    shutil.rmtree(a / "emptydir")
    same_tree(a, b, what="deletions to reach beta")
    assert not (b / "emptydir").exists()


def test_symlinks_are_not_synced_and_tofuignore_works(pair: Pair) -> None:
    a, b = pair.fa / "links", pair.fb / "links"
    outside = pair.homes[0] / "outside"
    write(outside / "secret.txt", b"not for sync")
    write(a / "real.txt", b"real")
    (a / "link-to-dir").symlink_to(outside)
    (a / "link-to-file").symlink_to(a / "real.txt")
    write(pair.fa / ".tofuignore", b"*.log\nbuild/\n!keep.log\n")
    write(a / "noise.log", b"ignored")
    write(a / "keep.log", b"kept")
    write(a / "build" / "out.o", b"ignored too")
    write(a / "marker.txt", b"last")
    wait_for(lambda: (b / "marker.txt").exists() and (b / "keep.log").exists(), 30, "beta to get the files")
    wait_for(lambda: (pair.fb / ".tofuignore").exists(), 10, ".tofuignore to sync")
    assert (b / "real.txt").read_bytes() == b"real"
    assert not (b / "link-to-dir").exists() and not (b / "link-to-dir").is_symlink()
    assert not (b / "link-to-file").exists() and not (b / "link-to-file").is_symlink()
    assert not (b / "noise.log").exists() and not (b / "build").exists()
    (pair.fa / ".tofuignore").unlink()


def test_large_file_then_one_byte_edit_moves_one_block(pair: Pair) -> None:
    a, b = pair.fa / "large", pair.fb / "large"
    big_random(a / "big.bin", 100 * MiB, pair.homes[0])
    wait_for(lambda: (b / "big.bin").exists(), 60, "the 100 MiB file to reach beta")
    assert (
        hashlib.sha256((b / "big.bin").read_bytes()).digest() == hashlib.sha256((a / "big.bin").read_bytes()).digest()
    )
    before = folder_status(pair.b)
    with (a / "big.bin").open("r+b") as fh:
        fh.seek(50 * MiB + 12345)
        fh.write(b"\x00" if fh.read(1) != b"\x00" else b"\x01")
    want = hashlib.sha256((a / "big.bin").read_bytes()).digest()
    wait_for(lambda: hashlib.sha256((b / "big.bin").read_bytes()).digest() == want, 60, "the edit to reach beta")
    after = wait_for(lambda: (s := folder_status(pair.b))["state"] == "idle" and s, 20, "beta idle")
    blocks = after["blocks_received"] - before["blocks_received"]
    moved = after["bytes_received"] - before["bytes_received"]
    block = block_size_for(100 * MiB)
    assert blocks == 1 and moved == block, f"{blocks} blocks / {moved} bytes moved for a one-byte edit"
    assert (b / "big.bin").stat().st_mtime_ns == (a / "big.bin").stat().st_mtime_ns


def test_status_json_has_the_folder_fields(pair: Pair) -> None:
    st = folder_status(pair.a)
    for key in ("id", "path", "state", "files", "bytes", "need_files", "need_bytes", "peers"):
        assert key in st
    assert st["id"] == "default" and st["path"] == str(pair.fa)
    peer = wait_for(lambda: folder_status(pair.a)["peers"], 10, "the peer entry")[0]
    assert peer["device_id"] == pair.idb and peer["name"] == "beta"
    assert {"need_files", "need_bytes", "percent"} <= peer.keys()


def test_a_folder_moved_away_stops_and_deletes_nothing_on_the_peer(pair: Pair) -> None:
    a, b = pair.fa / "moved", pair.fb / "moved"
    write(a / "keep.txt", b"keep me")
    same_tree(a, b)
    inode = (b / "keep.txt").stat().st_ino
    away = pair.homes[0] / "away"
    pair.fa.rename(away)  # as a disk that is unmounted, or a folder moved by its user
    try:
        stopped = wait_for(lambda: (s := folder_status(pair.a))["state"] == "error" and s, 30, "alpha to stop")
        assert ".tofu-folder" in stopped["error"]
        human = cli(pair.a.home, "status").stdout
        assert "STOPPED" in human, human
        assert not pair.fa.exists(), "a stopped folder is not made again"
    finally:
        away.rename(pair.fa)
    write(a / "after.txt", b"back again")
    same_tree(a, b, what="alpha to resume once its folder is back")
    assert folder_status(pair.a)["error"] == ""
    write(a / "later.txt", b"seen by the watcher")  # well before the 5-minute rescan would
    same_tree(a, b, what="alpha to watch its folder again")
    assert (b / "keep.txt").stat().st_ino == inode, "beta's copy was deleted (and made again) meanwhile"


def test_conflict_keeps_both_versions_on_both_machines(pair: Pair) -> None:
    a, b = pair.fa / "conflict", pair.fb / "conflict"
    write(a / "notes.txt", b"original")
    same_tree(a, b)
    pair.restart_b()
    write(a / "notes.txt", b"alpha's edit", mtime_s=1_700_000_100)
    write(b / "notes.txt", b"beta's edit", mtime_s=1_700_000_200)  # newer: beta's version wins
    write(b / "offline.txt", b"made while beta was stopped")
    pair.start_b()
    same_tree(a, b, what="the conflict to settle")
    names = sorted(p.name for p in a.iterdir())
    copies = [n for n in names if ".sync-conflict-" in n]
    assert len(copies) == 1 and copies[0].startswith("notes.sync-conflict-") and copies[0].endswith(".txt"), names
    assert (a / "notes.txt").read_bytes() == b"beta's edit"
    assert (a / copies[0]).read_bytes() == b"alpha's edit"
    assert (a / "offline.txt").read_bytes() == b"made while beta was stopped"


def test_sigkill_mid_transfer_leaves_no_torn_file_and_resumes(pair: Pair) -> None:
    a, b = pair.fa / "crash", pair.fb / "crash"
    write(a / "file.bin", b"version one")
    same_tree(a, b)
    size = 400 * MiB
    big_random(a / "file.bin", size, pair.homes[0])

    def half_fetched() -> bool:
        temps = list(b.glob(".tofu-tmp-*"))
        return bool(temps) and temps[0].stat().st_blocks * 512 > size // 4

    wait_for(half_fetched, 60, "beta to fetch a quarter of the file")
    pair.restart_b("kill")
    assert (b / "file.bin").read_bytes() == b"version one", "the old version stays whole until the new one is"
    pair.start_b()
    same_tree(a, b, timeout=90, what="the transfer to finish after the restart")
    moved = folder_status(pair.b)["bytes_received"]
    assert moved < size * 0.9, f"{moved} bytes fetched after the restart: finished blocks were fetched again"
    assert not list(b.glob(".tofu-tmp-*"))


def test_hostile_peer_writes_nothing_outside_the_folder(pair: Pair) -> None:
    outside = pair.homes[0] / "victim"
    outside.mkdir()
    (pair.fa / "trap").symlink_to(outside)  # a planted symlink must not redirect a write
    mallory_home = new_home()
    try:
        peer = HostilePeer(mallory_home, pair.a.port)
        files: dict[str, bytes | None] = {"trap/evil.txt": b"through the symlink", "trap/sub": None, "ok.txt": b"fine"}
        peer.offer("default", files, until=(pair.fa / "ok.txt").exists)
        wait_for(lambda: (pair.fa / "ok.txt").exists(), 15, "the harmless file to arrive")
        peer.close()
        peer = HostilePeer(mallory_home, pair.a.port)
        peer.offer("default", {"../escaped.txt": b"dot dot", "a/../../escaped2.txt": b"dot dot"})
        assert peer.closed_code == "bad_path", peer.closed_code
        peer.close()
    finally:
        shutil.rmtree(mallory_home, ignore_errors=True)
    wait_for(lambda: "bad_path" in pair.a.log(), 5, "the refusal in alpha's log")
    assert list(outside.iterdir()) == []
    assert not (pair.homes[0] / "escaped.txt").exists() and not (pair.homes[0] / "escaped2.txt").exists()
    assert pair.a.status() is not None, "the agent keeps running"
    (pair.fa / "trap").unlink()
    (pair.fa / "ok.txt").unlink()


@pytest.mark.timeout(120)
def test_bench_quick_mode_runs() -> None:
    """bench/sync_bench.py --quick end to end, the two-way case included, so the script cannot rot (rsync
    if installed; Syncthing is left out to keep the suite quick: its driver's config step is covered by
    the config test below)."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "sync_bench.py"), "--quick", "--no-syncthing"],
        capture_output=True, text=True, timeout=100, check=False, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "machine limits" in r.stdout and "tofu-agent memory" in r.stdout
    assert "1 big file" in r.stdout and "one-byte change" in r.stdout
    assert "two-way (16 MiB a side the other lacks): tofu-agent" in r.stdout, "the two-way case ran (issue 20)"


@pytest.mark.timeout(60)
def test_small_floor_bench_runs(tmp_path: Path) -> None:
    """bench/small_floor.py on 200 files: it writes them durably and reports each floor."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "small_floor.py"), "--files", "200", "--dirs", "4",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=50, check=False, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "durable receiver (syncfs batch)" in r.stdout and "sender read+hash" in r.stdout
    assert list(tmp_path.iterdir()) == [], "it cleans up after itself"


def _load_sync_bench() -> Any:
    spec = importlib.util.spec_from_file_location("sync_bench", ROOT / "bench" / "sync_bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_retire_frees_the_bytes_and_keeps_the_many_small_files_aside(tmp_path: Path) -> None:
    """A tool's tree after its turn: large files deleted at once, small ones moved aside (deleting
    many files slows every file creation for minutes on a journal-less ext4), nothing left under
    its name."""
    sync_bench = _load_sync_bench()
    tree_ = tmp_path / "r1-ta"
    (tree_ / "d").mkdir(parents=True)
    (tree_ / "d" / "big.bin").write_bytes(b"x" * sync_bench.RETIRE_DELETE_SIZE)
    (tree_ / "d" / "small.txt").write_bytes(b"s")
    sync_bench.retire(tree_)
    assert not tree_.exists()
    [aside] = [p for p in tmp_path.iterdir()]
    assert aside.name.startswith(".retired-r1-ta-")
    assert sorted(p.name for p in aside.rglob("*") if p.is_file()) == ["small.txt"]
    sync_bench.retire(tmp_path / "missing")  # nothing there: nothing to do


def test_bench_waits_for_a_settled_file_system_only_as_long_as_allowed(tmp_path: Path) -> None:
    """The probe before the first run: with no time allowed it returns after one probe, whatever
    it saw (the suite's own deletions may have slowed file creation just then); its probe files
    are kept aside, not deleted."""
    sync_bench = _load_sync_bench()
    sync_bench.wait_for_settled_fs(tmp_path, 0.0)
    kept = [p for p in tmp_path.iterdir()]
    assert len(kept) == 1 and kept[0].name.startswith(".retired-settle-probe-0-")
    assert len(list(kept[0].iterdir())) == sync_bench.SETTLE_PROBE_FILES


def test_bench_syncthing_config(tmp_path: Path) -> None:
    """The bench's Syncthing configuration: loopback GUI with our key, one listen address, nothing
    that reaches beyond the namespace (no syncthing binary needed)."""
    sync_bench = _load_sync_bench()
    cfg = tmp_path / "config.xml"
    cfg.write_text(
        "<configuration><gui><address>0.0.0.0:8384</address><apikey>old</apikey></gui><options>"
        "<listenAddress>default</listenAddress><listenAddress>quic://0.0.0.0:22000</listenAddress>"
        "<globalAnnounceEnabled>true</globalAnnounceEnabled><relaysEnabled>true</relaysEnabled>"
        "</options></configuration>"
    )
    sync_bench.configure_syncthing(cfg, 12345, "k" * 32, "tcp://127.0.0.1:22001")
    root = ET.parse(cfg).getroot()  # noqa: S314 - our own file
    assert root.findtext("gui/address") == "127.0.0.1:12345" and root.findtext("gui/apikey") == "k" * 32
    assert [e.text for e in root.findall("options/listenAddress")] == ["tcp://127.0.0.1:22001"]
    for key in ("globalAnnounceEnabled", "localAnnounceEnabled", "relaysEnabled", "natEnabled"):
        assert root.findtext(f"options/{key}") == "false", key
    assert root.findtext("options/urAccepted") == "-1"
