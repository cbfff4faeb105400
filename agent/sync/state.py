"""What the sync shell keeps per open peer link (`_Link`) and per folder (`_Folder`).

Plain records shared by the shell's modules: `service` (engine workers, inboxes, link hooks),
`sender` (each link's send loop), `watcher` (file-system events), `sharing` (which folders a
peer is given) and `requests` (a person's requests); `folder_json` is a folder's `status --json`
entry. The names keep their leading underscore: they belong to the shell, not to the
rest of the agent.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from agent.config import FolderConfig
from agent.errors import RemoteProtocolError
from agent.net.link import PeerLink
from agent.sync.engine import FolderStatus, SyncEngine
from agent.sync.messages import FolderHello, SyncMessage
from agent.sync.server import BlockServer

InboxKind = Literal["open", "close", "msg", "sent"]  # "sent": one of our index messages went out


@dataclass(eq=False)
class _Link:
    """One open peer link as the service sees it: its send queue and its fate."""

    link: PeerLink
    device_id: str
    name: str
    queue: deque[tuple[_Folder | None, SyncMessage]] = field(default_factory=deque)
    wake: anyio.Event = field(default_factory=anyio.Event)
    room: anyio.Event = field(default_factory=anyio.Event)
    serves: int = 0
    closed: bool = False
    error: RemoteProtocolError | None = None
    shared: frozenset[str] = frozenset()  # ids of the folders shared with this peer
    was_shared: set[str] = field(default_factory=set)  # shared earlier on this link, not any more
    hellos: dict[str, FolderHello] = field(default_factory=dict)  # its hellos for folders not shared
    new_offers: int = 0

    def push(self, msg: SyncMessage, folder: _Folder | None = None) -> None:
        """Queue `msg` for sending (with `folder`: a request to serve from that folder). A message
        about a folder not shared with this peer never leaves, whoever made it."""
        folder_id: str | None = getattr(msg, "folder", None)
        if not self.closed and (folder_id is None or folder_id in self.shared):
            self.queue.append((folder, msg))
            self.wake.set()


@dataclass(eq=False)
class _Folder:
    """One folder: its engine, the lock around it, and the inputs waiting for it."""

    number: int
    config: FolderConfig
    engine: SyncEngine
    server: BlockServer  # answers block requests without waiting for the engine's lock
    lock: threading.Lock = field(default_factory=threading.Lock)
    inbox: deque[tuple[InboxKind, _Link, SyncMessage | None]] = field(default_factory=deque)
    inbox_bytes: int = 0
    changed: set[str] = field(default_factory=set)
    rescan: bool = False
    wake: anyio.Event = field(default_factory=anyio.Event)
    room: anyio.Event = field(default_factory=anyio.Event)
    current: dict[str, _Link] = field(default_factory=dict)  # the engine's view: peer -> link (worker only)
    # What `status` shows: published by the worker (a frozen object, swapped whole) at the end of
    # a batch, so the event loop reads it without the lock and without SQL.
    snapshot: FolderStatus = field(default_factory=lambda: FolderStatus("scanning", 0, 0, 0, 0, {}))
    snapshot_at: float = 0.0  # monotonic
    stale: bool = False  # the engine moved on since the snapshot: publish again within STATUS_INTERVAL
    reported: dict[str, tuple[int, int]] = field(default_factory=dict)  # progress last sent per peer
    blocks_received: int = 0  # on the wire: responses with data, and their bytes
    bytes_received: int = 0
    halted: bool = False  # the engine was stopped (missing root) after the last step
    watch_scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    started: anyio.Event = field(default_factory=anyio.Event)  # the engine's start is done (its root made)
    watching: anyio.Event = field(default_factory=anyio.Event)  # the watch is in place: no change goes unseen

    def put(self, kind: InboxKind, link: _Link, msg: SyncMessage | None = None, size: int = 0) -> None:
        self.inbox.append((kind, link, msg))
        self.inbox_bytes += size
        self.wake.set()


def folder_json(f: _Folder, links: Mapping[str, _Link]) -> dict[str, Any]:
    """One folder's entry in `status --json`, from its published snapshot (no lock, no SQL)."""
    snap = f.snapshot  # one read: the worker swaps in a whole new object
    state = "paused" if f.config.paused and snap.state == "idle" else snap.state
    peers = []
    for device_id, progress in sorted(snap.peers.items()):
        need_files, need_bytes = progress if progress is not None else (0, 0)
        total = max(snap.bytes, need_bytes)
        percent = 100.0 if not total else 100.0 * (total - need_bytes) / total
        if need_files and percent >= 100.0:
            percent = 99.0
        ls = links.get(device_id)
        peers.append(
            {
                "device_id": device_id,
                "name": ls.name if ls else "",
                "need_files": need_files,
                "need_bytes": need_bytes,
                "percent": round(percent, 1),
            }
        )
    return {
        "id": f.config.id,
        "path": str(f.config.path),
        "devices": "household" if f.config.devices is None else list(f.config.devices),
        "state": state,
        "error": snap.error,
        "failed_files": snap.failed_files,
        "files": snap.files,
        "bytes": snap.bytes,
        "need_files": snap.need_files,
        "need_bytes": snap.need_bytes,
        "peers": peers,
        "blocks_received": f.blocks_received,
        "bytes_received": f.bytes_received,
        "blocks_requested": snap.blocks_requested,
        "type": f.config.type,
        "paused": f.config.paused,
        "versioning": f.config.versioning,
        "remote_differs": snap.remote_differs,
        "locally_changed": snap.locally_changed,
        "versions_evicted": snap.versions_evicted,
    }
