"""The sync I/O shell: runs one `SyncEngine` per configured folder for the daemon (anyio, asyncio).

Theory of operation. The shell makes no sync decisions; it moves inputs to engines and their
outputs to links. Its parts: this module (the folders' engines and workers, the link hooks the
daemon calls, status), `state` (the `_Folder` and `_Link` records), `sender` (each link's send
loop), `watcher` (file-system events) and `sharing` (which folders each peer is given, offers).
- Each folder has a `_Folder`: its engine, a `threading.Lock` (engine calls run in worker
  threads, one at a time), and an inbox of engine inputs (a link opened or closed, a peer
  message) plus pending local-change names. One task drains the inbox in batches, one worker
  thread call per batch: thousands of small messages cost one thread hop, and the event loop
  keeps reading and decrypting while a worker hashes and writes (hashlib, ssl and os I/O release
  the GIL, so this pipelines on two cores).
- Each link has a `_Link` with a send queue drained by its own task (`sender.send_loop`), so
  sending never blocks reading. A peer's block requests are queued as requests and read from
  disk only when their turn comes, by the folder's `BlockServer`; past `MAX_PENDING_SERVES`
  queued requests, or `MAX_INBOX_BYTES` of queued data (decoded index records counted at their
  in-memory size), the link stops reading (backpressure), which bounds what a peer can make us
  hold.
- Responses carry no folder: each engine draws request ids from its own range (top 8 bits).
- `watcher.watch` turns changed paths into names for the folder's worker; many names at once
  become one full scan. The engine's timer drives the periodic rescan.
- Sharing (`sharing`): a link carries the set of folder ids shared with its peer, resolved when
  it opens and again on `apply_folders`; a peer's FolderHello, Index, Progress or Request for a
  folder outside the set is handled exactly as one for a folder we do not have, and its
  FolderHello becomes an offer.
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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.to_thread

from agent.config import Config, FolderConfig
from agent.errors import ErrorCode, RemoteProtocolError, UserError
from agent.host.memtrim import TRIM_AFTER_BYTES, trim
from agent.host.paths import Paths
from agent.identity.crypto import Identity
from agent.net.link import PeerLink
from agent.sync import requests
from agent.sync.clock import Now
from agent.sync.engine import Outgoing, SyncEngine
from agent.sync.folder_type import FolderType
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
from agent.sync.offers import Offers, offers_path
from agent.sync.sender import send_loop
from agent.sync.server import BlockServer
from agent.sync.sharing import DeviceResolver, keep_offer, reshare, satisfied_offers, shared_with
from agent.sync.state import InboxKind, _Folder, _Link, folder_json
from agent.sync.versioning import Kind, Versioning
from agent.sync.watcher import watch
from agent.wire.messages import WireMessage, clean_reason

log = logging.getLogger(__name__)

T = TypeVar("T")
RESCAN_INTERVAL = 300.0  # the safety net under file-system events
WATCH_READY_TIMEOUT = 10.0  # longest a folder's first scan waits for its watch to be in place
START_RETRY = 60.0  # seconds before starting a folder again whose start failed (disk, database)
MAX_INFLIGHT_BYTES = 48 * 1024 * 1024  # block bytes requested per peer and folder, not yet answered
MAX_INBOX_BYTES = 16 * 1024 * 1024  # queued peer data per folder before its links stop reading
# A decoded index record costs ~450 bytes of Python objects however small it was on the wire (a
# deletion record is ~120): charged per record, so a flood of tiny records queues ~35,000 of them
# (~16 MiB), not the ~140,000 its wire size alone would allow.
RECORD_MEMORY = 400
MAX_PENDING_SERVES = 4096  # queued block requests per link before it stops reading
STATUS_INTERVAL = 0.5  # seconds between progress reports to peers (and status refreshes)
MAX_FOLDERS = 256  # request ids carry the folder's number in 8 bits
SWITCH_INTERVAL = 0.0005  # seconds; see `run`
# A test hook, read once at start-up from the agent's own environment (a peer cannot set it):
# each folder's worker holds the folder's lock this many seconds after its start-up scan, as a
# slow scan of a huge folder would. Used by tests/agent/test_status_responsive.py only.
SCAN_DELAY_ENV = "TOFU_AGENT_TEST_SCAN_DELAY"


def _now() -> Now:
    """Both clocks, read once for a batch: timers run on the monotonic one (see `agent.sync.clock`)."""
    return Now(time.monotonic(), time.time())


def versioning_of(cfg: FolderConfig) -> Versioning:
    """A folder's versioning settings as the engine takes them."""
    return Versioning(Kind(cfg.versioning), cfg.keep_days, cfg.keep)


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
                request_id_base=number << 24, versioning=versioning_of(cfg), folder_type=FolderType(cfg.type),
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
                    tg.start_soon(watch, f, RESCAN_INTERVAL)
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._tg = None
            with anyio.CancelScope(shield=True):
                for f in self.folders:
                    await anyio.to_thread.run_sync(self._close_folder, f)
            if self._executor is not None:
                self._executor.shutdown(wait=False)

    @staticmethod
    def _set_versioning(f: _Folder) -> None:
        with f.lock:
            f.engine.versions.policy = versioning_of(f.config)

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
            ls.shared = await anyio.to_thread.run_sync(
                shared_with, device_id, [f.config for f in self.folders], self.resolve_devices,
                self.config.paused_devices,
            )  # fmt: skip
        self.links[device_id] = ls
        self._by_link[link] = ls
        self._tg.start_soon(send_loop, ls, self.by_id)
        for f in self.folders:
            if f.config.id in ls.shared:
                f.put("open", ls)

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
            elif cfg != f.config:  # who gets it, pause, versioning: applied now; the type at a restart
                if cfg.type != f.config.type:
                    restart.append({"id": cfg.id, "why": f"its type changed to {cfg.type}: a restart applies it"})
                    cfg = replace(cfg, type=f.config.type)
                if cfg != f.config:
                    f.config = cfg
                    await anyio.to_thread.run_sync(self._set_versioning, f)
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
            self._tg.start_soon(watch, new, RESCAN_INTERVAL)
            added.append(cfg.id)
        if config.paused_devices != self.config.paused_devices:
            self.config = replace(self.config, paused_devices=config.paused_devices)
            changed.append("(paused devices)")
        self._generation += 1
        configs = [f.config for f in self.folders]
        for ls in list(self.links.values()):
            shared = await anyio.to_thread.run_sync(
                shared_with, ls.device_id, configs, self.resolve_devices, self.config.paused_devices
            )
            if not ls.closed:
                reshare(ls, shared, self.by_id)
        done = await anyio.to_thread.run_sync(satisfied_offers, self.offers, configs, self.resolve_devices)
        self.offers.remove(done)
        if changed or added:
            log.info("folder sharing reloaded: changed %s, started %s", changed or "none", added or "none")
        return {"changed": changed, "added": added, "restart": restart}

    def offered(self) -> list[dict[str, Any]]:
        """The `offered_folders` list of `status --json`: folders peers offer that we do not share."""
        return [o.to_json() for o in self.offers.items]

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
                # rarely gets there (its engine keeps at most max_inflight_bytes / 128 KiB + max_jobs
                # requests open, under 800 a folder), so mostly one that asks without reading is held up;
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
                        # a folder we do not have, or do not share with it
                        keep_offer(ls, message, self.offers, self.by_id)
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

    # -- a person's requests (agent/sync/requests.py) --------------------------------------------

    async def versions(self, folder_id: str | None, name: str = "") -> list[dict[str, Any]]:
        """The kept versions of `name` (a file, or everything under a directory) in one folder
        (None: every folder), newest first."""
        folders = [self._folder(folder_id)] if folder_id is not None else list(self.folders)
        return await requests.versions(folders, name, self._publish, _now)

    async def restore(self, folder_id: str, name: str, at: float | None) -> dict[str, Any]:
        """Put a kept version back as a local change (it then syncs to the peers)."""
        return await requests.restore(self._folder(folder_id), name, at, self._publish, _now)

    async def override(self, folder_id: str) -> dict[str, Any]:
        """A send-only folder's state wins on every peer."""
        return await requests.override(self._folder(folder_id), self._publish, _now)

    async def revert(self, folder_id: str) -> dict[str, Any]:
        """A receive-only folder's local changes are undone (kept as versions)."""
        return await requests.revert(self._folder(folder_id), self._publish, _now)

    def _folder(self, folder_id: str | None) -> _Folder:
        f = self.by_id.get(folder_id or "")
        if f is None:
            raise UserError(f"no folder {folder_id!r} is synced (see `tofu-agent folders`)")
        return f

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """The `folders` list of `status --json`, from the snapshots the workers published: on the
        event loop, so it takes no lock and runs no SQL (a worker may hold a folder for seconds)."""
        return [folder_json(f, self.links) for f in self.folders]
