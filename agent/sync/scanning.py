"""Scans of one folder: what they find is recorded in the index and decided against the peers'.

Theory of operation. A scan at start, and one of a few names while pulling (`scan`), runs in one
go. A scan from file-system events or the periodic timer (`later`) runs in chunks: each chunk is
recorded and announced at once, and the engine's shell comes back for the next (`step`, while
`pending`), serving peers in between; names that change meanwhile are scanned when it ends. Until
the scan's last chunk the engine starts and commits no pull, so nothing but the scan changes our
records while it compares the disk with them. Recording a scan (`record`) first checks the folder
root (what looks deleted may only be unmounted), adopts a peer's version for a file that is
exactly that version (a pull put in place but not recorded before a crash), lets the folder type
hold back what it must, and asks the index exchange to decide the changed names afresh. A file
that was changing while hashed is looked at again soon (`recheck`), backing off while it keeps
changing; a changed `.tofuignore` drops the pulls of names it now ignores and brings a full scan.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping

from agent.sync import puller
from agent.sync.clock import Now
from agent.sync.committer import Committer
from agent.sync.exchange import IndexExchange, Need
from agent.sync.folder_type import TypeRules
from agent.sync.fs import FolderFS, temp_name_for
from agent.sync.index import FolderIndex
from agent.sync.model import FileInfo, FileType
from agent.sync.root import FolderRoot
from agent.sync.scanner import Scanner, ScanResult, load_ignore
from agent.sync.vectors import Ordering

log = logging.getLogger(__name__)
MAX_EVENT_NAMES = 256  # more changed names than this at once (after our own writes): one full scan
RETRY_SCAN_AFTER = 60.0  # a scan that failed on a disk or database error is retried (in full) this soon
MAX_RECHECKS = 10_000  # changing names remembered for a second look; past that a full scan looks at all
# A file a scan skipped because it was being written is looked at again this soon, event or not
# (no watcher runs yet while the agent starts), backing off to RECHECK_MAX while it keeps changing.
RECHECK_FIRST = 1.0
RECHECK_MAX = 16.0


def temp_of(name: str) -> str:
    """The path of the temp file a pull of `name` writes."""
    parent = name.rpartition("/")[0]
    return f"{parent}/{temp_name_for(name)}" if parent else temp_name_for(name)


class Scanning:
    """The scan in progress of one folder, the names to scan again, and recording what scans find."""

    def __init__(
        self, folder_id: str, scanner: Scanner, index: FolderIndex, fs: FolderFS, root: FolderRoot,
        rules: TypeRules, exchange: IndexExchange, committer: Committer, *,
        need: dict[str, Need], jobs: Mapping[str, puller.Job], drop_job: Callable[[str], None],
        rescan_interval: float,
    ) -> None:  # fmt: skip
        self.folder_id = folder_id
        self.scanner, self.index, self.fs, self.root = scanner, index, fs, root
        self.rules = rules  # holds back what the folder type does not send or apply
        self.exchange = exchange  # decides changed names against the peers' records
        self.committer = committer  # its finished pulls' temp files are not stray
        self.need, self.jobs = need, jobs  # the engine's
        self._drop_job = drop_job  # the engine stops a pull of a name `.tofuignore` now ignores
        self.rescan_interval = rescan_interval
        self.state = "idle"  # or "scanning"
        self.next_scan = 0.0  # when the next full scan is due (monotonic, as every timer here)
        self.recheck: dict[str, float] = {}  # name -> when to scan it again (it was changing when scanned)
        self._tries: dict[str, int] = {}  # name -> scans that found it changing in a row
        self._chunks: Iterator[ScanResult] | None = None  # the scan in progress
        self._full = False  # it is a full scan (the timer's next run is set when it ends)
        self._next: set[str] = set()  # names changed meanwhile: scanned when it ends ('' = all)
        self._ignore_lines = scanner.ignore.lines  # the `.tofuignore` the last recorded scan used

    @property
    def pending(self) -> bool:
        """A chunked scan has more to do: call `step` soon."""
        return self._chunks is not None

    def scan(self, now: Now, names: list[str] | None) -> list[str]:
        """Scan `names` (None: everything) in one go: at start, and for a few names while pulling;
        the temp files it found."""
        self.state = "scanning"
        result = self.scanner.scan(int(now.wall), names)
        if not self.record(result, now):
            return []
        if names is None:
            self.next_scan = now.mono + self.rescan_interval
        self.state = "idle"
        return result.temp_files

    def later(self, now: Now, names: list[str]) -> None:
        """Start a chunked scan of `names` ('' = everything) and do its first chunk; if one is
        running, queue the names for after it and do its next chunk (events never starve it)."""
        if not self.root.ok(now):
            return
        if self._chunks is not None:
            self._next.update(names)
            if len(self._next) > MAX_EVENT_NAMES:
                self._next = {""}
            self.step(now)
            return
        self._full = "" in names
        self.state = "scanning"
        self._chunks = self.scanner.scan_chunks(int(now.wall), None if self._full else names)
        self.step(now)

    def step(self, now: Now) -> None:
        """Record the next chunk of the scan in progress (there must be one)."""
        assert self._chunks is not None
        try:
            chunk = next(self._chunks)
            if not self.record(chunk, now):
                return  # the folder stopped (its root went away): the scan is dropped
            self._drop_stray_temps(chunk.temp_files)
        except BaseException:
            # a disk or database failure: drop this scan (pulls must not wait for it forever)
            # and let the timer run a full one soon, which also covers the names this one had
            self._chunks = None
            self.state = "idle"
            self.next_scan = min(self.next_scan, now.mono + RETRY_SCAN_AFTER)
            raise
        if not chunk.final:
            return
        self._chunks = None
        self.state = "idle"
        if self._full:
            self.next_scan = now.mono + self.rescan_interval
        if self._next:
            names, self._next = sorted(self._next), set()
            self.later(now, names)

    def recheck_due(self, now: Now) -> list[str]:
        """The names due for another look (forgotten here: the caller scans them)."""
        unsettled = [name for name, when in self.recheck.items() if when <= now.mono]
        for name in unsettled:
            del self.recheck[name]
        return unsettled

    def clear(self) -> None:
        """Forget the scan in progress and the names to look at again (the folder stopped)."""
        self.recheck.clear()
        self._tries.clear()
        self._chunks = None
        self._next.clear()
        self.state = "idle"

    def record(self, result: ScanResult, now: Now) -> bool:
        """Record what a scan found; False (nothing recorded) if the root went away meanwhile:
        then what looks deleted is only not mounted."""
        if not self.root.ok(now):
            return False
        for name, ino, mtime in result.refreshed:
            self.index.set_inode(name, ino, mtime)
            self._tries.pop(name, None)
        result.changed = self.rules.hold_back(self._adopt_remote_versions(result.changed))
        self.index.update_local(result.changed)
        for f in result.changed:
            self._tries.pop(f.name, None)
        for name in result.unsettled:
            self._look_again(name, now)
        changed = [f.name for f in result.changed]
        if changed:
            self.exchange.reconsider(changed)
        if self.scanner.ignore.lines != self._ignore_lines:
            self._ignore_changed(now)
        return True

    def reload_ignore(self, now: Now) -> None:
        """A peer's `.tofuignore` was put in place: its patterns apply now (our own write's event
        is dropped, so no scan would load them before the timer's)."""
        self.scanner.ignore = load_ignore(self.fs)
        if self.scanner.ignore.lines != self._ignore_lines:
            self._ignore_changed(now)

    def _adopt_remote_versions(self, changed: list[FileInfo]) -> list[FileInfo]:
        """A file found on disk that is exactly a peer's current version of that name (same
        content, size, mtime and exec bit) is recorded as that version, not as a new one of ours;
        so is a directory that appeared here and that a peer has as a directory, unless our own
        record of it (a deletion) is newer than the peer's.

        That is what a pull leaves when the agent is killed after putting the file (or making the
        directory) in place and before recording it: recorded as our own new version, it would be
        concurrent with the peer's later changes and undo them (a deletion that races an edit
        loses), bringing back files and directories the peer deleted or renamed.
        """
        files = {f.name: f for f in changed if not f.deleted and f.type in (FileType.FILE, FileType.DIR)}
        if not files:
            return changed
        ours = self.index.local_many(n for n, f in files.items() if f.type is FileType.DIR)
        adopted: dict[str, FileInfo] = {}
        for peer in self.index.peers():
            for name, r in self.index.remote_many(peer, list(files)).items():
                f = files[name]
                if r.deleted or name in adopted:
                    continue
                if f.type is FileType.DIR:
                    mine = ours.get(name)
                    same = r.type is FileType.DIR and (
                        mine is None or (mine.deleted and r.version.compare(mine.version) is not Ordering.LESSER)
                    )
                else:
                    same = (r.type, r.size, r.mtime_ns, r.executable, r.block_size, r.hashes) == (
                        f.type, f.size, f.mtime_ns, f.executable, f.block_size, f.hashes
                    )  # fmt: skip
                if same:
                    adopted[name] = f.replace(version=r.version, modified_by=r.modified_by)
        return [adopted.get(f.name, f) for f in changed]

    def _look_again(self, name: str, now: Now) -> None:
        """Scan `name` again soon: it changed while we hashed it (backing off while it keeps changing)."""
        tries = self._tries.get(name, 0) + 1
        if tries == 1 and len(self._tries) >= MAX_RECHECKS:
            self.next_scan = min(self.next_scan, now.mono + RECHECK_MAX)  # too many: one full scan looks at all
            return
        self._tries[name] = tries
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

    def _drop_stray_temps(self, temps: list[str]) -> None:
        """Delete temp files a scan found that no pull wants (a directory renamed during a pull
        takes the pull's temp file along): not left until the next restart. A pull that still
        writes into one keeps its open file and finds it gone when it commits."""
        if not temps:
            return
        wanted = {temp_of(n) for n in (*self.need, *self.jobs, *(j.name for j in self.committer.done))}
        for t in temps:
            if t not in wanted:
                try:
                    self.fs.unlink(t)
                except OSError as exc:
                    log.info("cannot delete stray temp file %r: %s", t, exc)
