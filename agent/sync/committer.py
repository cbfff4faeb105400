"""Finished pulls to disk: durable data, checked renames, synced directories, one index transaction.

Theory of operation (the crash-safety argument is in docs/SYNC.md, "Durability batching"). The
engine hands over complete temp files (`done`) and records to write (`records`, with the
directories they touched in `dirty_dirs`). `commit(index, wall)`:
1. makes the data of every temp file durable (`fsync` a few, else one `syncfs`);
2. walks each directory once and checks that each temp file is still the inode we wrote and each
   target still what our index says (else: no rename, the name is rescanned); a file about to be
   replaced gets its kept version (a hard link, made durable first: see `agent.sync.versions`);
3. renames each temp file over its target;
4. fsyncs every touched directory once;
5. records everything in the index in one transaction.
It returns what the engine must do next: the names to rescan and those to retry later. The
committer also remembers the files it put in place (`written`: the file-system event our own
rename causes is dropped) and the temp files that may be left over (`leftover_temps`, swept once
their names are no longer pulled).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agent.sync import puller
from agent.sync.fs import FolderFS, temp_name_for
from agent.sync.index import FolderIndex
from agent.sync.model import FileInfo, FileType
from agent.sync.versions import Versions

log = logging.getLogger(__name__)
MAX_WRITTEN = 65536  # names remembered as our own writes until their file-system event comes back


@dataclass(slots=True)
class Committed:
    """What one `commit` did, and what it leaves to the engine."""

    records: list[FileInfo] = field(default_factory=list)  # recorded in the index
    rescan: list[str] = field(default_factory=list)  # not committed, or changed under us: scan them
    failed: list[str] = field(default_factory=list)  # could not be put in place: try again later


class Committer:
    """Complete temp files and pending records of one folder, until they are durable and recorded."""

    def __init__(
        self, fs: FolderFS, jobs: Mapping[str, puller.Job], versions: Versions, *, retry_pull_after: float
    ) -> None:
        self.fs = fs
        self.versions = versions
        self.jobs = jobs  # the engine's running pulls, read only (their temp files are in use)
        self.retry_pull_after = retry_pull_after  # (for the log line of a failed rename)
        self.done: list[puller.Job] = []  # complete temp files waiting for `commit`
        self.records: list[FileInfo] = []  # index records waiting for `commit`
        self.dirty_dirs: set[str] = set()  # directories changed since the last `commit`
        # Files we put in place ourselves: name -> (inode, mtime_ns). The file-system event our
        # own rename causes is dropped if the name still looks like that. (Not directories: the
        # event of a new directory also stands for files made in it before it was watched.)
        self.written: dict[str, tuple[int, int, int]] = {}  # name -> (inode, mtime, ctime) we left it with
        # names whose temp file may be left over (a pull dropped, not committed, or kept at start
        # to resume): deleted once the name is no longer needed, not at the next restart
        self.leftover_temps: set[str] = set()

    def commit(self, index: FolderIndex, wall: float) -> Committed:
        """Steps 1 to 5 (above) for everything waiting; `wall` stamps the versions kept."""
        jobs, self.done = self.done, []
        result = Committed()
        if jobs:
            # 1. the data of every temp file is durable before any rename (one syncfs for many)
            lost = self.fs.sync_temps([j.name for j in jobs])
            result.rescan.extend(sorted(lost))
            by_dir: dict[str, list[puller.Job]] = {}
            for job in jobs:
                if job.name not in lost:
                    by_dir.setdefault(job.name.rpartition("/")[0], []).append(job)
            for parent, group in by_dir.items():
                if self._commit_dir(parent, group, result, wall):
                    self.dirty_dirs.add(parent)
        # 4. every directory that changed is durable before the index says so
        self.versions.make_durable()
        dirty, self.dirty_dirs = sorted(self.dirty_dirs), set()
        for d in dirty:
            try:
                self.fs.fsync_dir(d)
            except OSError as exc:
                # replaced by a symlink or a file since we wrote there: what it holds now is the
                # scan's business (and the flush must not fail on every call from now on)
                log.warning("cannot sync directory %r to disk: %s", d, exc)
                result.rescan.append(d)
        result.records, self.records = self.records, []
        self.versions.flush_notes()
        index.update_local(result.records)
        return result

    def _commit_dir(self, parent: str, jobs: list[puller.Job], result: Committed, wall: float) -> bool:
        """Steps 2 and 3 for the finished files of one directory, walked once; True if anything
        was renamed. A name whose temp file is not the one we wrote (its directory was replaced or
        became a symlink while we fetched), or whose target changed locally, is not committed: it
        is scanned and decided again (a local edit becomes a conflict)."""
        try:
            dfd = self.fs.open_dir(parent)
        except OSError:
            result.rescan.extend(j.name for j in jobs)
            return False
        moved = False
        try:
            ready = [job for job in jobs if self._ready(dfd, job, result, wall)]
            if ready:
                self.versions.make_durable()  # a version is on disk before the rename that needs it
            for job in ready:
                try:
                    st = self.fs.commit_temp_at(dfd, job.name)
                except OSError as exc:
                    self._failed(job.name, exc, result)
                    continue
                moved = True
                self.wrote(job.name, st)
                self.records.append(job.target.replace(inode=st.st_ino, mtime_ns=st.st_mtime_ns))
        finally:
            os.close(dfd)
        return moved

    def _ready(self, dfd: int, job: puller.Job, result: Committed, wall: float) -> bool:
        """Step 2 for one job: True if its temp file may be renamed over its target now."""
        try:
            tmp = self.fs.lstat_at(dfd, temp_name_for(job.name))
            if tmp is None or (tmp.st_dev, tmp.st_ino, tmp.st_ctime_ns) != job.temp_id:
                result.rescan.append(job.name)
                return False
            if not puller.unchanged(self.fs.lstat_at(dfd, job.name.rpartition("/")[2]), job.expected):
                result.rescan.append(job.name)
                self.leftover_temps.add(job.name)  # the rescan decides whether it is still wanted
                return False
            old = job.expected
            if old is not None and not old.deleted and old.type is FileType.FILE:
                self.versions.keep(job.name, job.target.modified_by, wall, replaced=True)
        except OSError as exc:
            self._failed(job.name, exc, result)
            return False
        return True

    def _failed(self, name: str, exc: OSError, result: Committed) -> None:
        # e.g. a directory holds the name now: retried later, not on every step
        log.warning("cannot put %r in place (trying again in %.0f s): %s", name, self.retry_pull_after, exc)
        result.failed.append(name)

    def set_metadata(self, target: FileInfo) -> None:
        """Give our file `target`'s exec bit and mtime, and record it (a metadata-only change)."""
        fd = self.fs.open_read(target.name)
        try:
            os.fchmod(fd, 0o755 if target.executable else 0o644)
            os.utime(fd, ns=(target.mtime_ns, target.mtime_ns))
            self.records.append(target.replace(inode=os.fstat(fd).st_ino))
        finally:
            os.close(fd)

    def own_write(self, name: str) -> bool:
        """`name` is still exactly the file we put there (its event is our own rename's)."""
        mark = self.written.pop(name, None)
        if mark is None:
            return False
        st = self.fs.lstat(name)
        # ctime too: a chmod right after our rename keeps inode and mtime, and must not pass for ours
        return st is not None and stat.S_ISREG(st.st_mode) and (st.st_ino, st.st_mtime_ns, st.st_ctime_ns) == mark

    def wrote(self, name: str, st: os.stat_result) -> None:
        if len(self.written) >= MAX_WRITTEN:
            self.written.clear()  # events are not coming back (no watcher): forget, costs rescans only
        self.written[name] = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)

    def temps_in_use(self, dirname: str) -> set[str]:
        """Base names of the temp files in `dirname` that a running or finished pull still needs."""
        names = [*self.jobs, *(j.name for j in self.done)]
        return {temp_name_for(n) for n in names if n.rpartition("/")[0] == dirname}

    def sweep_temps(self, busy: Iterable[str]) -> None:
        """Delete the temp files of names we no longer pull (a local edit or a newer record won);
        `busy`: the names still needed."""
        busy = {*busy, *self.jobs, *(j.name for j in self.done)}
        for name in [n for n in self.leftover_temps if n not in busy]:
            self.leftover_temps.discard(name)
            try:
                self.fs.unlink(name, temp=True)
            except OSError as exc:  # a directory in the way, a read-only disk: the next start tries again
                log.info("cannot delete the temp file of %r: %s", name, exc)

    def reset(self) -> None:
        """Drop everything waiting (the folder stopped): temp files stay for resuming."""
        for job in self.done:
            puller.abort_job(job)
        self.done.clear()
        self.records.clear()
        self.dirty_dirs.clear()
        self.written.clear()
        self.leftover_temps.clear()  # the start after the root is back sorts them out
