"""Starting the pulls of one folder: each needed name decided afresh against the disk, then applied.

Theory of operation. The engine takes names off its pull `queue` and hands each to `start`. The
planner decides it again against our current record: nothing to do, a deletion (left to the
deletions step), or a change. A name our disk changed since the last scan is rescanned first, and
decided afresh. A losing local version becomes a conflict copy (`keep_as_conflict`); a directory a
file replaces is emptied (`_clear_dir`) or, if it holds files we keep, kept as a conflict copy.
Directories, records and metadata go to the committer at once; a file becomes a pull job (a temp
file whose blocks the engine's scheduler copies or requests) if the disk keeps `min_free_fraction`
free after it. A name we cannot pull now (a write failed, no room, only stalled peers have it) is
given up (`give_up`): its temp file stays for resuming, and it is decided again after
`retry_pull_after` seconds (`failed`, on the engine's timer).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

from agent.sync import puller
from agent.sync.clock import Now
from agent.sync.committer import Committer
from agent.sync.deletions import Deletions
from agent.sync.exchange import Need, Peer
from agent.sync.folder_type import TypeRules
from agent.sync.fs import FolderFS
from agent.sync.index import FolderIndex
from agent.sync.model import FileInfo, FileType
from agent.sync.planner import MAX_CONFLICT_ATTEMPT, Action, conflict_name, decide
from agent.sync.root import FolderRoot
from agent.sync.scanner import Scanner
from agent.sync.scheduler import RequestScheduler
from agent.sync.vectors import Vector
from agent.sync.versions import Versions

log = logging.getLogger(__name__)
RETRY_PULL_AFTER = 60.0  # a name we could not write (full disk, read-only directory) is tried again this soon
MIN_FREE_FRACTION = 0.01  # as Syncthing's minDiskFree: pulls never fill the disk past 99 %
MAX_FAILED = 10_000  # names remembered for a retry; past that the periodic full rescan is the retry


class Pulls:
    """Starting, finishing and giving up the pulls of one folder; the names to try again later."""

    def __init__(
        self, folder_id: str, fs: FolderFS, index: FolderIndex, scanner: Scanner, device_id: str,
        root: FolderRoot, *, peers: Mapping[str, Peer], need: dict[str, Need], jobs: dict[str, puller.Job],
        scheduler: RequestScheduler[puller.Job], committer: Committer, versions: Versions, rules: TypeRules,
        deletions: Deletions, scan: Callable[[Now, list[str]], list[str]], reconsider: Callable[[list[str]], None],
        retry_pull_after: float = RETRY_PULL_AFTER, min_free_fraction: float = MIN_FREE_FRACTION,
    ) -> None:  # fmt: skip
        self.folder_id, self.fs, self.index, self.device_id = folder_id, fs, index, device_id
        self.scanner = scanner  # for its executor (hashing blocks already on disk)
        self.root = root  # a stopped folder starts nothing
        self.peers, self.need, self.jobs = peers, need, jobs  # the engine's
        self.scheduler, self.committer, self.versions = scheduler, committer, versions
        self.rules, self.deletions = rules, deletions
        self._scan = scan  # records a name our disk changed before it is decided again
        self._reconsider = reconsider  # decides names afresh against the peers' records
        self.retry_pull_after = retry_pull_after
        self.min_free_fraction = min_free_fraction
        self.failed: dict[str, float] = {}  # name -> when to try it again (a write or rename failed)
        self._space, self._space_at = 0, -1e18  # free bytes left for new pulls, and when they were read
        self._space_warned = False  # the lack of space was logged (until a pull fits again)

    def start(self, name: str, now: Now) -> None:
        """Decide `name` afresh and apply it: a directory, a record or metadata at once, a file as
        a pull job (see the module's header)."""
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
            if self.root.halted is not None:
                return
            if name not in self.need:
                if puller.unchanged(self.fs.lstat(name), self.index.local(name)):
                    self._reconsider([name])
                else:
                    self.give_up(name, now)  # something we do not sync (a symlink, a FIFO) is in the way
            return
        try:
            if d.conflict_name is not None and local is not None:
                cname = self.keep_as_conflict(name, local)
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
                    self.give_up(name, now)  # only stalled peers have it: keep the slot for others
                    return
                if not self._disk_has_room(d.target.size, now):
                    self.give_up(name, now)
                    return
                job = puller.Job(d.target, local, set(n.sources))
                puller.open_job(self.fs, self.index, job, self.scanner.executor, _InUse(self._temps_in_use))
                self.jobs[name] = job
                self.maybe_done(job)
                return
            del self.need[name]
        except OSError as exc:
            log.warning("cannot sync %r (trying again in %.0f s): %s", name, self.retry_pull_after, exc)
            self.give_up(name, now)

    def maybe_done(self, job: puller.Job) -> None:
        """If `job` has all its blocks, close it and hand its temp file to the committer."""
        if job.done:
            puller.finish_job(job)
            del self.jobs[job.name]
            self.need.pop(job.name, None)
            self.committer.done.append(job)

    def drop(self, name: str) -> None:
        """Stop the pull of `name`, if one runs: its temp file stays (for resuming, or the sweep)."""
        job = self.jobs.pop(name, None)
        if job is not None:
            puller.abort_job(job)
            self.committer.leftover_temps.add(name)
            self.scheduler.cancel(job)

    def give_up(self, name: str, now: Now) -> None:
        """Stop working on `name` (its temp file stays for resuming) and try it again later."""
        self.drop(name)
        self.need.pop(name, None)
        if len(self.failed) < MAX_FAILED:
            self.failed[name] = now.mono + self.retry_pull_after

    def retry_due(self, now: Now) -> list[str]:
        """The names due for another try (forgotten here: the caller decides them afresh)."""
        due = [name for name, when in self.failed.items() if when <= now.mono]
        for name in due:
            del self.failed[name]
        return due

    def clear(self) -> None:
        """Stop every pull (temp files stay: they resume when the folder is back) and forget the retries."""
        for name in list(self.jobs):
            self.drop(name)
        self.failed.clear()

    def keep_as_conflict(self, name: str, local: FileInfo) -> str:
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

    def _clear_dir(self, local: FileInfo, now: Now) -> bool:
        """Remove directory `local.name` so a file can take its name: apply the pending deletions
        under it, drop our stale temp files in it, rmdir. If it still holds files we keep (new or
        ignored ones), rename it to a conflict copy instead, rescan both names and return False:
        the rescan decides the name afresh."""
        name = local.name
        self.deletions.apply(now, under=name)
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
                self.give_up(name, now)
                return False
        cname = self.keep_as_conflict(name, local)
        log.warning("a file replaces directory %r, which holds files we keep: kept it as %r", name, cname)
        self.committer.dirty_dirs.update({name.rpartition("/")[0], cname.rpartition("/")[0]})
        self.need.pop(name, None)
        self._scan(now, [name, cname])
        if name not in self.need and self.root.halted is None:
            self._reconsider([name])
        return False

    def _temps_in_use(self) -> set[tuple[int, int]]:
        """(st_dev, st_ino) of every temp file a pull holds open or has finished writing."""
        busy = {(dev, ino) for dev, ino, _ in (j.temp_id for j in self.committer.done) if ino}
        for job in self.jobs.values():
            if job.fd >= 0:
                st = os.fstat(job.fd)
                busy.add((st.st_dev, st.st_ino))
        return busy

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


class _InUse:
    """The temp files in use, computed only if asked: `open_temp` asks only when a temp file of
    that name exists already, which is rare; computing it for every pull (an fstat of every
    running pull) was a third of a receiver's CPU for 10,000 small files."""

    def __init__(self, compute: Callable[[], set[tuple[int, int]]]) -> None:
        self._compute = compute
        self._found: set[tuple[int, int]] | None = None

    def __contains__(self, item: object) -> bool:
        if self._found is None:
            self._found = self._compute()
        return item in self._found
