"""Engines over temp folders joined by an in-memory link that round-trips every message through the
real wire codec (frame size limit, type registry, field checks), as a TLS link would."""

from __future__ import annotations

import os
from pathlib import Path

from agent.sync.clock import Now
from agent.sync.engine import Outgoing, SyncEngine
from agent.sync.folder_type import FolderType
from agent.sync.index import FolderIndex
from agent.sync.messages import MAX_FILES_PER_MESSAGE, Index, Request, SyncMessage
from agent.sync.scheduler import REQUEST_ID_MASK
from agent.wire.frames import MAX_FRAME
from agent.wire.messages import decode_message, encode_message

A_ID = "A" * 32
B_ID = "B" * 32
C_ID = "C" * 32


def wire(msg: SyncMessage) -> SyncMessage:
    """Encode and decode `msg` as the wire layer does: what the codec refuses fails here too."""
    body = encode_message(msg)
    assert len(body) <= MAX_FRAME
    decoded = decode_message(body)
    assert isinstance(decoded, type(msg))
    return decoded


class Net:
    """Several engines and a queue of messages between them."""

    def __init__(
        self, tmp: Path, ids: list[str], *, max_files_per_message: int = MAX_FILES_PER_MESSAGE,
        request_id_mask: int = REQUEST_ID_MASK, types: dict[str, FolderType] | None = None,
    ) -> None:  # fmt: skip
        self.tmp = tmp
        self.types = types or {}  # a device's folder type, if not send-receive
        # engine limits a test makes small (constructor parameters, not patched module globals)
        self.max_files_per_message = max_files_per_message
        self.request_id_mask = request_id_mask
        # Two clocks, as the shell reads them: timers run on `mono` (its origin is arbitrary: a
        # timer taken from the wall clock by mistake would never come due), records use `wall`.
        self.mono = 1_000.0
        self.wall = 1_700_000_000.0
        self.engines: dict[str, SyncEngine] = {}
        self.links: set[tuple[str, str]] = set()
        self.queue: list[tuple[str, str, SyncMessage]] = []
        self.sent: list[tuple[str, str, SyncMessage]] = []
        for dev in ids:
            (tmp / dev[:1]).mkdir(exist_ok=True)
            self.open(dev)

    @property
    def now(self) -> Now:
        """What the engines are given for time."""
        return Now(self.mono, self.wall)

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass on both clocks."""
        self.mono += seconds
        self.wall += seconds

    def root(self, dev: str) -> Path:
        return self.tmp / dev[:1]

    def open(self, dev: str) -> SyncEngine:
        index = FolderIndex(self.tmp / f"{dev[:1]}.db")
        eng = SyncEngine(
            "default", self.root(dev), index, dev, batch_files=50, max_files_per_message=self.max_files_per_message,
            request_id_mask=self.request_id_mask, folder_type=self.types.get(dev, FolderType.SENDRECEIVE),
        )  # fmt: skip
        eng.start(self.now)
        self.engines[dev] = eng
        return eng

    def crash(self, dev: str) -> None:
        """Drop an engine without flushing, as SIGKILL would."""
        eng = self.engines.pop(dev)
        eng.close()
        eng.index.close()
        for a, b in list(self.links):
            if dev in (a, b):
                self.links.discard((a, b))
                other = b if a == dev else a
                if other in self.engines:
                    self.engines[other].peer_disconnected(dev)
        self.queue = [m for m in self.queue if dev not in m[:2]]

    def connect(self, a: str, b: str) -> None:
        self.links.add((a, b))
        self.links.add((b, a))
        self._send(a, self.engines[a].peer_connected(b, self.now))
        self._send(b, self.engines[b].peer_connected(a, self.now))

    def _send(self, src: str, out: list[Outgoing]) -> None:
        for dst, msg in out:
            if (src, dst) in self.links:
                self.queue.append((src, dst, wire(msg)))

    def step(self, limit: int = 100_000, drop: int | None = None) -> int:
        """Deliver messages until quiet (or `limit` deliveries); returns how many were delivered."""
        n = 0
        while self.queue and n < limit:
            src, dst, msg = self.queue.pop(0)
            if (src, dst) not in self.links:
                continue
            self.sent.append((src, dst, msg))
            n += 1
            if isinstance(msg, Index):
                self._send(src, self.engines[src].index_sent(dst))  # as the shell's send loop does
            self._send(dst, self.engines[dst].on_peer_message(src, msg, self.now))
        return n

    def settle(self) -> None:
        """Deliver everything, then let every engine notice its disk and flush, until quiet."""
        for _ in range(20):
            self.step()
            for dev, eng in self.engines.items():
                self._send(dev, eng.handle_timer(self.now))
                self.finish_scan(dev)
            if not self.queue:
                return
        raise AssertionError("engines did not settle")

    def change(self, dev: str, names: list[str] | None = None) -> None:
        """Tell `dev` its disk changed (a full scan if `names` is None)."""
        self.advance(1)
        eng = self.engines[dev]
        if names is None:
            eng.next_scan = 0
            self._send(dev, eng.handle_timer(self.now))
        else:
            self._send(dev, eng.on_local_change(names, self.now))
        self.finish_scan(dev)

    def finish_scan(self, dev: str) -> None:
        """Run `dev`'s chunked scan to its end, as the shell does between other inputs."""
        eng = self.engines[dev]
        while eng.scan_pending:
            self._send(dev, eng.continue_scan(self.now))

    def requests(self, src: str | None = None) -> list[Request]:
        return [m for s, _, m in self.sent if isinstance(m, Request) and (src is None or s == src)]


def tree(root: Path) -> dict[str, tuple[bytes | None, bool]]:
    """{relative path: (content or None for dirs, exec bit)} of a folder; temp files, the marker
    and the kept versions (local to each device) excluded."""
    out: dict[str, tuple[bytes | None, bool]] = {}
    for dirpath, dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel == ".":
            dirs[:] = [d for d in dirs if d not in (".tofu-folder", ".tofu-versions")]  # never synced
        for d in dirs:
            out[os.path.normpath(os.path.join(rel, d))] = (None, False)
        for f in files:
            if f.startswith(".tofu-tmp-"):
                continue
            p = os.path.join(dirpath, f)
            out[os.path.normpath(os.path.join(rel, f))] = (Path(p).read_bytes(), os.access(p, os.X_OK))
    return out


def write(path: Path, data: bytes, mtime_s: float | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime_s is not None:
        os.utime(path, (mtime_s, mtime_s))
