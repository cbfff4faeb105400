"""The sync engine of one folder: feed it peer messages, local changes and time; it returns messages.

Theory of operation. The shell calls, one at a time (from one worker thread if it likes):
  start(now) once; peer_connected(peer) -> [FolderHello]; on_peer_message(peer, msg, now) for
  every sync message; on_local_change(names, now) for file-system events; handle_timer(now) when
  get_timer() says; continue_scan(now) while `scan_pending`; peer_disconnected(peer). Each
  returns [(peer, message)] to send. `now` is a `Now`: timers (rescans, stalls, retries,
  rechecks; `get_timer`) run on its monotonic `mono`, versions and conflict copies record its
  `wall`, so a clock step or a resume from suspend neither stalls requests nor moves a rescan.
A scan from file-system events or the periodic timer runs in chunks: each chunk is recorded and
announced at once, and the shell comes back for the next (`scan_pending`), serving peers in
between. Until the scan's last chunk no pull starts or commits, so nothing but the scan changes
our records while it compares the disk with them.
On FolderHello the engine answers with its index: a full `Index` (then `IndexUpdate`s) if the peer
holds nothing of our current index id, else only the changes after the sequence it holds. Every
remote record is compared with ours by the planner; needed names queue up. Directories and
metadata changes apply at once, files become pull jobs whose blocks are copied locally or
requested (bounded bytes in flight), deletions wait until no pull is running (so renamed files
can still copy their blocks from the old name). Finished files wait in a batch; `flush` makes
their data durable (one syncfs for many files), checks each target is still what we planned
against (else rescans: a local edit becomes a conflict), renames them into place, fsyncs each
touched directory once, then records them in the index in one transaction and announces them.
The engine is the coordinator of four parts, each with its own state: `scheduler` (pure: which
blocks to ask of which peer, request ids, stalls), `exchange` (hello, index messages in and out,
what we need), `committer` (finished pulls to disk and into the index), `deletions` (remote
deletions). The engine owns what they share (peers, needed names, the pull queue, running pulls)
and hands each the containers it reads or fills; it keeps scanning, the folder root, pulls and
the timers.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from agent.errors import ErrorCode, RemoteProtocolError
from agent.sync import puller
from agent.sync.clock import Now
from agent.sync.committer import Committer
from agent.sync.deletions import Deletions
from agent.sync.exchange import INDEX_WINDOW, MAX_REMOTE_BYTES, MAX_REMOTE_RECORDS, IndexExchange, Need, Peer
from agent.sync.folder_type import FolderType, TypeRules
from agent.sync.fs import FolderFS, temp_name_for
from agent.sync.index import FolderIndex
from agent.sync.messages import (
    MAX_FILES_PER_MESSAGE,
    BlockError,
    FolderHello,
    Index,
    IndexUpdate,
    Progress,
    Request,
    Response,
    SyncMessage,
)  # fmt: skip
from agent.sync.model import FileInfo, FileType
from agent.sync.names import IGNORE_FILE, MARKER
from agent.sync.planner import MAX_CONFLICT_ATTEMPT, Action, conflict_name, decide
from agent.sync.scanner import Scanner, ScanResult, load_ignore
from agent.sync.scheduler import REQUEST_ID_MASK, STALL_TIMEOUT, Outgoing, RequestScheduler
from agent.sync.server import serve_block
from agent.sync.vectors import Vector
from agent.sync.versioning import DEFAULT_VERSIONING, Versioning
from agent.sync.versions import Kept, Versions

__all__ = [
    "INDEX_WINDOW", "RECHECK_FIRST", "RECHECK_MAX", "RETRY_PULL_AFTER", "ROOT_RECHECK", "STALL_TIMEOUT",
    "FolderStatus", "Need", "Outgoing", "Peer", "SyncEngine",
]  # fmt: skip

log = logging.getLogger(__name__)
MAX_EVENT_NAMES = 256  # more changed names than this at once (after our own writes): one full scan
RETRY_SCAN_AFTER = 60.0  # a scan that failed on a disk or database error is retried (in full) this soon
RETRY_PULL_AFTER = 60.0  # a name we could not write (full disk, read-only directory) is tried again this soon
MIN_FREE_FRACTION = 0.01  # as Syncthing's minDiskFree: pulls never fill the disk past 99 %
ROOT_RECHECK = 10.0  # a folder stopped for a missing root or marker looks for it again this often
MAX_FAILED = 10_000  # names remembered for a retry; past that the periodic full rescan is the retry
# A file a scan skipped because it was being written is looked at again this soon, event or not
# (no watcher runs yet while the agent starts), backing off to RECHECK_MAX while it keeps changing.
RECHECK_FIRST = 1.0
RECHECK_MAX = 16.0
CLEANUP_AFTER_START = 300.0  # the first clean-up pass of kept versions waits for the start's work
CLEANUP_EVERY = 3600.0  # a clean-up pass over the kept versions starts this often
CLEANUP_STEP_EVERY = 0.5  # and takes a step this often while it goes on
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class FolderStatus:
    """What `status` shows for a folder."""

    state: str  # idle, scanning, syncing, error
    files: int
    bytes: int
    need_files: int
    need_bytes: int
    peers: dict[str, tuple[int, int] | None]
    error: str = ""  # why the folder is stopped (state 'error')
    failed_files: int = 0  # names we could not write (full disk, a directory in the way), retried every 60 s
    blocks_requested: int = 0  # block requests we sent (`requested_blocks`)
    versions_evicted: int = 0  # kept versions removed early because the disk was short of space
    type: str = "sendreceive"
    remote_differs: int = 0  # send-only: names a peer changed that we do not apply
    locally_changed: int = 0  # receive-only: our changes, not sent


class _Part(Generic[T]):
    """An attribute of one of the engine's parts, read and set as if it were the engine's own."""

    def __init__(self, part: str, name: str) -> None:
        self.part, self.name = part, name

    def __get__(self, engine: object, owner: type | None = None) -> T:
        value: T = getattr(getattr(engine, self.part), self.name)
        return value

    def __set__(self, engine: object, value: T) -> None:
        setattr(getattr(engine, self.part), self.name, value)


class SyncEngine:
    """Sync state of one folder shared with any number of peers."""

    def __init__(
        self, folder_id: str, root: Path, index: FolderIndex, device_id: str, *,
        executor: Executor | None = None,
        max_inflight_bytes: int = 32 * 1024 * 1024, max_jobs: int = 128, batch_files: int = 1000,
        rescan_interval: float = 3600.0, request_id_base: int = 0, max_remote_records: int = MAX_REMOTE_RECORDS,
        max_remote_bytes: int = MAX_REMOTE_BYTES, request_id_mask: int = REQUEST_ID_MASK,
        max_files_per_message: int = MAX_FILES_PER_MESSAGE, index_window: int = INDEX_WINDOW,
        stall_timeout: float = STALL_TIMEOUT, retry_pull_after: float = RETRY_PULL_AFTER,
        min_free_fraction: float = MIN_FREE_FRACTION, versioning: Versioning = DEFAULT_VERSIONING,
        folder_type: FolderType = FolderType.SENDRECEIVE,
    ) -> None:  # fmt: skip
        self.folder_id = folder_id
        self.index = index
        self.device_id = device_id
        self.fs = FolderFS(root, need_root=False)  # a missing root stops the folder (see `_root_ok`)
        self.scanner = Scanner(self.fs, index, device_id, executor)
        # What the parts share, owned here (never replaced, only changed in place):
        self.peers: dict[str, Peer] = {}
        self.need: dict[str, Need] = {}
        self.queue: deque[str] = deque()
        self.jobs: dict[str, puller.Job] = {}
        self.scheduler = RequestScheduler[puller.Job](
            folder_id, self.peers, self.jobs, max_inflight_bytes=max_inflight_bytes,
            request_id_base=request_id_base, request_id_mask=request_id_mask, stall_timeout=stall_timeout,
        )  # fmt: skip
        self.versions = Versions(self.fs, index, versioning)
        self.committer = Committer(self.fs, self.jobs, self.versions, retry_pull_after=retry_pull_after)
        self.rules = TypeRules(folder_type, self.fs, index, self.versions, device_id)
        self.deletions = Deletions(
            self.fs, index, self.committer, need=self.need, queue=self.queue, jobs=self.jobs,
            reconsider=lambda names: self.exchange.reconsider(names),
        )  # fmt: skip
        self.exchange = IndexExchange(
            folder_id, index, self.scanner, peers=self.peers, need=self.need, queue=self.queue,
            deletes=self.deletions.pending, drop_job=self._drop_job, max_remote_records=max_remote_records,
            hold=self.rules.differs if self.rules.send_only else None,
            max_remote_bytes=max_remote_bytes, index_window=index_window, max_files_per_message=max_files_per_message,
        )  # fmt: skip
        self.failed: dict[str, float] = {}  # name -> when to try it again (a write or rename failed)
        self.recheck: dict[str, float] = {}  # name -> when to scan it again (it was changing when scanned)
        self._recheck_tries: dict[str, int] = {}  # name -> scans that found it changing in a row
        self._space, self._space_at = 0, -1e18  # free bytes left for new pulls, and when they were read
        self._space_warned = False  # the lack of space was logged (until a pull fits again)
        self.max_jobs = max_jobs
        self.batch_files = batch_files
        self.rescan_interval = rescan_interval
        self.retry_pull_after = retry_pull_after
        self.min_free_fraction = min_free_fraction
        self.next_scan = 0.0  # when the next full scan is due (monotonic, as every timer here)
        self.next_cleanup = 0.0  # when the next step of kept versions' clean-up is due
        self.flush_due = False  # a batch is complete and waits for the next `pump` (call it soon)
        self.state = "idle"
        self.halted: str | None = None  # why the folder is stopped: its root or marker is missing
        self.next_check = 0.0  # when a stopped folder looks for its root again
        self._scan_chunks: Iterator[ScanResult] | None = None  # the scan in progress
        self._scan_full = False  # it is a full scan (the timer's next run is set when it ends)
        self._scan_next: set[str] = set()  # names changed meanwhile: scanned when it ends ('' = all)
        self._ignore_lines = self.scanner.ignore.lines  # the `.tofuignore` the last recorded scan used

    # -- the parts' state, as tests and the shell read and tune it ---------------------------

    deletes = _Part[set[str]]("deletions", "pending")  # names a peer deleted, waiting to be applied
    kept_dirs = _Part[set[str]]("deletions", "kept_dirs")
    done = _Part[list[puller.Job]]("committer", "done")  # complete temp files waiting for `flush`
    records = _Part[list[FileInfo]]("committer", "records")  # index records waiting for `flush`
    dirty_dirs = _Part[set[str]]("committer", "dirty_dirs")
    written = _Part[dict[str, tuple[int, int, int]]]("committer", "written")
    requests = _Part[dict[int, tuple[str, str, int]]]("scheduler", "requests")
    cancelled = _Part[dict[int, tuple[str, int]]]("scheduler", "cancelled")
    request_id_base = _Part[int]("scheduler", "base")
    requested_blocks = _Part[int]("scheduler", "requested_blocks")
    max_inflight_bytes = _Part[int]("scheduler", "max_inflight_bytes")
    max_remote_records = _Part[int]("exchange", "max_remote_records")
    max_remote_bytes = _Part[int]("exchange", "max_remote_bytes")

    def _new_request_id(self) -> int:
        return self.scheduler.new_request_id()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, now: Now) -> None:
        """Find changes made while we were stopped, plan from stored peer indexes, drop stale temps.

        A folder that recorded nothing yet gets its root and marker made; one that did and lacks
        them is stopped (`halted`) instead: deleting everything on every peer because a disk is not
        mounted is what the marker prevents.
        """
        if self.index.sequence == 0 and not self.fs.refresh():
            try:
                self.fs.make_marker()
            except OSError as exc:
                log.error("folder %r: cannot create %s: %s", self.folder_id, self.fs.root / MARKER, exc)
        self.next_cleanup = now.mono + CLEANUP_AFTER_START
        if not self._root_ok(now):
            return
        temps = self._scan(now, None)
        if self.halted is not None:
            return
        for peer in self.index.peers():
            self.exchange.consider(list(self.index.differing(peer)), peer)
        wanted = {self._temp_of(name): name for name in self.need}
        for t in temps:
            if t not in wanted:
                self.fs.unlink(t)
            else:
                self.committer.leftover_temps.add(wanted[t])

    def close(self) -> None:
        """Close open files (temp files stay for resuming)."""
        for job in self.jobs.values():
            puller.abort_job(job)
        self.fs.close()

    def peer_connected(self, peer: str, now: Now) -> list[Outgoing]:
        """A session with `peer` that shares this folder is up: say hello."""
        return self.exchange.connected(peer)

    def index_sent(self, peer: str) -> list[Outgoing]:
        """The shell sent one of our index messages to `peer`: hand over the next, if any."""
        return self.exchange.index_sent(peer)

    def peer_disconnected(self, peer: str) -> None:
        """Forget in-flight requests to `peer`; their blocks will be asked of someone else."""
        self.peers.pop(peer, None)
        self.scheduler.peer_gone(peer)

    # -- inputs --------------------------------------------------------------------------------

    def batch(self) -> AbstractContextManager[None]:
        """Group several calls (one batch of inputs): walked directories are reused meanwhile."""
        return self.fs.batch()

    def on_peer_message(self, peer: str, msg: SyncMessage, now: Now, pump: bool = True) -> list[Outgoing]:
        """Handle one sync message from `peer`. With `pump=False` the pulling work it enables
        (starting files, requests, flushes) waits for `pump`: a batch of messages pumps once.

        :raises RemoteProtocolError: the peer broke the protocol; close its connection with `code`.
        """
        with self.fs.batch():
            out = self._on_peer_message(peer, msg, now)
            return out + self._pump(now) if pump else out

    def pump(self, now: Now) -> list[Outgoing]:
        """Start pulls, issue requests, flush finished files, announce (after `pump=False` calls)."""
        with self.fs.batch():
            return self._pump(now)

    def _on_peer_message(self, peer: str, msg: SyncMessage, now: Now) -> list[Outgoing]:
        state = self.peers.get(peer)
        if state is None:
            raise RemoteProtocolError("sync message before the session was set up", ErrorCode.UNEXPECTED_MESSAGE)
        out: list[Outgoing] = []
        match msg:
            case FolderHello():
                out += self.exchange.on_hello(peer, state, msg)
            case Index() if not state.ready:
                raise RemoteProtocolError("index before folder hello", ErrorCode.UNEXPECTED_MESSAGE)
            case IndexUpdate():
                self.exchange.on_update(peer, state, msg.files)
            case Index():
                self.exchange.on_full_index(peer, state, msg.files)
            case Request():
                out.append((peer, self._serve(msg)))
            case Response():
                self._on_response(peer, state, msg, now)
            case Progress():
                state.progress = (msg.need_files, msg.need_bytes)
        return out

    def on_local_change(self, names: list[str], now: Now) -> list[Outgoing]:
        """Rescan `names` (relative paths from file-system events; '' is everything) and announce
        what changed. Names that still are exactly what we wrote there are skipped."""
        with self.fs.batch():
            names = [n for n in names if not self.committer.own_write(n)]
            if names:
                self._scan_later(now, [""] if len(names) > MAX_EVENT_NAMES else names)
            return self._pump(now)

    @property
    def scan_pending(self) -> bool:
        """A chunked scan has more to do: call `continue_scan` soon."""
        return self._scan_chunks is not None

    def continue_scan(self, now: Now) -> list[Outgoing]:
        """Record and announce the next chunk of the scan in progress."""
        with self.fs.batch():
            if self._scan_chunks is not None:
                self._scan_step(now)
            return self._pump(now)

    def _scan_later(self, now: Now, names: list[str]) -> None:
        """Start a chunked scan of `names` ('' = everything) and do its first chunk; if one is
        running, queue the names for after it and do its next chunk (events never starve it)."""
        if not self._root_ok(now):
            return
        if self._scan_chunks is not None:
            self._scan_next.update(names)
            if len(self._scan_next) > MAX_EVENT_NAMES:
                self._scan_next = {""}
            self._scan_step(now)
            return
        self._scan_full = "" in names
        self.state = "scanning"
        self._scan_chunks = self.scanner.scan_chunks(int(now.wall), None if self._scan_full else names)
        self._scan_step(now)

    def _scan_step(self, now: Now) -> None:
        assert self._scan_chunks is not None
        try:
            chunk = next(self._scan_chunks)
            if not self._record_scan(chunk, now):
                return  # the folder stopped (its root went away): the scan is dropped
            self._drop_stray_temps(chunk.temp_files)
        except BaseException:
            # a disk or database failure: drop this scan (pulls must not wait for it forever)
            # and let the timer run a full one soon, which also covers the names this one had
            self._scan_chunks = None
            self.state = "idle"
            self.next_scan = min(self.next_scan, now.mono + RETRY_SCAN_AFTER)
            raise
        if not chunk.final:
            return
        self._scan_chunks = None
        self.state = "idle"
        if self._scan_full:
            self.next_scan = now.mono + self.rescan_interval
        if self._scan_next:
            names, self._scan_next = sorted(self._scan_next), set()
            self._scan_later(now, names)

    def _keep_as_conflict(self, name: str, local: FileInfo) -> str:
        """Rename `name` to the first free conflict-copy name of `local`; that name.

        Two losing versions by one device within one second share a name: the second gets `-2`
        (and so on) instead of failing on every retry for good.

        :raises OSError: every candidate is taken (the pull is retried later) or the rename failed.
        """
        for attempt in range(MAX_CONFLICT_ATTEMPT + 1):
            cname = conflict_name(local, attempt)
            if self.fs.lstat(cname) is None:
                self.fs.rename(name, cname)
                return cname
        raise FileExistsError(f"every conflict-copy name for {name!r} is taken")

    def _drop_stray_temps(self, temps: list[str]) -> None:
        """Delete temp files a scan found that no pull wants (a directory renamed during a pull
        takes the pull's temp file along): not left until the next restart. A pull that still
        writes into one keeps its open file and finds it gone when it commits."""
        if not temps:
            return
        wanted = {self._temp_of(n) for n in (*self.need, *self.jobs, *(j.name for j in self.committer.done))}
        for t in temps:
            if t not in wanted:
                try:
                    self.fs.unlink(t)
                except OSError as exc:
                    log.info("cannot delete stray temp file %r: %s", t, exc)

    def get_timer(self) -> float:
        """When `handle_timer` wants to run next, on the monotonic clock (`Now.mono`)."""
        if self.halted is not None:
            return self.next_check
        return min([
            self.next_scan, self.next_cleanup, *self.failed.values(), *self.recheck.values(),
            *self.scheduler.stall_times(),
        ])  # fmt: skip

    def handle_timer(self, now: Now) -> list[Outgoing]:
        """Periodic full rescan (the safety net under file-system events) and batch flush."""
        with self.fs.batch():
            if self.halted is not None:
                return self._resume(now) if now.mono >= self.next_check else []
            if now.mono >= self.next_scan and self._scan_chunks is None:
                self._scan_later(now, [""])
            if now.mono >= self.next_cleanup:
                more = self.versions.cleanup_step(now.wall)  # a bounded step: sync never waits for it
                self.next_cleanup = now.mono + (CLEANUP_STEP_EVERY if more else CLEANUP_EVERY)
            unsettled = [name for name, when in self.recheck.items() if when <= now.mono]
            for name in unsettled:
                del self.recheck[name]
            if unsettled:
                self._scan_later(now, unsettled)
            for peer in self.scheduler.stalls_due(now):
                self._stalled(peer, now)
            due = [name for name, when in self.failed.items() if when <= now.mono]
            for name in due:
                del self.failed[name]
            if due:
                self.exchange.reconsider(sorted(due))  # what is still needed is queued afresh
            return self._pump(now, force_flush=True)

    def flush(self, now: Now) -> list[Outgoing]:
        """Commit finished files durably, record them, and announce them to peers."""
        with self.fs.batch():
            return self._flush(now)

    def _flush(self, now: Now) -> list[Outgoing]:
        if self.halted is not None:
            return []
        if self._scan_chunks is not None:
            return self.exchange.announce()  # commits wait for the scan in progress (see `_pump`)
        self.flush_due = False
        done = self.committer.commit(self.index, now.wall)  # steps 1 to 5 of docs/SYNC.md, "Durability batching"
        for name in done.failed:
            self._give_up(name, now)
        if any(r.name == IGNORE_FILE for r in done.records):
            # a peer's `.tofuignore` is in place: its patterns apply now (our own write's event is
            # dropped, so no scan would load them before the timer's)
            self.scanner.ignore = load_ignore(self.fs)
            if self.scanner.ignore.lines != self._ignore_lines:
                self._ignore_changed(now)
        rescan = done.rescan
        if rescan:
            self._scan(now, rescan)
            # what the scan did not turn into a decision is asked for again (a fresh temp file)
            if self.halted is None:
                self.exchange.reconsider([n for n in rescan if n not in self.need])
        return self.exchange.announce()

    # -- the folder root -----------------------------------------------------------------------

    def _root_ok(self, now: Now) -> bool:
        """True if we may scan and write: the root is there with its marker. Otherwise stop."""
        if self.fs.refresh():
            return self.halted is None  # a stopped folder resumes from `handle_timer` only
        if self.halted is None:
            self._halt()
        self.next_check = now.mono + ROOT_RECHECK
        return False

    def _halt(self) -> None:
        """Stop all work: the folder root or its marker is missing (deleted, moved, unmounted)."""
        root = self.fs.root
        self.halted = (
            f"{root} or its {MARKER} directory is missing (folder deleted, moved, or its disk not "
            f"mounted?): nothing is scanned, written or deleted until it is back; to sync the "
            f"directory as it is now, create the directory {root / MARKER}"
        )
        log.error("folder %r stopped: %s", self.folder_id, self.halted)
        for name in list(self.jobs):
            self._drop_job(name)  # temp files stay: the pulls resume when the folder is back
        # what the committer would record is found again by the full scan of `_resume`
        self.committer.reset()
        self.queue.clear()
        self.deletions.clear()
        self.need.clear()
        self.failed.clear()
        self.recheck.clear()
        self._recheck_tries.clear()
        self._scan_chunks = None
        self._scan_next.clear()
        self.state = "idle"
        self.flush_due = False

    def _resume(self, now: Now) -> list[Outgoing]:
        """Look for the root of a stopped folder; when it is back, scan it and sync again."""
        if not self.fs.refresh():
            self.next_check = now.mono + ROOT_RECHECK
            return []
        log.warning("folder %r: %s is back; syncing it again", self.folder_id, self.fs.root)
        self.halted = None
        self.start(now)
        return self._pump(now, force_flush=True)

    # -- status --------------------------------------------------------------------------------

    def status(self) -> FolderStatus:
        """Files, bytes and what is still needed, for `status`."""
        files, size = self.index.totals()
        # a file being pulled counts only its blocks still to come, so progress moves during a
        # long transfer instead of jumping from 0 to 100 % at its end
        finished = {j.name for j in self.committer.done}
        need_bytes = 0
        for name, n in self.need.items():
            t = n.target
            if t.deleted or name in finished:
                continue
            job = self.jobs.get(name)
            left = t.size if job is None else min(t.size, (len(job.fetch) + len(job.outstanding)) * t.block_size)
            need_bytes += left
        state = "error" if self.halted else "syncing" if self.need or self.jobs else self.state
        if state == "idle" and self.recheck:
            state = "scanning"  # files being written are looked at again in a moment: not idle yet
        peers = {p: s.progress for p, s in self.peers.items()}
        return FolderStatus(
            state, files, size, len(self.need), need_bytes, peers, self.halted or "", len(self.failed),
            self.scheduler.requested_blocks, self.versions.evicted, self.rules.kind.value,
            len(self.rules.differs), len(self.rules.local_changes),
        )  # fmt: skip

    # -- folder types --------------------------------------------------------------------------

    def override(self, now: Now) -> list[Outgoing]:
        """Send-only: make our state win everywhere for the names a peer changed."""
        with self.fs.batch():
            if not self.rules.send_only:
                raise LookupError(f"folder {self.folder_id!r} is not send-only")
            peers = self.index.peers()

            def theirs(name: str) -> list[FileInfo]:
                return [r for p in peers if (r := self.index.remote(p, name)) is not None]

            self.index.update_local(self.rules.override(now.wall, theirs))
            return self.exchange.announce()

    def revert(self, now: Now) -> list[Outgoing]:
        """Receive-only: undo our local changes (kept as versions); the peers' content comes back."""
        with self.fs.batch():
            if not self.rules.receive_only:
                raise LookupError(f"folder {self.folder_id!r} is not receive-only")
            names = self.rules.revert(now.wall)
            self.versions.flush_notes()
            self.exchange.reconsider(names)
            return self._pump(now, force_flush=True)

    # -- kept versions -------------------------------------------------------------------------

    def list_versions(self, name: str = "") -> list[Kept]:
        """The kept versions of file `name`, or of everything under directory `name`, newest first."""
        with self.fs.batch():
            return self.versions.listing(name)

    def restore(self, name: str, at: float | None, now: Now) -> tuple[Kept, list[Outgoing]]:
        """Put back the version of `name` kept at or before wall time `at` (None: the newest) as a
        local change, keeping what it replaces as a version too; (the version, messages to send).

        :raises LookupError: no such version, or `name` is being synced right now.
        """
        with self.fs.batch():
            kept = self.versions.pick(name, at)
            if kept is None:
                raise LookupError(f"no kept version of {name!r}" + (" at or before that time" if at else ""))
            if name in self.jobs or name in self.need or self.halted is not None or self._scan_chunks is not None:
                raise LookupError(f"{name!r} is being synced right now; try again in a moment")
            self.versions.restore(kept, self.device_id, now.wall)
            self.versions.flush_notes()
            self._scan(now, [name])
            return kept, self.exchange.announce()

    # -- scanning ------------------------------------------------------------------------------

    def _scan(self, now: Now, names: list[str] | None) -> list[str]:
        """Scan `names` (None: everything) in one go: at start, and for a few names while pulling."""
        self.state = "scanning"
        result = self.scanner.scan(int(now.wall), names)
        if not self._record_scan(result, now):
            return []
        if names is None:
            self.next_scan = now.mono + self.rescan_interval
        self.state = "idle"
        return result.temp_files

    def _record_scan(self, result: ScanResult, now: Now) -> bool:
        """Record what a scan found; False (nothing recorded) if the root went away meanwhile:
        then what looks deleted is only not mounted."""
        if not self._root_ok(now):
            return False
        for name, ino, mtime in result.refreshed:
            self.index.set_inode(name, ino, mtime)
            self._recheck_tries.pop(name, None)
        result.changed = self.rules.hold_back(self._adopt_remote_versions(result.changed))
        self.index.update_local(result.changed)
        for f in result.changed:
            self._recheck_tries.pop(f.name, None)
        for name in result.unsettled:
            self._look_again(name, now)
        changed = [f.name for f in result.changed]
        if changed:
            self.exchange.reconsider(changed)
        if self.scanner.ignore.lines != self._ignore_lines:
            self._ignore_changed(now)
        return True

    def _adopt_remote_versions(self, changed: list[FileInfo]) -> list[FileInfo]:
        """A file found on disk that is exactly a peer's current version of that name (same
        content, size, mtime and exec bit) is recorded as that version, not as a new one of ours.

        That is what a pull leaves when the agent is killed after putting the file in place and
        before recording it: recorded as our own new version, it would be concurrent with the
        peer's later changes and undo them (a deletion that races an edit loses), bringing back
        files the peer deleted or renamed.
        """
        files = {f.name: f for f in changed if not f.deleted and f.type is FileType.FILE}
        if not files:
            return changed
        adopted: dict[str, FileInfo] = {}
        for peer in self.index.peers():
            for name, r in self.index.remote_many(peer, list(files)).items():
                f = files[name]
                same = (r.type, r.size, r.mtime_ns, r.executable, r.block_size, r.hashes) == (
                    f.type, f.size, f.mtime_ns, f.executable, f.block_size, f.hashes
                )  # fmt: skip
                if same and not r.deleted and name not in adopted:
                    adopted[name] = f.replace(version=r.version, modified_by=r.modified_by)
        return [adopted.get(f.name, f) for f in changed]

    def _look_again(self, name: str, now: Now) -> None:
        """Scan `name` again soon: it changed while we hashed it (backing off while it keeps changing)."""
        tries = self._recheck_tries.get(name, 0) + 1
        if tries == 1 and len(self._recheck_tries) >= MAX_FAILED:
            self.next_scan = min(self.next_scan, now.mono + RECHECK_MAX)  # too many: one full scan looks at all
            return
        self._recheck_tries[name] = tries
        self.recheck[name] = now.mono + min(RECHECK_MAX, RECHECK_FIRST * 2 ** min(tries - 1, 8))

    def _ignore_changed(self, now: Now) -> None:
        """`.tofuignore` changed: names it no longer ignores are scanned and pulled now, not at the
        next timer scan or restart; names it now ignores are no longer pulled."""
        self._ignore_lines = self.scanner.ignore.lines
        log.info("folder %r: .tofuignore changed; rescanning", self.folder_id)
        ignore = self.scanner.ignore
        for name, n in list(self.need.items()):
            if ignore.matches(name, n.target.type is FileType.DIR):
                self._drop_job(name)
                del self.need[name]
        self.next_scan = min(self.next_scan, now.mono)  # a full scan, on the timer's next run
        for peer in self.index.peers():
            self.exchange.consider(list(self.index.differing(peer)), peer)

    # -- pulling -------------------------------------------------------------------------------

    def _pump(self, now: Now, force_flush: bool = False) -> list[Outgoing]:
        out: list[Outgoing] = []
        if self.halted is not None:
            return self.exchange.announce()
        if self._scan_chunks is not None:
            # the scan compares the disk with records it read when it began: pulls wait for it
            # (requests of started pulls still go out, their answers only fill temp files)
            return self.scheduler.issue(now) + self.exchange.announce()
        while self.queue and len(self.jobs) < self.max_jobs:
            self._start(self.queue.popleft(), now)
        requests = self.scheduler.issue(now)
        out += requests
        done = self.committer.done
        if done and (force_flush or len(done) >= self.batch_files or not self.scheduler.requests):
            if requests and self.scheduler.requests and not force_flush and not self.flush_due:
                # Let these requests go out first and flush on the next call, which the shell
                # makes at once: the peer answers while our disk works through the batch.
                self.flush_due = True
            else:
                self.flush_due = False
                out += self.flush(now)
        if self.deletions.pending and not self.jobs and not self.queue and not self.committer.done:
            self.deletions.apply(now.wall)
            if self.queue:
                while self.queue and len(self.jobs) < self.max_jobs:
                    self._start(self.queue.popleft(), now)
                out += self.scheduler.issue(now)
        if self.committer.records or self.committer.dirty_dirs:
            out += self.flush(now)
        if self.committer.leftover_temps:
            self.committer.sweep_temps(self.need)
        return out + self.exchange.announce()

    def _start(self, name: str, now: Now) -> None:
        n = self.need.get(name)
        if n is None or name in self.jobs:
            return
        local = self.index.local(name)
        if self.rules.receive_only and not puller.unchanged(self.fs.lstat(name), local):
            # a peer's change wins over a local one in a receive-only folder: ours is kept as a version
            if self.rules.drop_local_change(name, now.wall):
                local = None
        d = decide(local, n.target)
        if d.action is Action.NONE or d.target is None:
            del self.need[name]
            return
        if d.action is Action.DELETE:
            self.deletions.pending.add(name)  # a deletion overtook the queued pull: deletions go in their own step
            return
        if not puller.unchanged(self.fs.lstat(name), local):
            # Our disk moved on since the last scan: record that first, then decide afresh (the
            # rescan's records may make this a conflict, or nothing to do).
            del self.need[name]
            self._scan(now, [name])
            if self.halted is not None:
                return
            if name not in self.need:
                if puller.unchanged(self.fs.lstat(name), self.index.local(name)):
                    self.exchange.reconsider([name])
                else:
                    self._give_up(name, now)  # something we do not sync (a symlink, a FIFO) is in the way
            return
        try:
            if d.conflict_name is not None and local is not None:
                cname = self._keep_as_conflict(name, local)
                copy = local.replace(name=cname, version=Vector().bump(self.device_id, int(now.wall)),
                                     modified_by=self.device_id)  # fmt: skip
                self.committer.records.append(copy)
                self.committer.dirty_dirs.update({name.rpartition("/")[0], cname.rpartition("/")[0]})
                local = None
            if d.action is Action.PULL and local is not None and not local.deleted and local.type is FileType.DIR:
                # a file replaces our directory: its files' deletions first, then the directory
                if not self._clear_dir(local, now):
                    return
                local = None
            if d.action is Action.MKDIR:
                if local is not None and not local.deleted and local.type is FileType.FILE:
                    # a directory replaces our (unchanged) file: kept as a version
                    if self.versions.keep(name, d.target.modified_by, now.wall, replaced=False) is None:
                        self.fs.unlink(name)
                st = self.fs.mkdir(name)
                self.committer.records.append(d.target.replace(inode=st.st_ino))
                self.committer.dirty_dirs.add(name.rpartition("/")[0])
            elif d.action is Action.RECORD:
                self.committer.records.append(d.target.replace(inode=local.inode if local else 0))
            elif d.action is Action.METADATA:
                self.committer.set_metadata(d.target)
            elif d.action is Action.PULL:
                if n.sources and all(p in self.peers and self.peers[p].stalled for p in n.sources):
                    self._give_up(name, now)  # only stalled peers have it: keep the slot for others
                    return
                if not self._disk_has_room(d.target.size, now):
                    self._give_up(name, now)
                    return
                job = puller.Job(d.target, local, set(n.sources))
                puller.open_job(self.fs, self.index, job, self.scanner.executor, self._temps_in_use())
                self.jobs[name] = job
                self._maybe_done(job)
                return
            del self.need[name]
        except OSError as exc:
            log.warning("cannot sync %r (trying again in %.0f s): %s", name, self.retry_pull_after, exc)
            self._give_up(name, now)

    def _temps_in_use(self) -> set[tuple[int, int]]:
        """(st_dev, st_ino) of every temp file a pull holds open or has finished writing."""
        busy = {(dev, ino) for dev, ino, _ in (j.temp_id for j in self.committer.done) if ino}
        for job in self.jobs.values():
            if job.fd >= 0:
                st = os.fstat(job.fd)
                busy.add((st.st_dev, st.st_ino))
        return busy

    def _stalled(self, peer: str, now: Now) -> None:
        """Write off `peer`'s open requests: its files are asked of other peers, or retried later."""
        log.warning(
            "peer %s left our block requests unanswered for %.0f s: asking others", peer[:7],
            self.scheduler.stall_timeout,
        )  # fmt: skip
        for name in self.scheduler.stall(peer, self.peers[peer]):
            self._give_up(name, now)  # frees the slot for files other peers can send

    def _disk_has_room(self, size: int, now: Now) -> bool:
        """True if pulling `size` more bytes (on top of what running pulls still write) leaves
        the file system at least `min_free_fraction` free; a full disk hurts the whole machine.
        The free space is read at most once a second; pulls started meanwhile are subtracted."""
        if now.mono - self._space_at >= 1.0 or now.mono < self._space_at:
            self._read_space(now)
        if self._space < size and self.versions.evict(size - self._space):
            self._read_space(now)  # short of room: the oldest kept versions went first (see `status`)
        if self._space >= size:
            self._space -= size
            self._space_warned = False
            return True
        if not self._space_warned:  # one line per episode, not one per file
            self._space_warned = True
            log.warning(
                "folder %r: not enough free disk space to pull %d bytes (keeping %.0f %% of the disk free); "
                "trying again every %.0f s", self.folder_id, size, self.min_free_fraction * 100,
                self.retry_pull_after,
            )  # fmt: skip
        return False

    def _read_space(self, now: Now) -> None:
        free, total = self.fs.free_space()
        coming = sum((len(j.fetch) + len(j.outstanding)) * j.target.block_size for j in self.jobs.values())
        self._space, self._space_at = free - coming - int(total * self.min_free_fraction), now.mono

    def _give_up(self, name: str, now: Now) -> None:
        """Stop working on `name` (its temp file stays for resuming) and try it again later."""
        self._drop_job(name)
        self.need.pop(name, None)
        if len(self.failed) < MAX_FAILED:
            self.failed[name] = now.mono + self.retry_pull_after

    def _clear_dir(self, local: FileInfo, now: Now) -> bool:
        """Remove directory `local.name` so a file can take its name: apply the pending deletions
        under it, drop our stale temp files in it, rmdir. If it still holds files we keep (new or
        ignored ones), rename it to a conflict copy instead, rescan both names and return False:
        the rescan decides the name afresh."""
        name = local.name
        self.deletions.apply(now.wall, under=name)
        self.fs.remove_temps(name, keep=self.committer.temps_in_use(name))
        if self.fs.rmdir(name):
            self.committer.dirty_dirs.add(name.rpartition("/")[0])
            return True
        inside = [f.name for f in self.index.local_files_under(name) if f.name != name and not f.deleted]
        need = self.need.get(name)
        for peer in sorted(need.sources) if need is not None else ():
            if any(not f.deleted for f in self.index.remote_many(peer, inside).values()):
                # the peer announces `name` as a file and files inside it: its index contradicts itself
                log.warning("peer %s announces %r as a file and as a directory: keeping the directory", peer[:7], name)
                self._give_up(name, now)
                return False
        cname = self._keep_as_conflict(name, local)
        log.warning("a file replaces directory %r, which holds files we keep: kept it as %r", name, cname)
        self.committer.dirty_dirs.update({name.rpartition("/")[0], cname.rpartition("/")[0]})
        self.need.pop(name, None)
        self._scan(now, [name, cname])
        if name not in self.need and self.halted is None:
            self.exchange.reconsider([name])
        return False

    def _serve(self, req: Request) -> Response:
        # The daemon's shell answers requests with a `BlockServer` instead, beside the engine.
        return serve_block(self.folder_id, self.index, self.fs, req)

    def _on_response(self, peer: str, state: Peer, msg: Response, now: Now) -> None:
        answered = self.scheduler.answered(peer, state, msg, now)
        if answered is None:
            return
        job, i = answered
        name = job.name
        if msg.error is not BlockError.NONE:
            if self.scheduler.refused(peer, job, i):
                self._drop_job(name)
                self.need.pop(name, None)
            return
        if not puller.block_ok(job, i, msg.data):
            log.warning("peer %s sent a block of %r that does not match its hash", peer[:7], name)
            self.scheduler.bad_block(state, job, i)
            return
        try:
            puller.write_verified(job, i, msg.data)
        except OSError as exc:
            # A full or failing disk: the peer did nothing wrong. The temp file stays; the retry
            # keeps only the blocks in it whose hashes match, so a hole is fetched again.
            log.warning("cannot write %r (trying again in %.0f s): %s", name, self.retry_pull_after, exc)
            self._give_up(name, now)
            return
        self._maybe_done(job)

    def _maybe_done(self, job: puller.Job) -> None:
        if job.done:
            puller.finish_job(job)
            del self.jobs[job.name]
            self.need.pop(job.name, None)
            self.committer.done.append(job)

    def _drop_job(self, name: str) -> None:
        job = self.jobs.pop(name, None)
        if job is not None:
            puller.abort_job(job)
            self.committer.leftover_temps.add(name)
            self.scheduler.cancel(job)

    def _temp_of(self, name: str) -> str:
        parent = name.rpartition("/")[0]
        return f"{parent}/{temp_name_for(name)}" if parent else temp_name_for(name)
