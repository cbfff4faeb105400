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
The engine is the coordinator of its parts, each with its own state: `root` (the folder root
guard: a missing root or marker stops the folder, `halted`), `scanning` (one-go and chunked
scans recorded in the index, names to look at again), `exchange` (hello, index messages in and
out, what we need), `pulls` (each needed name decided afresh and started, given up names retried
later), `scheduler` (pure: which blocks to ask of which peer, request ids, stalls), `committer`
(finished pulls to disk and into the index), `deletions` (remote deletions), `versions` (what a
change replaces is kept) and `rules` (what the folder type sends and applies). The engine owns
what they share (peers, needed names, the pull queue, running pulls) and hands each the
containers it reads or fills and the callbacks it needs; it keeps the inputs, the pump (what runs
when), the timers, stopping everything when the root goes, and status.
"""

from __future__ import annotations

import logging
from collections import deque
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
from agent.sync.fs import FolderFS
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
from agent.sync.model import FileInfo
from agent.sync.names import IGNORE_FILE, is_valid_name
from agent.sync.pulls import MIN_FREE_FRACTION, RETRY_PULL_AFTER, Pulls
from agent.sync.root import ROOT_RECHECK, FolderRoot
from agent.sync.scanner import Scanner
from agent.sync.scanning import MAX_EVENT_NAMES, RECHECK_FIRST, RECHECK_MAX, RETRY_SCAN_AFTER, Scanning, temp_of
from agent.sync.scheduler import REQUEST_ID_MASK, STALL_TIMEOUT, Outgoing, RequestScheduler
from agent.sync.server import serve_block
from agent.sync.versioning import DEFAULT_VERSIONING, Versioning
from agent.sync.versions import Kept, Versions

__all__ = [
    "INDEX_WINDOW", "MAX_EVENT_NAMES", "MIN_FREE_FRACTION", "RECHECK_FIRST", "RECHECK_MAX", "RETRY_PULL_AFTER",
    "RETRY_SCAN_AFTER", "ROOT_RECHECK", "STALL_TIMEOUT", "FolderStatus", "Need", "Outgoing", "Peer", "SyncEngine",
]  # fmt: skip

log = logging.getLogger(__name__)
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
        max_inflight_bytes: int = 32 * 1024 * 1024, max_jobs: int = 512, batch_files: int = 1000,
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
        self.fs = FolderFS(root, need_root=False)  # a missing root stops the folder (see `FolderRoot`)
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
            retry_later=lambda name, now: self.pulls.give_up(name, now),
        )  # fmt: skip
        self.root = FolderRoot(folder_id, self.fs, on_halt=self._halt)
        self.pulls = Pulls(
            folder_id, self.fs, index, self.scanner, device_id, self.root, peers=self.peers, need=self.need,
            jobs=self.jobs, scheduler=self.scheduler, committer=self.committer, versions=self.versions,
            rules=self.rules, deletions=self.deletions, scan=lambda now, names: self.scanning.scan(now, names),
            reconsider=lambda names: self.exchange.reconsider(names), retry_pull_after=retry_pull_after,
            min_free_fraction=min_free_fraction,
        )  # fmt: skip
        self.exchange = IndexExchange(
            folder_id, index, self.scanner, peers=self.peers, need=self.need, queue=self.queue,
            deletes=self.deletions.pending, drop_job=self.pulls.drop, max_remote_records=max_remote_records,
            hold=self.rules.differs if self.rules.send_only else None,
            max_remote_bytes=max_remote_bytes, index_window=index_window, max_files_per_message=max_files_per_message,
        )  # fmt: skip
        self.scanning = Scanning(
            folder_id, self.scanner, index, self.fs, self.root, self.rules, self.exchange, self.committer,
            need=self.need, jobs=self.jobs, drop_job=self.pulls.drop, rescan_interval=rescan_interval,
        )  # fmt: skip
        self.max_jobs = max_jobs
        self.batch_files = batch_files
        self.next_cleanup = 0.0  # when the next step of kept versions' clean-up is due
        self.flush_due = False  # a batch is complete and waits for the next `pump` (call it soon)

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
    halted = _Part[str | None]("root", "halted")  # why the folder is stopped: its root or marker is missing
    next_check = _Part[float]("root", "next_check")  # when a stopped folder looks for its root again
    state = _Part[str]("scanning", "state")  # idle, scanning
    next_scan = _Part[float]("scanning", "next_scan")  # when the next full scan is due (monotonic)
    recheck = _Part[dict[str, float]]("scanning", "recheck")  # name -> when to scan it again
    rescan_interval = _Part[float]("scanning", "rescan_interval")
    failed = _Part[dict[str, float]]("pulls", "failed")  # name -> when to try it again
    retry_pull_after = _Part[float]("pulls", "retry_pull_after")
    min_free_fraction = _Part[float]("pulls", "min_free_fraction")

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
            self.root.make()
        self.next_cleanup = now.mono + CLEANUP_AFTER_START
        if not self.root.ok(now):
            return
        temps = self.scanning.scan(now, None)
        if self.halted is not None:
            return
        for peer in self.index.peers():
            self.exchange.consider(list(self.index.differing(peer)), peer)
        wanted = {temp_of(name): name for name in self.need}
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
                self.scanning.later(now, [""] if len(names) > MAX_EVENT_NAMES else names)
            return self._pump(now)

    @property
    def scan_pending(self) -> bool:
        """A chunked scan has more to do: call `continue_scan` soon."""
        return self.scanning.pending

    def continue_scan(self, now: Now) -> list[Outgoing]:
        """Record and announce the next chunk of the scan in progress."""
        with self.fs.batch():
            if self.scanning.pending:
                self.scanning.step(now)
            return self._pump(now)

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
            if now.mono >= self.next_scan and not self.scanning.pending:
                self.scanning.later(now, [""])
            if now.mono >= self.next_cleanup:
                more = self.versions.cleanup_step(now.wall)  # a bounded step: sync never waits for it
                self.next_cleanup = now.mono + (CLEANUP_STEP_EVERY if more else CLEANUP_EVERY)
            unsettled = self.scanning.recheck_due(now)
            if unsettled:
                self.scanning.later(now, unsettled)
            for peer in self.scheduler.stalls_due(now):
                self._stalled(peer, now)
            due = self.pulls.retry_due(now)
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
        if self.scanning.pending:
            return self.exchange.announce()  # commits wait for the scan in progress (see `_pump`)
        self.flush_due = False
        done = self.committer.commit(self.index, now.wall)  # steps 1 to 5 of docs/SYNC.md, "Durability batching"
        for name in done.failed:
            self.pulls.give_up(name, now)
        if any(r.name == IGNORE_FILE for r in done.records):
            self.scanning.reload_ignore(now)  # a peer's `.tofuignore` is in place: its patterns apply now
        rescan = done.rescan
        if rescan:
            self.scanning.scan(now, rescan)
            # what the scan did not turn into a decision is asked for again (a fresh temp file)
            if self.halted is None:
                self.exchange.reconsider([n for n in rescan if n not in self.need])
        return self.exchange.announce()

    # -- the folder root -----------------------------------------------------------------------

    def _halt(self) -> None:
        """The root guard stopped the folder (its root or marker is missing): drop all work."""
        self.pulls.clear()  # temp files stay: the pulls resume when the folder is back
        # what the committer would record is found again by the full scan of `_resume`
        self.committer.reset()
        self.queue.clear()
        self.deletions.clear()
        self.need.clear()
        self.scanning.clear()
        self.flush_due = False

    def _resume(self, now: Now) -> list[Outgoing]:
        """Look for the root of a stopped folder; when it is back, scan it and sync again."""
        if not self.root.back(now):
            return []
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
        """The kept versions of file `name`, or of everything under directory `name`, newest first.

        :raises LookupError: `name` is not a name in a folder (absolute, `..`, a reserved name).
        """
        if name:
            _check_name(name)
        with self.fs.batch():
            return self.versions.listing(name)

    def restore(self, name: str, at: float | None, now: Now) -> tuple[Kept, list[Outgoing]]:
        """Put back the version of `name` kept at or before wall time `at` (None: the newest) as a
        local change, keeping what it replaces as a version too; (the version, messages to send).

        :raises LookupError: not a name in a folder, no such version, or `name` is being synced now.
        """
        _check_name(name)
        with self.fs.batch():
            kept = self.versions.pick(name, at)
            if kept is None:
                raise LookupError(f"no kept version of {name!r}" + (" at or before that time" if at else ""))
            if name in self.jobs or name in self.need or self.halted is not None or self.scanning.pending:
                raise LookupError(f"{name!r} is being synced right now; try again in a moment")
            self.versions.restore(kept, self.device_id, now.wall)
            self.versions.flush_notes()
            self.scanning.scan(now, [name])
            return kept, self.exchange.announce()

    # -- pulling -------------------------------------------------------------------------------

    def _pump(self, now: Now, force_flush: bool = False) -> list[Outgoing]:
        out: list[Outgoing] = []
        if self.halted is not None:
            return self.exchange.announce()
        if self.scanning.pending:
            # the scan compares the disk with records it read when it began: pulls wait for it
            # (requests of started pulls still go out, their answers only fill temp files)
            return self.scheduler.issue(now) + self.exchange.announce()
        while self.queue and len(self.jobs) < self.max_jobs:
            self.pulls.start(self.queue.popleft(), now)
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
            self.deletions.apply(now)
            if self.queue:
                while self.queue and len(self.jobs) < self.max_jobs:
                    self.pulls.start(self.queue.popleft(), now)
                out += self.scheduler.issue(now)
        if self.committer.records or self.committer.dirty_dirs:
            out += self.flush(now)
        if self.committer.leftover_temps:
            self.committer.sweep_temps(self.need)
        return out + self.exchange.announce()

    def _stalled(self, peer: str, now: Now) -> None:
        """Write off `peer`'s open requests: its files are asked of other peers, or retried later."""
        log.warning(
            "peer %s left our block requests unanswered for %.0f s: asking others", peer[:7],
            self.scheduler.stall_timeout,
        )  # fmt: skip
        for name in self.scheduler.stall(peer, self.peers[peer]):
            self.pulls.give_up(name, now)  # frees the slot for files other peers can send

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
                self.pulls.drop(name)
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
            self.pulls.give_up(name, now)
            return
        self.pulls.maybe_done(job)


def _check_name(name: str) -> None:
    """A person's path (CLI, web page) must name something inside the folder, as a peer's must."""
    if not is_valid_name(name):
        raise LookupError(f"{name[:200]!r} is not a path inside the folder")
