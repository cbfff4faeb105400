"""Kept versions of one folder on disk: keep, list, restore, clean up (disk; policy in `versioning`).

Theory of operation. A file a peer's change DELETES is renamed into `.tofu-versions` (one atomic
rename: after a crash it is at its name or at its version, never neither). A file a peer's change
REPLACES gets a hard link there before the new content is renamed over its name, so the old inode
lives on as the version without a copy; a crash between the two leaves both names, never neither.
Links are made durable (`make_durable`) before the renames that follow them. Each version is
noted in the folder index (who replaced it, when, how large) in the committer's flush; the
directory stays the truth, and a version without a note lists as replaced by "unknown".
Clean-up walks `.tofu-versions` one directory per step, a bounded amount of work from the
engine's timer. When a pull lacks disk space, the oldest noted versions are removed first.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import deque
from dataclasses import dataclass

from agent.sync.fs import FolderFS, copy_fd
from agent.sync.index import FolderIndex
from agent.sync.names import parent_names, split_name
from agent.sync.versioning import VERSIONS_DIR, Kind, Versioning, expired, parse_version_path, version_path

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 100  # versions of one name kept within one second
CLEANUP_DIRS_PER_STEP = 16  # directories of `.tofu-versions` one clean-up step looks at
EVICT_BATCH = 256
MAX_RECENT = 100_000  # names whose versions `simple` tracks as they are kept


@dataclass(frozen=True, slots=True)
class Kept:
    """One kept version, as `tofu-agent versions` lists it."""

    path: str  # inside the folder, under `.tofu-versions`
    name: str  # the file it was
    kept_at: float  # wall time it was replaced or deleted
    size: int
    by: str  # the device whose change replaced it ('' unknown)


class Versions:
    """The `.tofu-versions` directory of one folder."""

    def __init__(self, fs: FolderFS, index: FolderIndex, policy: Versioning) -> None:
        self.fs, self.index, self.policy = fs, index, policy
        self.notes: list[tuple[str, str, str, float, int]] = []  # waiting for the committer's flush
        self._unsynced: set[str] = set()  # directories that got links not yet durable
        self._walk: deque[str] = deque()  # directories the current clean-up pass still visits
        # `simple`: the versions of each name kept since the start, oldest first, so that the
        # newest `keep` hold at once (older ones, from before a restart, go with the clean-up pass)
        self._recent: dict[str, deque[str]] = {}
        self.evicted = 0  # versions removed to keep the disk's free reserve (shown by `status`)

    def keep(self, name: str, by: str, wall: float, *, replaced: bool) -> str | None:
        """Keep file `name` as a version before a peer's change replaces (`replaced`: a hard
        link, `name` stays) or deletes it (moved away); its version path, or None when the folder
        keeps no versions.

        :raises OSError: it could not be kept; the caller must not go on to delete or replace it.
        """
        if not self.policy.enabled:
            return None
        st = self.fs.lstat(name)
        size = st.st_size if st is not None and stat.S_ISREG(st.st_mode) else 0
        for attempt in range(MAX_ATTEMPTS):
            path = version_path(name, wall, attempt)
            try:
                if replaced:
                    self.fs.link(name, path)
                else:
                    self.fs.rename(name, path)
            except FileExistsError:
                continue
            self._unsynced.add(split_name(path)[0])
            self.notes.append((path, name, by, wall, size))
            if self.policy.kind is Kind.SIMPLE:
                self._keep_newest(name, path)
            return path
        raise FileExistsError(f"every version name of {name!r} for this second is taken")

    def _keep_newest(self, name: str, path: str) -> None:
        """`simple`: drop this run's versions of `name` beyond the newest `keep`, at once."""
        recent = self._recent.setdefault(name, deque())
        recent.append(path)
        gone = [recent.popleft() for _ in range(max(0, len(recent) - max(self.policy.keep, 1)))]
        if not recent:
            del self._recent[name]
        if len(self._recent) > MAX_RECENT:
            self._recent.clear()  # a bound on memory: the clean-up pass still applies the rule
        if gone:
            for p in gone:
                try:
                    self.fs.unlink(p)
                except OSError as exc:
                    log.info("cannot remove kept version %r: %s", p, exc)
            self.notes = [n for n in self.notes if n[0] not in gone]
            self.index.forget_versions(gone)

    def make_durable(self) -> None:
        """fsync the directories new links went into (and the directories above them): a
        replaced file's rename must never be on disk before its version is."""
        dirs = {d for u in self._unsynced for d in (*parent_names(u), u)}
        self._unsynced.clear()
        for d in sorted(dirs, key=lambda d: -d.count("/")):
            self.fs.fsync_dir(d)
        if dirs:
            self.fs.fsync_dir("")

    def flush_notes(self) -> None:
        """Record the versions kept since the last flush in the index."""
        if self.notes:
            notes, self.notes = self.notes, []
            self.index.note_versions(notes)

    # -- reading ---------------------------------------------------------------------------------

    def listing(self, name: str = "") -> list[Kept]:
        """The kept versions of file `name`, or of everything in directory `name` ('' = all), newest first."""
        found: list[tuple[str, str, float, int]] = []
        if name and self._is_file_name(name):
            parent, _ = split_name(name)
            found = [f for f in self._list_dir("/".join(p for p in (VERSIONS_DIR, parent) if p)) if f[1] == name]
        if not found:
            start = "/".join(p for p in (VERSIONS_DIR, name) if p)
            todo = [start]
            while todo:
                d = todo.pop()
                found.extend(self._list_dir(d, todo))
        notes = self.index.version_notes(p for p, _, _, _ in found)
        kept = [Kept(p, n, notes.get(p, ("", when, 0))[1], size, notes.get(p, ("",))[0]) for p, n, when, size in found]
        return sorted(kept, key=lambda k: (-k.kept_at, k.path))

    def _is_file_name(self, name: str) -> bool:
        st = self.fs.lstat(name)
        return st is None or not stat.S_ISDIR(st.st_mode)

    def _list_dir(self, d: str, subdirs: list[str] | None = None) -> list[tuple[str, str, float, int]]:
        """(path, name, wall time, size) of the versions directly in directory `d`."""
        try:
            fd = self.fs.open_dir(d)
        except OSError:
            return []
        out: list[tuple[str, str, float, int]] = []
        try:
            for entry in os.listdir(fd):
                try:
                    st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                path = f"{d}/{entry}"
                if stat.S_ISDIR(st.st_mode):
                    if subdirs is not None:
                        subdirs.append(path)
                    continue
                parsed = parse_version_path(path)
                if parsed is not None and stat.S_ISREG(st.st_mode):
                    out.append((path, parsed[0], parsed[1], st.st_size))
        finally:
            os.close(fd)
        return out

    def pick(self, name: str, at: float | None) -> Kept | None:
        """The version of `name` to restore: the newest kept at or before wall time `at` (None: the newest)."""
        versions = [k for k in self.listing(name) if k.name == name and (at is None or k.kept_at <= at)]
        return versions[0] if versions else None

    def restore(self, kept: Kept, device_id: str, wall: float) -> None:
        """Copy version `kept` back to its name (temp file, fsync, rename); a file there now is
        kept as a version first (replaced by us, `device_id`). The version itself stays.

        :raises OSError: it could not be put back (nothing at the name changed then).
        """
        src = self.fs.open_read(kept.path)
        try:
            fd, _ = self.fs.open_temp(kept.name)
            try:
                os.ftruncate(fd, 0)
                copy_fd(src, fd)
                os.fchmod(fd, os.fstat(src).st_mode & 0o777)
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            os.close(src)
        st = self.fs.lstat(kept.name)
        if st is not None and stat.S_ISREG(st.st_mode):
            self.keep(kept.name, device_id, wall, replaced=True)
            self.make_durable()
        self.fs.commit_temp(kept.name)
        self.fs.fsync_dir(split_name(kept.name)[0])

    # -- removing --------------------------------------------------------------------------------

    def cleanup_step(self, now_wall: float) -> bool:
        """Apply the policy to a few directories of `.tofu-versions`; True if the pass goes on."""
        if not self._walk:
            self._walk.append(VERSIONS_DIR)
        for _ in range(CLEANUP_DIRS_PER_STEP):
            if not self._walk:
                return False
            d = self._walk.popleft()
            subdirs: list[str] = []
            found = self._list_dir(d, subdirs)
            self._walk.extend(subdirs)
            by_name: dict[str, list[tuple[str, float]]] = {}
            for path, name, when, _ in found:
                by_name.setdefault(name, []).append((path, when))
            gone = [
                group[i][0] for group in by_name.values() for i in expired([w for _, w in group], self.policy, now_wall)
            ]
            self._remove(gone)
            if d != VERSIONS_DIR and len(gone) == len(found) and not subdirs:
                self._rmdir(d)  # emptied (its parent goes on the next pass, once it is empty)
        return bool(self._walk)

    def evict(self, need: int) -> int:
        """Remove the oldest noted versions until `need` bytes are freed (or none is left); bytes freed."""
        freed = 0
        while freed < need:
            oldest = self.index.oldest_versions(EVICT_BATCH)
            if not oldest:
                break
            gone: list[str] = []
            for path, size in oldest:
                gone.append(path)
                freed += size
                if freed >= need:
                    break
            self._remove(gone)
            self.evicted += len(gone)
        if freed:
            log.warning("removed the oldest kept versions (%d bytes) to keep the disk's free reserve", freed)
        return freed

    def _remove(self, paths: list[str]) -> None:
        if not paths:
            return
        for p in paths:
            try:
                self.fs.unlink(p)
            except OSError as exc:
                log.info("cannot remove kept version %r: %s", p, exc)
        self.index.forget_versions(paths)

    def _rmdir(self, d: str) -> None:
        try:
            self.fs.rmdir(d)
        except OSError:
            pass
