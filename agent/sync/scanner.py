"""Find what changed on disk since the index last looked, and describe it as new versions (disk).

Theory: walk the folder without following symlinks (symlinks and special files are skipped, not
synced), honouring `.tofuignore`. A file whose (size, mtime_ns, inode, exec bit) matches its index
record is unchanged; anything else is rehashed and, if its content or metadata really differ,
becomes a new version: the old vector bumped with our device id. A name in the index that the walk
did not find becomes a deletion record. A rename is a deletion plus a creation; the new name's
blocks are already in the index's block table, so peers copy them locally instead of fetching.
A file that changes while being hashed is skipped this round and listed as `unsettled`: the
engine looks at it again within seconds, whether or not a file-system event comes.
`scan_chunks` hands the result over in chunks (every `SCAN_CHUNK_FILES` new versions or
`SCAN_CHUNK_BYTES` hashed), as Syncthing commits its scan in batches: the engine records and
announces each chunk, so peers start fetching while a large tree is still being hashed.
"""

from __future__ import annotations

import logging
import os
import stat
import unicodedata
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field

from agent.sync.blocks import block_size_for, hash_fd
from agent.sync.fs import FolderFS
from agent.sync.ignore import Ignore
from agent.sync.index import FolderIndex, under
from agent.sync.model import FileInfo, FileType
from agent.sync.names import IGNORE_FILE, MARKER, is_temp_name, is_valid_name
from agent.sync.vectors import Vector
from agent.sync.versioning import VERSIONS_DIR

log = logging.getLogger(__name__)
MAX_IGNORE_FILE = 1024 * 1024
SCAN_CHUNK_FILES = 1000  # new versions per chunk of a scan (Syncthing's scanner batches 1000 too)
SCAN_CHUNK_BYTES = 256 * 1024 * 1024  # or this much content hashed


@dataclass(slots=True)
class ScanResult:
    """New versions to record, and inode refreshes of files whose content did not change."""

    changed: list[FileInfo] = field(default_factory=list)
    refreshed: list[tuple[str, int, int]] = field(default_factory=list)  # (name, inode, mtime_ns)
    temp_files: list[str] = field(default_factory=list)  # names whose temp file exists
    unsettled: list[str] = field(default_factory=list)  # files skipped: written to (or gone) while hashed
    final: bool = True  # the last chunk of its scan


def _merge(into: ScanResult, chunk: ScanResult) -> None:
    into.changed += chunk.changed
    into.refreshed += chunk.refreshed
    into.temp_files += chunk.temp_files
    into.unsettled += chunk.unsettled


def load_ignore(fs: FolderFS) -> Ignore:
    """The folder's `.tofuignore` patterns (none if the file is missing or unreadable)."""
    try:
        fd = fs.open_read(IGNORE_FILE)
    except OSError:
        return Ignore()
    try:
        return Ignore.from_text(os.read(fd, MAX_IGNORE_FILE).decode("utf-8", "replace"))
    finally:
        os.close(fd)


class Scanner:
    """Compares the folder on disk with our index records."""

    def __init__(self, fs: FolderFS, index: FolderIndex, device_id: str, executor: Executor | None = None) -> None:
        self.fs = fs
        self.index = index
        self.device_id = device_id
        self.executor = executor
        self.ignore = load_ignore(fs)
        self._hashed = 0  # bytes hashed since the last chunk was handed over
        self.chunk_files = SCAN_CHUNK_FILES
        self.chunk_bytes = SCAN_CHUNK_BYTES

    def scan(self, now_s: int, prefixes: Iterable[str] | None = None) -> ScanResult:
        """Scan the whole folder, or only the names at or under `prefixes`, in one result."""
        result = ScanResult()
        for chunk in self.scan_chunks(now_s, prefixes, max_files=0):
            _merge(result, chunk)
        return result

    def scan_chunks(
        self, now_s: int, prefixes: Iterable[str] | None = None, max_files: int | None = None
    ) -> Iterator[ScanResult]:
        """`scan` in chunks of `max_files` new versions (default `chunk_files`; 0: one chunk) or
        `chunk_bytes` hashed; the last chunk has `final` set and holds the deletions.

        The records the walk compares with are read when it starts: the caller must not change
        our index records other than by recording these chunks until the last one is out.
        """
        self.ignore = load_ignore(self.fs)
        self._hashed = 0
        max_files = self.chunk_files if max_files is None else max_files
        result = ScanResult(final=False)
        roots = [""] if prefixes is None else sorted(set(prefixes))
        if "" in roots:
            roots = [""]
        known_all = {f.name: f for f in self.index.local_files()} if roots == [""] else None
        for prefix in roots:
            if known_all is not None:
                known = known_all
            else:
                known = {f.name: f for f in under(self.index.local_files_under(prefix), prefix)}
            seen: set[str] = set()
            unreadable: list[str] = []
            for _ in self._walk(prefix, known, seen, unreadable, now_s, result, max_files):
                yield self._take(result)
            for name, old in known.items():
                if old.deleted or name in seen or self.ignore.matches(name, old.type is FileType.DIR):
                    continue
                if any(not u or name.startswith(u + "/") for u in unreadable):
                    continue  # not seen because its directory could not be read: not a deletion
                result.changed.append(self._tombstone(old, now_s))
        result.final = True
        yield result

    def _take(self, result: ScanResult) -> ScanResult:
        """Hand over what `result` holds so far as a chunk, and empty it."""
        chunk = ScanResult(result.changed, result.refreshed, result.temp_files, result.unsettled, final=False)
        result.changed, result.refreshed, result.temp_files, result.unsettled = [], [], [], []
        self._hashed = 0
        return chunk

    def _walk(
        self, prefix: str, known: dict[str, FileInfo], seen: set[str], unreadable: list[str], now_s: int,
        result: ScanResult, max_files: int,
    ) -> Iterator[None]:  # fmt: skip
        """Walk `prefix`, adding to `result`; yields whenever `result` holds a full chunk."""
        st = self.fs.lstat(prefix) if prefix else None
        if prefix:
            if st is None or self.ignore.matches(prefix, stat.S_ISDIR(st.st_mode)):
                return
            if not stat.S_ISDIR(st.st_mode):
                if stat.S_ISREG(st.st_mode):  # a symlink or special file here now: not seen, so a deletion
                    self._check_file(prefix, st, known.get(prefix), seen, now_s, result)
                if self._full(result, max_files):
                    yield None
                return
            self._check_dir(prefix, known.get(prefix), seen, now_s, result)
        stack = [prefix]
        while stack:
            rel = stack.pop()
            try:
                with os.scandir(self.fs.root / rel if rel else self.fs.root) as it:
                    entries = list(it)
            except OSError as exc:
                log.warning("cannot read directory %r: %s", rel, exc)
                unreadable.append(rel)
                continue
            for entry in entries:
                name = f"{rel}/{entry.name}" if rel else entry.name
                if is_temp_name(entry.name):
                    result.temp_files.append(name)
                    continue
                if not rel and entry.name in (MARKER, VERSIONS_DIR):
                    continue  # ours, never synced
                if not is_valid_name(name) or unicodedata.normalize("NFC", name) != name:
                    log.warning("not syncing %r: the name cannot be synced", name)
                    continue
                try:
                    est = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(est.st_mode):
                    if self.ignore.matches(name, True):
                        continue
                    self._check_dir(name, known.get(name), seen, now_s, result)
                    stack.append(name)
                elif stat.S_ISREG(est.st_mode) and not self.ignore.matches(name):
                    self._check_file(name, est, known.get(name), seen, now_s, result)
                # symlinks, sockets, fifos and devices are never synced
                if self._full(result, max_files):
                    yield None

    def _full(self, result: ScanResult, max_files: int) -> bool:
        return max_files > 0 and (len(result.changed) >= max_files or self._hashed >= self.chunk_bytes)

    def _check_dir(self, name: str, old: FileInfo | None, seen: set[str], now_s: int, result: ScanResult) -> None:
        seen.add(name)
        if old is not None and not old.deleted and old.type is FileType.DIR:
            return
        result.changed.append(
            FileInfo(name, FileType.DIR, 0, 0, False, False, self._bump(old, now_s), 0, 0, b"", self.device_id)
        )

    def _check_file(
        self,
        name: str,
        st: os.stat_result,
        old: FileInfo | None,
        seen: set[str],
        now_s: int,
        result: ScanResult,
    ) -> None:
        seen.add(name)
        exe = bool(st.st_mode & stat.S_IXUSR)
        live = old is not None and not old.deleted and old.type is FileType.FILE
        if (
            live and old is not None and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns
            and old.inode == st.st_ino and old.executable == exe
        ):  # fmt: skip
            return
        info = self.hash_file(name)
        if info is None:
            result.unsettled.append(name)  # the engine looks again soon, event or not
            return
        if live and old is not None and old.same_content(info) and old.mtime_ns == info.mtime_ns:
            result.refreshed.append((name, info.inode, info.mtime_ns))
            return
        result.changed.append(info.replace(version=self._bump(old, now_s)))

    def hash_file(self, name: str) -> FileInfo | None:
        """A FileInfo (empty version) for the file on disk now; None if it vanished or kept changing."""
        try:
            fd = self.fs.open_read(name)
        except OSError:
            return None
        try:
            before = os.fstat(fd)
            bs = block_size_for(before.st_size)
            hashes = hash_fd(fd, before.st_size, bs, self.executor)
            self._hashed += before.st_size
            after = os.fstat(fd)
        except OSError as exc:
            log.info("skipping %r this round: %s", name, exc)
            return None
        finally:
            os.close(fd)
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            return None  # written to while we hashed: the next event or scan sees it settled
        return FileInfo(
            name, FileType.FILE, before.st_size, before.st_mtime_ns, bool(before.st_mode & stat.S_IXUSR),
            False, Vector(), 0, bs, hashes, self.device_id, before.st_ino,
        )  # fmt: skip

    def _tombstone(self, old: FileInfo, now_s: int) -> FileInfo:
        return FileInfo(
            old.name,
            old.type,
            0,
            old.mtime_ns,
            False,
            True,
            self._bump(old, now_s),
            0,
            0,
            b"",
            self.device_id,
        )

    def _bump(self, old: FileInfo | None, now_s: int) -> Vector:
        return (old.version if old is not None else Vector()).bump(self.device_id, now_s)
