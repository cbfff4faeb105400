"""The sync I/O shell: runs one `SyncEngine` per configured folder for the daemon (anyio, asyncio).

Theory of operation. The shell makes no sync decisions; it moves inputs to engines and their
outputs to links.
- Each folder has a `_Folder`: its engine, a `threading.Lock` (engine calls run in worker
  threads, one at a time), and an inbox of engine inputs (a link opened or closed, a peer
  message) plus pending local-change names. One task drains the inbox in batches, one worker
  thread call per batch: thousands of small messages cost one thread hop, and the event loop
  keeps reading and decrypting while a worker hashes and writes (hashlib, ssl and os I/O release
  the GIL, so this pipelines on two cores).
- Each link has a `_Link` with a send queue drained by its own task, so sending never blocks
  reading: two agents that both waited in `send` while neither read would deadlock. A peer's block
  requests are queued as requests and read from disk only when their turn comes, in batches, by
  the folder's `BlockServer` (its own read-only index connection: no wait for the engine's lock);
  past `MAX_PENDING_SERVES` queued requests, or `MAX_INBOX_BYTES` of queued data (decoded index
  records counted at their in-memory size), the link
  stops reading (backpressure), which bounds what a peer can make us hold.
- Responses carry no folder: each engine draws request ids from its own range (top 8 bits).
- `watchfiles` reports changed paths (debounced; our temp files filtered out); many names at once
  become one full scan. The engine's timer drives the periodic rescan.
- Sharing: a folder is shared with the devices its config lists (`devices`; None is every
  trusted device), resolved against the trust store when a link opens (the daemon's
  `resolve_devices`). A link carries the set of folder ids shared with its peer: only those get
  "open" (so only their engines ever address that peer), `push` drops any message naming another
  folder, and a peer's FolderHello, Index, Progress or Request for a folder outside the set is
  handled exactly as one for a folder we do not have. Its FolderHello becomes an offer
  (`agent/sync/offers.py`) and is kept on the link, so sharing the folder later (`apply_folders`)
  opens that folder's session at once without a reconnect.
- Bad input: `message()` raises RemoteProtocolError for what it can judge itself (unknown message,
  folder or request id); what an engine finds later closes the link with `close_soon(code)` and a
  warning, and that link's next `message()` raises the same error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import anyio
import anyio.abc
import anyio.to_thread

from agent.config import Config, FolderConfig
from agent.errors import ErrorCode, ProtocolError, RemoteProtocolError
from agent.host.memtrim import TRIM_AFTER_BYTES, trim
from agent.host.paths import Paths
from agent.identity.crypto import Identity
from agent.net.link import PeerLink
from agent.sync.clock import Now
from agent.sync.engine import FolderStatus, Outgoing, SyncEngine
from agent.sync.index import FolderIndex
from agent.sync.messages import (
    BlockError,
    FolderHello,
    Index,
    Progress,
    Request,
    Response,
    SyncMessage,
    wire_size,
)  # fmt: skip
from agent.sync.names import TEMP_PREFIX, is_valid_name
from agent.sync.offers import Offers, offers_path
from agent.sync.server import BlockServer
from agent.wire.messages import WireMessage, clean_reason

log = logging.getLogger(__name__)

RESCAN_INTERVAL = 300.0  # the safety net under file-system events
WATCH_DEBOUNCE_MS = 1600  # longest a burst of events is grouped
WATCH_STEP_MS = 50  # quiet time that ends a group: a single change is seen within ~50 ms
WATCH_RETRY = 10.0  # seconds before watching a folder again whose root went away
WATCH_READY_TIMEOUT = 10.0  # longest a folder's first scan waits for its watch to be in place
START_RETRY = 60.0  # seconds before starting a folder again whose start failed (disk, database)
MAX_EVENT_NAMES = 20_000  # changed names queued per folder; more become one full scan (the engine
# itself rescans everything past 256 names that are not its own writes)
MAX_INFLIGHT_BYTES = 48 * 1024 * 1024  # block bytes requested per peer and folder, not yet answered
MAX_INBOX_BYTES = 16 * 1024 * 1024  # queued peer data per folder before its links stop reading
# A decoded index record costs ~450 bytes of Python objects however small it was on the wire (a
# deletion record is ~120): charged per record, so a flood of tiny records queues ~35,000 of them
# (~16 MiB), not the ~140,000 its wire size alone would allow.
RECORD_MEMORY = 400
MAX_PENDING_SERVES = 4096  # queued block requests per link before it stops reading
SERVE_BATCH_BYTES = 8 * 1024 * 1024  # blocks read from disk in one worker-thread call
STATUS_INTERVAL = 0.5  # seconds between progress reports to peers (and status refreshes)
MAX_FOLDERS = 256  # request ids carry the folder's number in 8 bits
SWITCH_INTERVAL = 0.0005  # seconds; see `run`
# A test hook, read once at start-up from the agent's own environment (a peer cannot set it):
# each folder's worker holds the folder's lock this many seconds after its start-up scan, as a
# slow scan of a huge folder would. Used by tests/agent/test_status_responsive.py only.
SCAN_DELAY_ENV = "TOFU_AGENT_TEST_SCAN_DELAY"

SEND_BATCH_BYTES = 256 * 1024  # small messages coalesced into one TLS write
MAX_HELLOS_PER_LINK = 64  # FolderHellos of folders we do not share, kept per link (and new offers per link)

# Which device ids a folder's `devices` entries name (ids, prefixes, names), against the trust
# store now; called in a worker thread. Without one, only exact device ids match.
DeviceResolver = Callable[[tuple[str, ...]], frozenset[str]]


def _now() -> Now:
    """Both clocks, read once for a batch: timers run on the monotonic one (see `agent.sync.clock`)."""
    return Now(time.monotonic(), time.time())


def _send_size(msg: SyncMessage) -> int:
    """About how many bytes `msg` takes on the wire (an index message counts as a full write)."""
    if isinstance(msg, Response):
        return len(msg.data) + 32
    if isinstance(msg, Index):
        return SEND_BATCH_BYTES
    return 128


def _to_serve(folder: _Folder | None, msg: SyncMessage) -> bool:
    """True for a queued peer request we must answer from `folder` (else: a message to send)."""
    return folder is not None and isinstance(msg, Request)


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


def index_path(paths: Paths, folder_id: str) -> str:
    """Where the index of `folder_id` lives: in the data directory, never inside the folder."""
    digest = hashlib.sha256(folder_id.encode("utf-8")).hexdigest()[:24]
    return str(paths.data_dir / "sync" / f"{digest}.db")


class SyncService:
    """What the daemon calls for folder sync; every method is safe to call for any open link."""

    def __init__(
        self, paths: Paths, config: Config, ident: Identity, *, resolve_devices: DeviceResolver | None = None
    ) -> None:
        self.paths = paths
        self.config = config
        self.identity = ident
        self.resolve_devices: DeviceResolver = resolve_devices or frozenset
        self._generation = 0  # bumped when the folders' sharing changes (`apply_folders`)
        self._applying = anyio.Lock()
        self.offers = Offers(offers_path(paths.data_dir))
        self.folders: list[_Folder] = []
        self.by_id: dict[str, _Folder] = {}
        self.links: dict[str, _Link] = {}  # device id -> its current link
        self._by_link: dict[PeerLink, _Link] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._scan_delay = float(os.environ.get(SCAN_DELAY_ENV) or 0)  # a test hook (see SCAN_DELAY_ENV)

    # -- life cycle ------------------------------------------------------------------------------

    def _open_folders(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sync-hash")
        (self.paths.data_dir / "sync").mkdir(parents=True, exist_ok=True, mode=0o700)
        for cfg in self.config.folders[:MAX_FOLDERS]:
            self._open_folder(cfg)
        if len(self.config.folders) > MAX_FOLDERS:
            log.error("only the first %d folders are synced", MAX_FOLDERS)

    def _open_folder(self, cfg: FolderConfig) -> _Folder | None:
        parts = self._open_engine(cfg, len(self.folders))
        if parts is None:
            return None
        folder = _Folder(len(self.folders), cfg, *parts)
        self.folders.append(folder)
        self.by_id[cfg.id] = folder
        return folder

    def _open_engine(self, cfg: FolderConfig, number: int) -> tuple[SyncEngine, BlockServer] | None:
        """A folder's engine and block server (any thread), or None when it cannot be synced."""
        root = cfg.path.absolute()
        data = self.paths.data_dir.absolute()
        if data == root or root in data.parents:
            log.error("not syncing folder %r: %s holds the agent's own data directory", cfg.id, root)
            return None
        index: FolderIndex | None = None
        try:
            index = FolderIndex(index_path(self.paths, cfg.id))
            engine = SyncEngine(
                cfg.id, root, index, self.identity.device_id, executor=self._executor,
                max_inflight_bytes=MAX_INFLIGHT_BYTES, rescan_interval=RESCAN_INTERVAL,
                request_id_base=number << 24,
            )  # fmt: skip
            server = BlockServer(cfg.id, root, index_path(self.paths, cfg.id))
        except (OSError, sqlite3.Error) as exc:
            log.error("cannot sync folder %r at %s: %s", cfg.id, root, exc)
            if index is not None:
                index.close()
            return None
        return engine, server

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Scan folders, watch them and run timers until cancelled."""
        # The event loop releases the GIL for every 16 KiB TLS record it decrypts and takes it
        # right back, so a worker thread returning from a GIL-free hash or write waits up to the
        # switch interval (5 ms by default) for its turn: per 1 MiB block that halves throughput.
        sys.setswitchinterval(SWITCH_INTERVAL)
        self._open_folders()
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for f in self.folders:
                    log.info("syncing folder %r at %s", f.config.id, f.config.path)
                    tg.start_soon(self._run_folder, f)
                    tg.start_soon(self._watch, f)
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._tg = None
            with anyio.CancelScope(shield=True):
                for f in self.folders:
                    await anyio.to_thread.run_sync(self._close_folder, f)
            if self._executor is not None:
                self._executor.shutdown(wait=False)

    def _close_folder(self, f: _Folder) -> None:
        with f.lock:
            try:
                f.engine.flush(_now())  # finished files go in place now, not after a restart
            except Exception:
                log.exception("folder %r: flushing at shutdown failed", f.config.id)
            f.engine.close()
            f.engine.index.close()
        f.server.close()

    # -- link hooks ------------------------------------------------------------------------------

    async def peer_opened(self, link: PeerLink) -> None:
        """A trusted peer is connected: start exchanging indexes."""
        device_id = link.device_id
        if device_id is None or self._tg is None:
            return
        old = self.links.get(device_id)
        if old is not None:
            self._forget(old)  # the daemon replaced it (duplicate connection) without telling us
        ls = _Link(link, device_id, link.peer.name if link.peer else "")
        generation = -1
        while generation != self._generation:  # the sharing changed while we resolved: again
            generation = self._generation
            ls.shared = await anyio.to_thread.run_sync(self._shared_with, device_id, [f.config for f in self.folders])
        self.links[device_id] = ls
        self._by_link[link] = ls
        self._tg.start_soon(self._send_loop, ls)
        for f in self.folders:
            if f.config.id in ls.shared:
                f.put("open", ls)

    def _shared_with(self, device_id: str, folders: Sequence[FolderConfig]) -> frozenset[str]:
        """The ids of `folders` shared with `device_id` (in a worker thread: may read the trust store)."""
        shared: set[str] = set()
        resolved: dict[tuple[str, ...], frozenset[str]] = {}
        for cfg in folders:
            if cfg.devices is None:
                shared.add(cfg.id)  # household: every trusted device, and only those get a link
                continue
            if cfg.devices not in resolved:
                try:
                    resolved[cfg.devices] = self.resolve_devices(cfg.devices)
                except Exception:
                    log.exception("folder %r: cannot resolve its devices; not shared this time", cfg.id)
                    resolved[cfg.devices] = frozenset()
            if device_id in resolved[cfg.devices]:
                shared.add(cfg.id)
        return frozenset(shared)

    async def apply_folders(self, config: Config) -> dict[str, Any]:
        """Apply a changed folder configuration now: who gets which folder (each open link's folder
        sessions close or open at once) and new folders (started now). A folder whose path changed
        or that left the config needs a restart; one that left is shared with nobody meanwhile."""
        async with self._applying:  # one change at a time: folder numbers are handed out in order
            return await self._apply_folders(config)

    async def _apply_folders(self, config: Config) -> dict[str, Any]:
        changed: list[str] = []
        added: list[str] = []
        restart: list[dict[str, str]] = []
        wanted = {c.id: c for c in config.folders}
        for f in list(self.folders):
            cfg = wanted.get(f.config.id)
            if cfg is None:
                if f.config.devices != ():
                    f.config = replace(f.config, devices=())
                    changed.append(f.config.id)
                restart.append({"id": f.config.id, "why": "it left the config: shared with nobody until a restart"})
            elif cfg.path.absolute() != f.config.path.absolute():
                restart.append({"id": cfg.id, "why": f"its path changed to {cfg.path}: a restart moves it"})
            elif cfg.devices != f.config.devices:
                f.config = replace(f.config, devices=cfg.devices)
                changed.append(cfg.id)
        for cfg in config.folders:
            if cfg.id in self.by_id:
                continue
            if self._tg is None or self._executor is None or len(self.folders) >= MAX_FOLDERS:
                restart.append({"id": cfg.id, "why": "a new folder: a restart starts it"})
                continue
            parts = await anyio.to_thread.run_sync(self._open_engine, cfg, len(self.folders))
            if parts is None or cfg.id in self.by_id:
                restart.append({"id": cfg.id, "why": "it could not be opened (see the log)"})
                continue
            new = _Folder(len(self.folders), cfg, *parts)
            self.folders.append(new)
            self.by_id[cfg.id] = new
            log.info("syncing folder %r at %s", cfg.id, cfg.path)
            self._tg.start_soon(self._run_folder, new)
            self._tg.start_soon(self._watch, new)
            added.append(cfg.id)
        self._generation += 1
        configs = [f.config for f in self.folders]
        for ls in list(self.links.values()):
            shared = await anyio.to_thread.run_sync(self._shared_with, ls.device_id, configs)
            if not ls.closed:
                self._reshare(ls, shared)
        done = await anyio.to_thread.run_sync(self._satisfied_offers, configs)
        self.offers.remove(done)
        if changed or added:
            log.info("folder sharing reloaded: changed %s, started %s", changed or "none", added or "none")
        return {"changed": changed, "added": added, "restart": restart}

    def _reshare(self, ls: _Link, shared: frozenset[str]) -> None:
        """Close the sessions of folders no longer shared with `ls`'s peer, open the new ones."""
        old, ls.shared = ls.shared, shared
        for fid in old - shared:
            ls.was_shared.add(fid)
            # nothing more of it leaves: queued records go, queued block requests are refused
            kept: deque[tuple[_Folder | None, SyncMessage]] = deque()
            for folder, msg in ls.queue:
                if folder is not None and isinstance(msg, Request) and msg.folder == fid:
                    kept.append((None, Response(msg.request_id, b"", BlockError.INVALID)))
                elif getattr(msg, "folder", None) != fid:
                    kept.append((folder, msg))
            ls.queue = kept
            if fid in self.by_id:
                self.by_id[fid].put("close", ls)
            log.info("folder %r is no longer shared with %s (%s..)", fid, ls.name, ls.device_id[:8])
        for fid in shared - old:
            ls.was_shared.discard(fid)
            f = self.by_id.get(fid)
            if f is None:
                continue
            f.put("open", ls)
            hello = ls.hellos.pop(fid, None)
            if hello is not None:  # what it said when the link opened: the session starts now
                f.put("msg", ls, hello, 64)
            log.info("folder %r is now shared with %s (%s..)", fid, ls.name, ls.device_id[:8])
        ls.wake.set()

    def _satisfied_offers(self, configs: Sequence[FolderConfig]) -> set[tuple[str, str]]:
        """The offers whose folder we now have and share with the device that offered it."""
        by_id = {c.id: c for c in configs}
        done: set[tuple[str, str]] = set()
        for o in list(self.offers.items):
            cfg = by_id.get(o.folder)
            if cfg is not None and o.folder in self._shared_with(o.device_id, [cfg]):
                done.add((o.folder, o.device_id))
        return done

    def offered(self) -> list[dict[str, Any]]:
        """The `offered_folders` list of `status --json`: folders peers offer that we do not share."""
        return [o.to_json() for o in self.offers.items]

    def _offered(self, ls: _Link, hello: FolderHello) -> None:
        """`ls`'s peer said hello for a folder not shared with it: keep it as an offer."""
        if hello.folder in ls.hellos or len(ls.hellos) < MAX_HELLOS_PER_LINK:
            ls.hellos[hello.folder] = hello
        if ls.new_offers >= MAX_HELLOS_PER_LINK:
            return
        if self.offers.add(hello.folder, ls.device_id, ls.name, time.time()):
            ls.new_offers += 1
            have = "have but do not share with it" if hello.folder in self.by_id else "do not have"
            log.info("%s (%s..) offers folder %r, which we %s; accept it with: tofu-agent folder accept %s",
                     ls.name, ls.device_id[:8], hello.folder, have, hello.folder)  # fmt: skip

    async def message(self, link: PeerLink, message: WireMessage) -> None:
        """A sync message from a connected peer; RemoteProtocolError closes that link."""
        ls = self._by_link.get(link)
        if ls is None:
            raise RemoteProtocolError("sync message on a link that is not open", ErrorCode.UNEXPECTED_MESSAGE)
        if ls.error is not None:
            raise ls.error
        match message:
            case Response():
                f = self._folder_of_request(message.request_id)
                f.blocks_received += 1 if message.data else 0
                f.bytes_received += len(message.data)
                await self._to_inbox(f, ls, message, len(message.data) + 64)
            case Request():
                # Past MAX_PENDING_SERVES queued answers this link stops reading. A peer of ours
                # never gets there (its engine keeps at most max_inflight_bytes / 128 KiB + max_jobs
                # requests open, a few hundred), so only one that asks without reading is held up;
                # our own queued messages never count here, so two busy peers cannot wait on
                # each other.
                while ls.serves >= MAX_PENDING_SERVES and not ls.closed:
                    if ls.room.is_set():
                        ls.room = anyio.Event()
                    await ls.room.wait()
                ls.serves += 1
                served = self.by_id.get(message.folder) if message.folder in ls.shared else None
                if served is None:
                    # answered, as Syncthing does (the folder may have left our config while the
                    # request was on its way)
                    ls.push(Response(message.request_id, b"", BlockError.INVALID))
                    return
                ls.push(message, served)
            case FolderHello() | Index() | Progress():
                shared = self.by_id.get(message.folder) if message.folder in ls.shared else None
                if shared is None:
                    if isinstance(message, FolderHello):
                        self._offered(ls, message)  # a folder we do not have, or do not share with it
                        return
                    if message.folder in ls.was_shared:
                        return  # unshared while it was on its way: dropped, never used
                    raise RemoteProtocolError(
                        f"{message.KIND} for folder {message.folder[:64]!r}, which we do not share",
                        ErrorCode.UNEXPECTED_MESSAGE,
                    )
                size = sum(wire_size(x) + RECORD_MEMORY for x in message.files) if isinstance(message, Index) else 64
                await self._to_inbox(shared, ls, message, size)
            case _:
                raise RemoteProtocolError(f"unexpected {type(message).__name__} message", ErrorCode.UNEXPECTED_MESSAGE)

    async def peer_closed(self, link: PeerLink) -> None:
        """A peer's link closed: forget its in-flight requests."""
        ls = self._by_link.get(link)
        if ls is not None:
            self._forget(ls)

    def _forget(self, ls: _Link) -> None:
        self._by_link.pop(ls.link, None)
        if self.links.get(ls.device_id) is ls:
            del self.links[ls.device_id]
        ls.closed = True
        ls.queue.clear()
        ls.wake.set()
        ls.room.set()
        for f in self.folders:
            f.put("close", ls)

    def _folder_of_request(self, request_id: int) -> _Folder:
        number = request_id >> 24
        if number >= len(self.folders):
            raise RemoteProtocolError("response to no request of ours", ErrorCode.UNEXPECTED_MESSAGE)
        return self.folders[number]

    async def _to_inbox(self, f: _Folder, ls: _Link, msg: SyncMessage, size: int) -> None:
        while f.inbox_bytes > MAX_INBOX_BYTES and not ls.closed:
            await f.room.wait()
        f.put("msg", ls, msg, size)

    def _fail(self, ls: _Link, exc: RemoteProtocolError) -> None:
        """Close `ls` because its peer broke the sync protocol."""
        if ls.error is not None or ls.closed:
            return
        ls.error = exc
        log.warning("closing connection with %s (%s..): %s: %s", ls.name, ls.device_id[:8], exc.code.value, exc)
        ls.link.close_soon(exc.code, clean_reason(str(exc)))

    # -- folders ---------------------------------------------------------------------------------

    async def _run_folder(self, f: _Folder) -> None:
        # Watch before the first scan: a file written while the scan runs then comes as an event
        # instead of waiting for the periodic rescan. (A new folder's root is made by the start;
        # its watch, once in place, asks for a rescan of what it may have missed.)
        if await anyio.to_thread.run_sync(os.path.isdir, f.config.path):
            with anyio.move_on_after(WATCH_READY_TIMEOUT):
                await f.watching.wait()
        while True:
            try:
                await anyio.to_thread.run_sync(self._start_engine, f)
                f.halted = f.engine.halted is not None
                f.started.set()
                break
            except Exception:
                log.exception("folder %r: cannot start (trying again in %.0f s)", f.config.id, START_RETRY)
                await anyio.sleep(START_RETRY)
        while True:
            if not (f.inbox or f.changed or f.rescan or f.engine.flush_due or f.engine.scan_pending):
                due = f.engine.get_timer()
                if f.stale:  # status shows a snapshot that is out of date: refresh it soon
                    due = min(due, f.snapshot_at + STATUS_INTERVAL)
                delay = max(0.0, due - time.monotonic())
                with anyio.move_on_after(delay):
                    await f.wake.wait()
            f.wake = anyio.Event()
            items = list(f.inbox)
            f.inbox.clear()
            burst, f.inbox_bytes = f.inbox_bytes >= TRIM_AFTER_BYTES, 0
            room, f.room = f.room, anyio.Event()
            room.set()
            names, f.changed = f.changed, set()
            full, f.rescan = f.rescan, False
            try:
                out, errors = await anyio.to_thread.run_sync(self._work, f, items, names, full, burst)
            except Exception:
                # a disk or database failure: keep the agent up, try again on the next input
                log.exception("folder %r: sync step failed", f.config.id)
                await anyio.sleep(1.0)
                continue
            for ls, exc in errors:
                self._fail(ls, exc)
            for ls, msg in out:
                ls.push(msg)
            halted = f.engine.halted is not None
            if f.halted and not halted:
                f.watch_scope.cancel()  # the root is back (maybe a new directory): watch it afresh
            f.halted = halted

    def _start_engine(self, f: _Folder) -> None:
        with f.lock:
            now = _now()
            f.engine.start(now)
            if self._scan_delay:
                log.warning("folder %r: test hook %s: holding the folder for %.1f s", f.config.id,
                            SCAN_DELAY_ENV, self._scan_delay)  # fmt: skip
                time.sleep(self._scan_delay)
            self._publish(f, now)

    def _work(
        self,
        f: _Folder,
        items: list[tuple[InboxKind, _Link, SyncMessage | None]],
        names: set[str],
        full: bool,
        burst: bool = False,
    ) -> tuple[list[tuple[_Link, SyncMessage]], list[tuple[_Link, RemoteProtocolError]]]:
        """One batch of engine inputs, in a worker thread; what to send, and links to close."""
        out: list[tuple[_Link, SyncMessage]] = []
        errors: list[tuple[_Link, RemoteProtocolError]] = []
        bad: set[_Link] = set()
        now = _now()

        def route(messages: list[Outgoing]) -> None:
            # resolved now: a message for a session that closed later in this batch must not
            # reach the session that replaced it
            for peer, msg in messages:
                target = f.current.get(peer)
                if target is not None:
                    out.append((target, msg))

        with f.lock, f.engine.batch():
            eng = f.engine
            for kind, ls, msg in items:
                if kind == "open":
                    f.current[ls.device_id] = ls
                    f.reported.pop(ls.device_id, None)
                    route(eng.peer_connected(ls.device_id, now))
                elif kind == "close":
                    if f.current.get(ls.device_id) is ls:
                        del f.current[ls.device_id]
                        eng.peer_disconnected(ls.device_id)
                elif kind == "sent":
                    if f.current.get(ls.device_id) is ls:
                        route(eng.index_sent(ls.device_id))
                elif msg is not None and not ls.closed and ls not in bad and f.current.get(ls.device_id) is ls:
                    try:
                        route(eng.on_peer_message(ls.device_id, msg, now, pump=False))
                    except RemoteProtocolError as exc:
                        errors.append((ls, exc))
                        bad.add(ls)
                    except Exception:
                        log.exception("folder %r: handling %s from %s failed", f.config.id, msg.KIND, ls.name)
                        errors.append((ls, RemoteProtocolError("internal error", ErrorCode.INTERNAL_ERROR)))
                        bad.add(ls)
            route(eng.pump(now))
            if f.snapshot.state == "idle" and (full or names or eng.scan_pending or now.mono >= eng.next_scan):
                f.snapshot = replace(f.snapshot, state="scanning")  # what this batch is about to do
            if full:
                route(eng.on_local_change([""], now))
            elif names:
                route(eng.on_local_change(sorted(names), now))
            elif eng.scan_pending:
                route(eng.continue_scan(now))
            if now.mono >= eng.get_timer():
                route(eng.handle_timer(now))
            idle = not eng.need and not eng.jobs
            if idle or now.mono - f.snapshot_at >= STATUS_INTERVAL:
                route(self._publish(f, now))
            else:
                f.stale = True
        items.clear()  # the caller's list: the messages are freed here, before the trim
        if burst or full:
            trim()  # the decoded records and scan results of this batch are garbage now
        return out, errors

    def _publish(self, f: _Folder, now: Now) -> list[Outgoing]:
        """Publish the folder's status for `status` (worker thread, under the lock), and tell peers
        what we still need if that changed."""
        snap = f.engine.status()
        if f.engine.state == "scanning" and snap.state != "error":
            snap = replace(snap, state="scanning")  # a chunked scan goes on between batches
        f.snapshot, f.snapshot_at, f.stale = snap, now.mono, False
        return self._progress(f)

    def _progress(self, f: _Folder) -> list[Outgoing]:
        """Tell each peer sharing the folder what we still need, when that changed."""
        mine = (f.snapshot.need_files, f.snapshot.need_bytes)
        out: list[Outgoing] = []
        for peer, state in f.engine.peers.items():
            if state.ready and f.reported.get(peer) != mine:
                f.reported[peer] = mine
                out.append((peer, Progress(f.config.id, *mine)))
        return out

    async def _send_loop(self, ls: _Link) -> None:
        try:
            while not ls.closed:
                if not ls.queue:
                    ls.wake = anyio.Event()
                    await ls.wake.wait()
                    continue
                folder, msg = ls.queue[0]
                if not _to_serve(folder, msg):
                    group: list[SyncMessage] = []
                    size = 0
                    while ls.queue and size < SEND_BATCH_BYTES and not _to_serve(*ls.queue[0]):
                        group.append(ls.queue.popleft()[1])
                        size += _send_size(group[-1])
                        if isinstance(group[-1], Response):
                            ls.serves -= 1  # an INVALID answer (the queue holds no other Response)
                    ls.room.set()
                    await self._send_group(ls, group)
                    continue
                ls.queue.popleft()
                assert isinstance(msg, Request) and folder is not None
                batch, size = [msg], msg.size
                while ls.queue and ls.queue[0][0] is folder and size < SERVE_BATCH_BYTES:
                    nxt = ls.queue.popleft()[1]
                    assert isinstance(nxt, Request)
                    batch.append(nxt)
                    size += nxt.size
                ls.serves -= len(batch)
                ls.room.set()
                await self._send_group(ls, await anyio.to_thread.run_sync(folder.server.serve, batch))
        except (ProtocolError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            log.debug("sending to %s stopped: %s", ls.name, exc)

    async def _send_group(self, ls: _Link, messages: Sequence[SyncMessage]) -> None:
        """Send `messages` in order, up to SEND_BATCH_BYTES per TLS write."""
        start = 0
        while start < len(messages):
            end, size = start, 0
            while end < len(messages) and (end == start or size + _send_size(messages[end]) <= SEND_BATCH_BYTES):
                size += _send_size(messages[end])
                end += 1
            await ls.link.send_many(messages[start:end])
            for m in messages[start:end]:
                if isinstance(m, Index) and (mine := self.by_id.get(m.folder)) is not None:
                    mine.put("sent", ls)  # the engine hands over the next part of its index
            start = end

    # -- watching --------------------------------------------------------------------------------

    async def _watch(self, f: _Folder) -> None:
        import watchfiles  # a Rust extension: loaded only when there is a folder to watch

        root = str(f.config.path.absolute())
        warned = False
        while True:
            # cancelled (from `_run_folder`) when a stopped folder's root is back: watch afresh at once
            with anyio.CancelScope() as f.watch_scope:
                failure: Exception | None = None
                present = await anyio.to_thread.run_sync(os.path.isdir, root)
                if present:
                    try:
                        await self._watch_once(f, watchfiles, root)
                    except Exception as exc:  # no inotify watches left, the folder vanished, ...
                        failure = exc
                    present = await anyio.to_thread.run_sync(os.path.isdir, root)
                if failure is not None and present and not warned:  # a missing root is the engine's to report
                    log.warning("not watching %s for changes (%s); periodic rescans still run", root, failure)
                    warned = True
                if f.watching.is_set():
                    f.watching = anyio.Event()
                # The watch ended (its root went away) or failed: try again, on the root as it is
                # then; at once when a new folder's root is made, soon while the folder is stopped,
                # rarely if watching itself fails (a big tree costs).
                if not present and not f.started.is_set():
                    with anyio.move_on_after(WATCH_RETRY):
                        await f.started.wait()
                    continue
                await anyio.sleep(WATCH_RETRY if f.halted or not present else RESCAN_INTERVAL)

    async def _watch_once(self, f: _Folder, watchfiles: Any, root: str) -> None:
        async for changes in watchfiles.awatch(
            root, watch_filter=None, debounce=WATCH_DEBOUNCE_MS, step=WATCH_STEP_MS, recursive=True,
            ignore_permission_denied=True,
            # The watcher thread notices cancellation only between waits: keep them short so
            # SIGTERM stops the agent well inside its 5 s. Each wait ends in a yield (empty on a
            # timeout), and the first one says the watch is in place.
            rust_timeout=500, yield_on_timeout=True,
        ):  # fmt: skip
            if not f.watching.is_set():
                f.watching.set()
                if f.started.is_set():
                    # watching again (the root is back, the watch failed) or for the first time
                    # after a new folder's start: what changed while nobody watched is found by
                    # a full scan
                    f.rescan = True
                    f.wake.set()
            for _, path in changes:
                name = self._event_name(root, path)
                if name is None:
                    continue
                if name == "":
                    f.rescan = True
                else:
                    f.changed.add(name)
            if len(f.changed) > MAX_EVENT_NAMES:
                f.changed.clear()
                f.rescan = True
            if f.changed or f.rescan:
                f.wake.set()

    @staticmethod
    def _event_name(root: str, path: str) -> str | None:
        """The folder-relative name to rescan for an event at `path` ('' for all, None to ignore)."""
        if path.startswith(root) and path[len(root) : len(root) + 1] == os.sep and ".." not in path:
            rel = path[len(root) + 1 :]  # the common case, without relpath's normalising
        else:
            rel = os.path.relpath(path, root)
        if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
            return "" if rel == "." else None
        name = rel.replace(os.sep, "/")
        if os.path.basename(name).startswith(TEMP_PREFIX):
            return None  # our own partial files
        while name and not is_valid_name(name):
            name = name.rpartition("/")[0]  # rescanning the parent skips the invalid name with a warning
        return name

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """The `folders` list of `status --json`, from the snapshots the workers published: on the
        event loop, so it takes no lock and runs no SQL (a worker may hold a folder for seconds)."""
        result: list[dict[str, Any]] = []
        for f in self.folders:
            snap = f.snapshot  # one read: the worker swaps in a whole new object
            state = snap.state
            peers = []
            for device_id, progress in sorted(snap.peers.items()):
                need_files, need_bytes = progress if progress is not None else (0, 0)
                total = max(snap.bytes, need_bytes)
                percent = 100.0 if not total else 100.0 * (total - need_bytes) / total
                if need_files and percent >= 100.0:
                    percent = 99.0
                ls = self.links.get(device_id)
                peers.append(
                    {
                        "device_id": device_id,
                        "name": ls.name if ls else "",
                        "need_files": need_files,
                        "need_bytes": need_bytes,
                        "percent": round(percent, 1),
                    }
                )
            result.append(
                {
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
                }
            )
        return result
