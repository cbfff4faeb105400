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
"""

from __future__ import annotations

import logging
import os
import stat
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import ErrorCode, RemoteProtocolError
from agent.sync import puller
from agent.sync.clock import Now
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
    next_batch,
    wire_size,
)  # fmt: skip
from agent.sync.model import FileInfo, FileType
from agent.sync.names import IGNORE_FILE, MARKER, parent_names
from agent.sync.planner import Action, conflict_name, decide
from agent.sync.scanner import Scanner, ScanResult, load_ignore
from agent.sync.server import serve_block
from agent.sync.vectors import Vector

log = logging.getLogger(__name__)
Outgoing = tuple[str, SyncMessage]
MAX_BAD_BLOCKS = 3
MAX_EVENT_NAMES = 256  # more changed names than this at once (after our own writes): one full scan
RETRY_SCAN_AFTER = 60.0  # a scan that failed on a disk or database error is retried (in full) this soon
RETRY_PULL_AFTER = 60.0  # a name we could not write (full disk, read-only directory) is tried again this soon
MIN_FREE_FRACTION = 0.01  # as Syncthing's minDiskFree: pulls never fill the disk past 99 %
MAX_DEPTH_PASSES = 8  # deletion passes per call when emptied directories become deletable in turn
ROOT_RECHECK = 10.0  # a folder stopped for a missing root or marker looks for it again this often
MAX_FAILED = 10_000  # names remembered for a retry; past that the periodic full rescan is the retry
# A file a scan skipped because it was being written is looked at again this soon, event or not
# (no watcher runs yet while the agent starts), backing off to RECHECK_MAX while it keeps changing.
RECHECK_FIRST = 1.0
RECHECK_MAX = 16.0
# A peer that leaves our requests unanswered this long (not one response) is stalled: its
# requests are written off and its files are asked of other peers, or wait (a slow but honest
# peer answers something well within this: a whole window of 48 MiB at 1 MB/s takes 48 s).
STALL_TIMEOUT = 120.0
MAX_WRITTEN = 65536  # names remembered as our own writes until their file-system event comes back
REQUEST_ID_MASK = 0xFFFFFF  # low 24 bits count; the top 8 bits are the engine's `request_id_base`
# Index messages per peer handed to the shell and not yet reported sent (`index_sent`). Our index
# goes out as a stream read from the database as the link drains: a peer that reads slowly, or
# twenty peers at once, cannot make us hold a 100,000-record index in memory per peer.
INDEX_WINDOW = 2
# Names one peer may announce in one folder (deletion records included), and the bytes of their
# records (names, vectors, block hashes). Remote indexes live on disk, not in memory, but a
# trusted peer gone bad must not fill the disk with made-up names or block lists: a record can be
# up to ~2 MiB (a 128 GiB file's hashes), so the names alone would not bound it. 1 GiB of records
# describes ~60 TB of content in 2 MiB blocks. Past either, the peer is refused with limit_exceeded.
MAX_REMOTE_RECORDS = 2_000_000
MAX_REMOTE_BYTES = 1 << 30


@dataclass(slots=True)
class Peer:
    """A connected peer: whether it said hello, what we announced to it, what we asked of it."""

    ready: bool = False
    sent_seq: int = 0  # our records up to this sequence are handed to the shell for this peer
    full: bool = False  # the next index message is a full `Index` (the peer holds none of ours)
    window: int = INDEX_WINDOW  # index messages we may still hand over before `index_sent`
    records: int = -1  # at least how many names it announced to us (-1: not counted yet)
    record_bytes: int = -1  # at least how many bytes of records it announced (-1: not counted yet)
    inflight_bytes: int = 0
    answered_at: float = 0.0  # (monotonic) its last response, or our first request since it had none open
    stalled: bool = False  # it left requests unanswered for STALL_TIMEOUT; cleared by any response
    bad_blocks: int = 0
    progress: tuple[int, int] | None = None  # its (need_files, need_bytes) as it reported


@dataclass(slots=True)
class Need:
    """A version of a name that we lack, and the peers that announced it."""

    target: FileInfo
    sources: set[str] = field(default_factory=set)


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


class SyncEngine:
    """Sync state of one folder shared with any number of peers."""

    def __init__(
        self, folder_id: str, root: Path, index: FolderIndex, device_id: str, *,
        executor: Executor | None = None,
        max_inflight_bytes: int = 32 * 1024 * 1024, max_jobs: int = 128, batch_files: int = 1000,
        rescan_interval: float = 3600.0, request_id_base: int = 0, max_remote_records: int = MAX_REMOTE_RECORDS,
        max_remote_bytes: int = MAX_REMOTE_BYTES,
    ) -> None:  # fmt: skip
        self.folder_id = folder_id
        self.index = index
        self.device_id = device_id
        self.fs = FolderFS(root, need_root=False)  # a missing root stops the folder (see `_root_ok`)
        self.scanner = Scanner(self.fs, index, device_id, executor)
        self.peers: dict[str, Peer] = {}
        self.need: dict[str, Need] = {}
        self.queue: deque[str] = deque()
        self.deletes: set[str] = set()
        self.jobs: dict[str, puller.Job] = {}
        self.requests: dict[int, tuple[str, str, int]] = {}  # request id -> (peer, name, block)
        # Requests of pulls we gave up (a newer version superseded them): an honest peer's late
        # answer to one is expected, so it is dropped quietly instead of closing the link. Their
        # bytes stay in the peer's in-flight window until answered, which bounds this table too.
        self.cancelled: dict[int, tuple[str, int]] = {}  # request id -> (peer, bytes)
        self.done: list[puller.Job] = []  # complete temp files waiting for `flush`
        self.failed: dict[str, float] = {}  # name -> when to try it again (a write or rename failed)
        self.recheck: dict[str, float] = {}  # name -> when to scan it again (it was changing when scanned)
        self._recheck_tries: dict[str, int] = {}  # name -> scans that found it changing in a row
        # names whose temp file may be left over (a pull dropped, not committed, or kept at start
        # to resume): deleted once the name is no longer needed, not at the next restart
        self._leftover_temps: set[str] = set()
        self.kept_dirs: set[str] = set()  # directories a peer deleted that still held files here
        self._space, self._space_at = 0, -1e18  # free bytes left for new pulls, and when they were read
        self._space_warned = False  # the lack of space was logged (until a pull fits again)
        self.records: list[FileInfo] = []  # index records waiting for `flush`
        self.dirty_dirs: set[str] = set()
        # Files we put in place ourselves: name -> (inode, mtime_ns). The file-system event our
        # own rename causes is dropped if the name still looks like that. (Not directories: the
        # event of a new directory also stands for files made in it before it was watched.)
        self.written: dict[str, tuple[int, int]] = {}
        self.max_inflight_bytes = max_inflight_bytes
        self.max_jobs = max_jobs
        self.max_remote_records = max_remote_records
        self.max_remote_bytes = max_remote_bytes
        self.batch_files = batch_files
        self.rescan_interval = rescan_interval
        self.next_scan = 0.0  # when the next full scan is due (monotonic, as every timer here)
        self.flush_due = False  # a batch is complete and waits for the next `pump` (call it soon)
        self.requested_blocks = 0  # counters for tests and status
        self.state = "idle"
        self.halted: str | None = None  # why the folder is stopped: its root or marker is missing
        self.next_check = 0.0  # when a stopped folder looks for its root again
        self._scan_chunks: Iterator[ScanResult] | None = None  # the scan in progress
        self._scan_full = False  # it is a full scan (the timer's next run is set when it ends)
        self._scan_next: set[str] = set()  # names changed meanwhile: scanned when it ends ('' = all)
        self._ignore_lines = self.scanner.ignore.lines  # the `.tofuignore` the last recorded scan used
        self._next_request_id = 0
        # Responses carry no folder: each engine of a service draws ids from its own range
        # (top 8 bits) so the shell can route a response to the engine that asked.
        self.request_id_base = request_id_base & ~REQUEST_ID_MASK & 0xFFFFFFFF

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
        if not self._root_ok(now):
            return
        temps = self._scan(now, None)
        if self.halted is not None:
            return
        for peer in self.index.peers():
            self._consider(list(self.index.differing(peer)), peer)
        wanted = {self._temp_of(name): name for name in self.need}
        for t in temps:
            if t not in wanted:
                self.fs.unlink(t)
            else:
                self._leftover_temps.add(wanted[t])

    def close(self) -> None:
        """Close open files (temp files stay for resuming)."""
        for job in self.jobs.values():
            puller.abort_job(job)
        self.fs.close()

    def peer_connected(self, peer: str, now: Now) -> list[Outgoing]:
        """A session with `peer` that shares this folder is up: say hello."""
        self.peers[peer] = Peer()
        have_id, have_seq = self.index.peer_state(peer)
        return [(peer, FolderHello(self.folder_id, self.index.index_id, have_id, have_seq))]

    def index_sent(self, peer: str) -> list[Outgoing]:
        """The shell sent one of our index messages to `peer`: hand over the next, if any."""
        state = self.peers.get(peer)
        if state is None:
            return []
        state.window = min(INDEX_WINDOW, state.window + 1)
        return self._announce_to(peer, state)

    def peer_disconnected(self, peer: str) -> None:
        """Forget in-flight requests to `peer`; their blocks will be asked of someone else."""
        self.peers.pop(peer, None)
        self.cancelled = {rid: c for rid, c in self.cancelled.items() if c[0] != peer}
        for rid, (p, name, i) in list(self.requests.items()):
            if p == peer:
                del self.requests[rid]
                job = self.jobs.get(name)
                if job is not None:
                    job.outstanding.discard(i)
                    job.fetch.appendleft(i)

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
                out += self._on_hello(peer, state, msg)
            case Index() if not state.ready:
                raise RemoteProtocolError("index before folder hello", ErrorCode.UNEXPECTED_MESSAGE)
            case IndexUpdate():
                self._check_room(peer, state, msg.files)
                self._on_index(peer, list(msg.files))
            case Index():
                self.index.reset_peer(peer, self.index.peer_state(peer)[0])
                state.records = state.record_bytes = 0
                self._forget_source(peer)
                self._check_room(peer, state, msg.files)
                self._on_index(peer, list(msg.files))
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
            names = [n for n in names if not self._own_write(n)]
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

    def _own_write(self, name: str) -> bool:
        mark = self.written.pop(name, None)
        if mark is None:
            return False
        st = self.fs.lstat(name)
        return st is not None and stat.S_ISREG(st.st_mode) and (st.st_ino, st.st_mtime_ns) == mark

    def _wrote(self, name: str, st: os.stat_result) -> None:
        if len(self.written) >= MAX_WRITTEN:
            self.written.clear()  # events are not coming back (no watcher): forget, costs rescans only
        self.written[name] = (st.st_ino, st.st_mtime_ns)

    def get_timer(self) -> float:
        """When `handle_timer` wants to run next, on the monotonic clock (`Now.mono`)."""
        if self.halted is not None:
            return self.next_check
        stalls = [s.answered_at + STALL_TIMEOUT for s in self.peers.values() if s.inflight_bytes and not s.stalled]
        return min([self.next_scan, *self.failed.values(), *self.recheck.values(), *stalls])

    def handle_timer(self, now: Now) -> list[Outgoing]:
        """Periodic full rescan (the safety net under file-system events) and batch flush."""
        with self.fs.batch():
            if self.halted is not None:
                return self._resume(now) if now.mono >= self.next_check else []
            if now.mono >= self.next_scan and self._scan_chunks is None:
                self._scan_later(now, [""])
            unsettled = [name for name, when in self.recheck.items() if when <= now.mono]
            for name in unsettled:
                del self.recheck[name]
            if unsettled:
                self._scan_later(now, unsettled)
            for peer, state in self.peers.items():
                if state.inflight_bytes and not state.stalled and now.mono - state.answered_at >= STALL_TIMEOUT:
                    self._stalled(peer, state, now)
            due = [name for name, when in self.failed.items() if when <= now.mono]
            for name in due:
                del self.failed[name]
            if due:
                self._reconsider(sorted(due))  # what is still needed is queued afresh
            return self._pump(now, force_flush=True)

    def flush(self, now: Now) -> list[Outgoing]:
        """Commit finished files durably, record them, and announce them to peers."""
        with self.fs.batch():
            return self._flush(now)

    def _flush(self, now: Now) -> list[Outgoing]:
        if self.halted is not None:
            return []
        if self._scan_chunks is not None:
            return self._announce()  # commits wait for the scan in progress (see `_pump`)
        self.flush_due = False
        jobs, self.done = self.done, []
        rescan: list[str] = []
        if jobs:
            # 1. the data of every temp file is durable before any rename (one syncfs for many)
            lost = self.fs.sync_temps([j.name for j in jobs])
            rescan.extend(sorted(lost))
            by_dir: dict[str, list[puller.Job]] = {}
            for job in jobs:
                if job.name not in lost:
                    by_dir.setdefault(job.name.rpartition("/")[0], []).append(job)
            for parent, group in by_dir.items():
                if self._commit_dir(parent, group, rescan, now):
                    self.dirty_dirs.add(parent)
        # 4. every directory that changed is durable before the index says so
        dirty, self.dirty_dirs = sorted(self.dirty_dirs), set()
        for d in dirty:
            try:
                self.fs.fsync_dir(d)
            except OSError as exc:
                # replaced by a symlink or a file since we wrote there: what it holds now is the
                # scan's business (and the flush must not fail on every call from now on)
                log.warning("cannot sync directory %r to disk: %s", d, exc)
                rescan.append(d)
        records, self.records = self.records, []
        self.index.update_local(records)
        if any(r.name == IGNORE_FILE for r in records):
            # a peer's `.tofuignore` is in place: its patterns apply now (our own write's event is
            # dropped, so no scan would load them before the timer's)
            self.scanner.ignore = load_ignore(self.fs)
            if self.scanner.ignore.lines != self._ignore_lines:
                self._ignore_changed(now)
        if rescan:
            self._scan(now, rescan)
            # what the scan did not turn into a decision is asked for again (a fresh temp file)
            if self.halted is None:
                self._reconsider([n for n in rescan if n not in self.need])
        return self._announce()

    def _commit_dir(self, parent: str, jobs: list[puller.Job], rescan: list[str], now: Now) -> bool:
        """Steps 2 and 3 of `flush` for the finished files of one directory, walked once; True if
        anything was renamed. A name whose temp file is not the one we wrote (its directory was
        replaced or became a symlink while we fetched), or whose target changed locally, is not
        committed: it is scanned and decided again (a local edit becomes a conflict)."""
        try:
            dfd = self.fs.open_dir(parent)
        except OSError:
            rescan.extend(j.name for j in jobs)
            return False
        moved = False
        try:
            for job in jobs:
                try:
                    tmp = self.fs.lstat_at(dfd, temp_name_for(job.name))
                    if tmp is None or (tmp.st_dev, tmp.st_ino, tmp.st_ctime_ns) != job.temp_id:
                        rescan.append(job.name)
                        continue
                    if not puller.unchanged(self.fs.lstat_at(dfd, job.name.rpartition("/")[2]), job.expected):
                        rescan.append(job.name)
                        self._leftover_temps.add(job.name)  # the rescan decides whether it is still wanted
                        continue
                    st = self.fs.commit_temp_at(dfd, job.name)
                except OSError as exc:
                    # e.g. a directory holds the name now: retried later, not on every step
                    log.warning("cannot put %r in place (trying again in %.0f s): %s", job.name, RETRY_PULL_AFTER, exc)
                    self._give_up(job.name, now)
                    continue
                moved = True
                self._wrote(job.name, st)
                self.records.append(job.target.replace(inode=st.st_ino, mtime_ns=st.st_mtime_ns))
        finally:
            os.close(dfd)
        return moved

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
        for job in self.done:
            puller.abort_job(job)
        self.done.clear()
        self.queue.clear()
        self.deletes.clear()
        self.need.clear()
        self.failed.clear()
        self._leftover_temps.clear()  # the start after the root is back sorts them out
        self.recheck.clear()
        self._recheck_tries.clear()
        self.kept_dirs.clear()
        # what these would record is found again by the full scan of `_resume`
        self.records.clear()
        self.dirty_dirs.clear()
        self.written.clear()
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
        finished = {j.name for j in self.done}
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
            self.requested_blocks,
        )  # fmt: skip

    # -- index exchange ------------------------------------------------------------------------

    def _on_hello(self, peer: str, state: Peer, msg: FolderHello) -> list[Outgoing]:
        if self.index.peer_state(peer)[0] != msg.index_id:
            self.index.reset_peer(peer, msg.index_id)
            state.records = state.record_bytes = 0
            self._forget_source(peer)
        state.ready = True
        state.full = msg.have_index_id != self.index.index_id
        state.sent_seq = 0 if state.full else min(msg.have_sequence, self.index.sequence)
        return self._announce_to(peer, state)

    def _announce(self) -> list[Outgoing]:
        out: list[Outgoing] = []
        for peer, state in self.peers.items():
            out += self._announce_to(peer, state)
        return out

    def _announce_to(self, peer: str, state: Peer) -> list[Outgoing]:
        """Our records `peer` has not been handed yet, as index messages, up to its window."""
        out: list[Outgoing] = []
        while state.ready and state.window > 0 and (state.full or state.sent_seq < self.index.sequence):
            # read lazily: only the rows of this one message are ever decoded
            batch, more = next_batch(self.index.changes_since(state.sent_seq), max_files=MAX_FILES_PER_MESSAGE)
            if not batch and not state.full:
                state.sent_seq = self.index.sequence  # only numbers no record holds any more were left
                break
            # the last batch covers the sequence numbers no record holds any more, too
            state.sent_seq = batch[-1].sequence if more else self.index.sequence
            kind = Index if state.full else IndexUpdate
            state.full = False
            state.window -= 1
            out.append((peer, kind(self.folder_id, tuple(batch))))
        return out

    def _check_room(self, peer: str, state: Peer, files: tuple[FileInfo, ...]) -> None:
        """Refuse an index message that would take `peer` past `max_remote_records` names."""
        if state.records < 0:
            state.records = self.index.count_remote(peer)
        if state.records + len(files) > self.max_remote_records:
            # the running figure is an upper bound (updates of known names count too): be exact
            state.records = self.index.count_remote(peer)
            new = len(files) - len(self.index.remote_names(peer, (f.name for f in files)))
            if state.records + new > self.max_remote_records:
                raise RemoteProtocolError(
                    f"announces more than {self.max_remote_records} names in folder {self.folder_id!r}",
                    ErrorCode.LIMIT_EXCEEDED,
                )
        state.records += len(files)
        size = sum(wire_size(f) for f in files)
        if state.record_bytes < 0 or state.record_bytes + size > self.max_remote_bytes:
            # the running figure is an upper bound (replaced records still count): be exact
            state.record_bytes = self.index.remote_bytes(peer)
            if state.record_bytes + size > self.max_remote_bytes:
                raise RemoteProtocolError(
                    f"announces more than {self.max_remote_bytes >> 20} MiB of records in folder {self.folder_id!r}",
                    ErrorCode.LIMIT_EXCEEDED,
                )
        state.record_bytes += size

    def _on_index(self, peer: str, files: list[FileInfo]) -> None:
        self.index.apply_remote(peer, files)
        self._consider(files, peer)

    def _consider(self, files: list[FileInfo], peer: str) -> None:
        """Queue what we need among `files` announced by `peer`."""
        local = self.index.local_many(f.name for f in files)
        for remote in files:
            if self.scanner.ignore.matches(remote.name, remote.type is FileType.DIR):
                continue
            if decide(local.get(remote.name), remote).action is Action.NONE:
                continue
            cur = self.need.get(remote.name)
            if cur is not None:
                order = remote.version.compare(cur.target.version)
                if order.name == "EQUAL":
                    cur.sources.add(peer)
                    continue
                if order.name == "LESSER" or (order.name == "CONCURRENT" and decide(cur.target, remote).action
                                              is Action.NONE):  # fmt: skip
                    continue
                self._drop_job(remote.name)
            self.need[remote.name] = Need(remote, {peer})
            if remote.deleted:
                self.deletes.add(remote.name)
            else:
                self.queue.append(remote.name)

    def _forget_source(self, peer: str) -> None:
        for name, n in list(self.need.items()):
            n.sources.discard(peer)
            if not n.sources:
                self._drop_job(name)
                del self.need[name]

    def _reconsider(self, names: list[str]) -> None:
        for peer in self.index.peers():
            got = self.index.remote_many(peer, names)
            self._consider([got[n] for n in names if n in got], peer)

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
        self.index.update_local(result.changed)
        for f in result.changed:
            self._recheck_tries.pop(f.name, None)
        for name in result.unsettled:
            self._look_again(name, now)
        changed = [f.name for f in result.changed]
        if changed:
            self._reconsider(changed)
        if self.scanner.ignore.lines != self._ignore_lines:
            self._ignore_changed(now)
        return True

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
            self._consider(list(self.index.differing(peer)), peer)

    # -- pulling -------------------------------------------------------------------------------

    def _pump(self, now: Now, force_flush: bool = False) -> list[Outgoing]:
        out: list[Outgoing] = []
        if self.halted is not None:
            return self._announce()
        if self._scan_chunks is not None:
            # the scan compares the disk with records it read when it began: pulls wait for it
            # (requests of started pulls still go out, their answers only fill temp files)
            return self._issue_requests(now) + self._announce()
        while self.queue and len(self.jobs) < self.max_jobs:
            self._start(self.queue.popleft(), now)
        requests = self._issue_requests(now)
        out += requests
        if self.done and (force_flush or len(self.done) >= self.batch_files or not self.requests):
            if requests and self.requests and not force_flush and not self.flush_due:
                # Let these requests go out first and flush on the next call, which the shell
                # makes at once: the peer answers while our disk works through the batch.
                self.flush_due = True
            else:
                self.flush_due = False
                out += self.flush(now)
        if self.deletes and not self.jobs and not self.queue and not self.done:
            self._apply_deletes()
            if self.queue:
                while self.queue and len(self.jobs) < self.max_jobs:
                    self._start(self.queue.popleft(), now)
                out += self._issue_requests(now)
        if self.records or self.dirty_dirs:
            out += self.flush(now)
        if self._leftover_temps:
            self._sweep_temps()
        return out + self._announce()

    def _sweep_temps(self) -> None:
        """Delete the temp files of names we no longer pull (a local edit or a newer record won)."""
        busy = self.need.keys() | self.jobs.keys() | {j.name for j in self.done}
        for name in [n for n in self._leftover_temps if n not in busy]:
            self._leftover_temps.discard(name)
            try:
                self.fs.unlink(name, temp=True)
            except OSError as exc:  # a directory in the way, a read-only disk: the next start tries again
                log.info("cannot delete the temp file of %r: %s", name, exc)

    def _start(self, name: str, now: Now) -> None:
        n = self.need.get(name)
        if n is None or name in self.jobs:
            return
        local = self.index.local(name)
        d = decide(local, n.target)
        if d.action is Action.NONE or d.target is None:
            del self.need[name]
            return
        if d.action is Action.DELETE:
            self.deletes.add(name)  # a deletion overtook the queued pull: deletions go in their own step
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
                    self._reconsider([name])
                else:
                    self._give_up(name, now)  # something we do not sync (a symlink, a FIFO) is in the way
            return
        try:
            if d.conflict_name is not None and local is not None:
                self.fs.rename(name, d.conflict_name)
                copy = local.replace(name=d.conflict_name, version=Vector().bump(self.device_id, int(now.wall)),
                                     modified_by=self.device_id)  # fmt: skip
                self.records.append(copy)
                self.dirty_dirs.update({name.rpartition("/")[0], d.conflict_name.rpartition("/")[0]})
                local = None
            if d.action is Action.PULL and local is not None and not local.deleted and local.type is FileType.DIR:
                # a file replaces our directory: its files' deletions first, then the directory
                if not self._clear_dir(local, now):
                    return
                local = None
            if d.action is Action.MKDIR:
                if local is not None and not local.deleted and local.type is FileType.FILE:
                    self.fs.unlink(name)  # a directory replaces our (unchanged) file
                st = self.fs.mkdir(name)
                self.records.append(d.target.replace(inode=st.st_ino))
                self.dirty_dirs.add(name.rpartition("/")[0])
            elif d.action is Action.RECORD:
                self.records.append(d.target.replace(inode=local.inode if local else 0))
            elif d.action is Action.METADATA:
                self._set_metadata(d.target)
            elif d.action is Action.PULL:
                if n.sources and all(p in self.peers and self.peers[p].stalled for p in n.sources):
                    self._give_up(name, now)  # only stalled peers have it: keep the slot for others
                    return
                if not self._disk_has_room(d.target.size, now):
                    self._give_up(name, now)
                    return
                job = puller.Job(d.target, local, set(n.sources))
                puller.open_job(self.fs, self.index, job, self.scanner.executor)
                self.jobs[name] = job
                self._maybe_done(job)
                return
            del self.need[name]
        except OSError as exc:
            log.warning("cannot sync %r (trying again in %.0f s): %s", name, RETRY_PULL_AFTER, exc)
            self._give_up(name, now)

    def _stalled(self, peer: str, state: Peer, now: Now) -> None:
        """Write off `peer`'s open requests: its files are asked of other peers, or retried later."""
        log.warning("peer %s left our block requests unanswered for %.0f s: asking others", peer[:7], STALL_TIMEOUT)
        state.stalled = True
        for rid, (p, name, i) in list(self.requests.items()):
            if p != peer:
                continue
            job = self.jobs.get(name)
            # its bytes stay in the peer's window (as `cancelled`) until it answers or goes
            del self.requests[rid]
            t = job.target if job is not None else None
            self.cancelled[rid] = (peer, min(t.block_size, t.size - i * t.block_size) if t is not None else 0)
            if job is not None:
                job.outstanding.discard(i)
                job.fetch.appendleft(i)
        for name, job in list(self.jobs.items()):
            if not any(self._can_ask(p) for p in job.sources):
                self._give_up(name, now)  # frees the slot for files other peers can send

    def _disk_has_room(self, size: int, now: Now) -> bool:
        """True if pulling `size` more bytes (on top of what running pulls still write) leaves
        the file system at least MIN_FREE_FRACTION free; a full disk hurts the whole machine.
        The free space is read at most once a second; pulls started meanwhile are subtracted."""
        if now.mono - self._space_at >= 1.0 or now.mono < self._space_at:
            free, total = self.fs.free_space()
            coming = sum((len(j.fetch) + len(j.outstanding)) * j.target.block_size for j in self.jobs.values())
            self._space, self._space_at = free - coming - int(total * MIN_FREE_FRACTION), now.mono
        if self._space >= size:
            self._space -= size
            self._space_warned = False
            return True
        if not self._space_warned:  # one line per episode, not one per file
            self._space_warned = True
            log.warning(
                "folder %r: not enough free disk space to pull %d bytes (keeping %.0f %% of the disk free); "
                "trying again every %.0f s", self.folder_id, size, MIN_FREE_FRACTION * 100, RETRY_PULL_AFTER,
            )  # fmt: skip
        return False

    def _can_ask(self, peer: str) -> bool:
        state = self.peers.get(peer)
        return state is not None and state.ready and not state.stalled

    def _give_up(self, name: str, now: Now) -> None:
        """Stop working on `name` (its temp file stays for resuming) and try it again later."""
        self._drop_job(name)
        self.need.pop(name, None)
        if len(self.failed) < MAX_FAILED:
            self.failed[name] = now.mono + RETRY_PULL_AFTER

    def _temps_in_use(self, dirname: str) -> set[str]:
        """Base names of the temp files in `dirname` that a running or finished pull still needs."""
        names = [*self.jobs, *(j.name for j in self.done)]
        return {temp_name_for(n) for n in names if n.rpartition("/")[0] == dirname}

    def _clear_dir(self, local: FileInfo, now: Now) -> bool:
        """Remove directory `local.name` so a file can take its name: apply the pending deletions
        under it, drop our stale temp files in it, rmdir. If it still holds files we keep (new or
        ignored ones), rename it to a conflict copy instead, rescan both names and return False:
        the rescan decides the name afresh."""
        name = local.name
        self._apply_deletes(under=name)
        self.fs.remove_temps(name, keep=self._temps_in_use(name))
        if self.fs.rmdir(name):
            self.dirty_dirs.add(name.rpartition("/")[0])
            return True
        inside = [f.name for f in self.index.local_files_under(name) if f.name != name and not f.deleted]
        need = self.need.get(name)
        for peer in sorted(need.sources) if need is not None else ():
            if any(not f.deleted for f in self.index.remote_many(peer, inside).values()):
                # the peer announces `name` as a file and files inside it: its index contradicts itself
                log.warning("peer %s announces %r as a file and as a directory: keeping the directory", peer[:7], name)
                self._give_up(name, now)
                return False
        cname = conflict_name(local)
        log.warning("a file replaces directory %r, which holds files we keep: keeping it as %r", name, cname)
        self.fs.rename(name, cname)
        self.dirty_dirs.update({name.rpartition("/")[0], cname.rpartition("/")[0]})
        self.need.pop(name, None)
        self._scan(now, [name, cname])
        if name not in self.need and self.halted is None:
            self._reconsider([name])
        return False

    def _set_metadata(self, target: FileInfo) -> None:
        fd = self.fs.open_read(target.name)
        try:
            os.fchmod(fd, 0o755 if target.executable else 0o644)
            os.utime(fd, ns=(target.mtime_ns, target.mtime_ns))
            self.records.append(target.replace(inode=os.fstat(fd).st_ino))
        finally:
            os.close(fd)

    def _issue_requests(self, now: Now) -> list[Outgoing]:
        out: list[Outgoing] = []
        for job in self.jobs.values():
            while job.fetch:
                i = job.fetch[0]
                offset = i * job.target.block_size
                size = min(job.target.block_size, job.target.size - offset)
                # the first source with room in its window (a full one holds up only its own blocks)
                peer = next((p for p in sorted(job.sources) if self._can_ask(p) and self._room(p, size)), None)
                if peer is None:
                    break
                state = self.peers[peer]
                job.fetch.popleft()
                job.outstanding.add(i)
                if not state.inflight_bytes:
                    state.answered_at = now.mono  # the stall clock starts with the first open request
                state.inflight_bytes += size
                rid = self._new_request_id()
                self.requests[rid] = (peer, job.name, i)
                self.requested_blocks += 1
                out.append((peer, Request(self.folder_id, job.name, offset, size, job.target.block_hash(i), rid)))
        return out

    def _room(self, peer: str, size: int) -> bool:
        inflight = self.peers[peer].inflight_bytes
        return not inflight or inflight + size <= self.max_inflight_bytes

    def _new_request_id(self) -> int:
        while True:
            rid = self.request_id_base | self._next_request_id
            self._next_request_id = (self._next_request_id + 1) & REQUEST_ID_MASK
            if rid not in self.requests and rid not in self.cancelled:
                return rid  # (after a wrap, ids still awaiting an answer are skipped)

    def _serve(self, req: Request) -> Response:
        # The daemon's shell answers requests with a `BlockServer` instead, beside the engine.
        return serve_block(self.folder_id, self.index, self.fs, req)

    def _on_response(self, peer: str, state: Peer, msg: Response, now: Now) -> None:
        entry = self.requests.get(msg.request_id)
        late = self.cancelled.get(msg.request_id)
        if entry is None and late is not None and late[0] == peer:
            del self.cancelled[msg.request_id]
            state.inflight_bytes -= late[1]
            state.answered_at, state.stalled = now.mono, False
            return
        if entry is None or entry[0] != peer:
            # (checked before the entry is taken: a peer answering another's id must not steal it)
            raise RemoteProtocolError("response to no request of ours", ErrorCode.UNEXPECTED_MESSAGE)
        del self.requests[msg.request_id]
        state.answered_at, state.stalled = now.mono, False
        _, name, i = entry
        job = self.jobs.get(name)
        t = job.target if job is not None else None
        if t is not None:
            state.inflight_bytes -= min(t.block_size, t.size - i * t.block_size)
        if job is None:
            return
        job.outstanding.discard(i)
        if msg.error is not BlockError.NONE:
            job.sources.discard(peer)  # it no longer has this version; its index update will follow
            job.fetch.appendleft(i)
            if not job.sources:
                self._drop_job(name)
                self.need.pop(name, None)
            return
        if not puller.block_ok(job, i, msg.data):
            state.bad_blocks += 1
            job.fetch.appendleft(i)
            log.warning("peer %s sent a block of %r that does not match its hash", peer[:7], name)
            if state.bad_blocks >= MAX_BAD_BLOCKS:
                raise RemoteProtocolError(f"{state.bad_blocks} corrupt blocks", ErrorCode.BAD_BLOCK)
            return
        try:
            puller.write_verified(job, i, msg.data)
        except OSError as exc:
            # A full or failing disk: the peer did nothing wrong. The temp file stays; the retry
            # keeps only the blocks in it whose hashes match, so a hole is fetched again.
            log.warning("cannot write %r (trying again in %.0f s): %s", name, RETRY_PULL_AFTER, exc)
            self._give_up(name, now)
            return
        self._maybe_done(job)

    def _maybe_done(self, job: puller.Job) -> None:
        if job.done:
            puller.finish_job(job)
            del self.jobs[job.name]
            self.need.pop(job.name, None)
            self.done.append(job)

    def _drop_job(self, name: str) -> None:
        job = self.jobs.pop(name, None)
        if job is not None:
            puller.abort_job(job)
            self._leftover_temps.add(name)
            t = job.target
            for rid, (p, n, i) in list(self.requests.items()):
                if n == name:
                    del self.requests[rid]
                    self.cancelled[rid] = (p, min(t.block_size, t.size - i * t.block_size))

    def _apply_deletes(self, under: str | None = None) -> None:
        """Apply the pending deletions (only those inside directory `under`, if given)."""
        for _ in range(MAX_DEPTH_PASSES):
            deleted = self._apply_deletes_once(under)
            # A directory's deletion that found it still full is tried again once deletions inside
            # it were applied: a large tree's records come over several messages, the directory's
            # (lowest sequence) first, so its files may only have gone in this later pass.
            ready = self.kept_dirs & {a for n in deleted for a in parent_names(n)}
            if not ready:
                return
            self.kept_dirs -= ready
            self._reconsider(sorted(ready))
            if under is not None:
                return  # the caller goes on with its own name; the rest waits for the next pump

    def _apply_deletes_once(self, under: str | None) -> list[str]:
        """One pass of `_apply_deletes`; the names it deleted from the disk."""
        deleted: list[str] = []
        names = self.deletes if under is None else {n for n in self.deletes if n.startswith(under + "/")}
        self.deletes = set() if under is None else self.deletes - names
        # deepest first, so a directory's files go before the directory itself
        for name in sorted(names, key=lambda n: (-n.count("/"), n)):
            n = self.need.get(name)
            if n is None:
                continue
            if not n.target.deleted:
                # a newer live version took this name's place: it is pulled, not deleted
                if name not in self.jobs and name not in self.queue:
                    self.queue.append(name)
                continue
            del self.need[name]
            local = self.index.local(name)
            d = decide(local, n.target)
            if d.target is None or d.action is Action.NONE:
                continue
            if d.action is Action.DELETE and local is not None:
                if not puller.unchanged(self.fs.lstat(name), local):
                    continue  # changed here since our last scan: the scan makes it a conflict
                try:
                    if local.type is FileType.DIR:
                        # temp files of pulls that this deletion cancelled would keep it
                        self.fs.remove_temps(name, keep=self._temps_in_use(name))
                        if not self.fs.rmdir(name):
                            # holds files we keep (ignored or new), or files whose deletions are
                            # still on their way: keep it, and look again if some of them go
                            if len(self.kept_dirs) < MAX_FAILED:
                                self.kept_dirs.add(name)
                            continue
                    else:
                        self.fs.unlink(name)
                except OSError as exc:
                    log.warning("cannot delete %r: %s", name, exc)
                    continue
                self.dirty_dirs.add(name.rpartition("/")[0])
                deleted.append(name)
            self.records.append(d.target)
        return deleted

    def _temp_of(self, name: str) -> str:
        parent = name.rpartition("/")[0]
        return f"{parent}/{temp_name_for(name)}" if parent else temp_name_for(name)
