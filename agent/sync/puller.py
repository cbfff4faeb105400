"""Writing one pulled file: temp file, resume, local block copies, verified writes (disk).

Theory: a pulled file is assembled in `.tofu-tmp-<hash of name>` beside its target. The name is
deterministic so that after a crash or disconnect the next attempt finds the temp file, rehashes
its blocks and keeps every block that already matches: an interrupted transfer resumes without
re-requesting finished blocks. Blocks present in any local file are copied (without rehashing when
the source still matches its index record, else read and verified); the rest are requested, and
every received block is checked against its SHA-256 before it is written. Aligned blocks go
through O_DIRECT (no page cache to allocate or write back; see docs/SYNC.md), the rest through
ordinary writes; copy_file_range is the fallback for copies.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import stat
import threading
from collections import deque
from collections.abc import Container
from concurrent.futures import Executor
from dataclasses import dataclass, field

from agent.sync.blocks import MAX_BLOCK_SIZE, block_range
from agent.sync.fs import FolderFS
from agent.sync.index import FolderIndex
from agent.sync.model import FileInfo
from agent.sync.planner import plan_blocks


@dataclass(slots=True)
class Job:
    """One file being pulled."""

    target: FileInfo
    expected: FileInfo | None  # our record when planned: the target must still match it on disk
    sources: set[str]
    fd: int = -1
    dfd: int = -1  # the same temp file opened O_DIRECT for aligned writes, or -1
    direct_failed: bool = False  # the file system refused a direct write: buffered from then on
    fetch: deque[int] = field(default_factory=deque)  # block indexes still to request
    outstanding: set[int] = field(default_factory=set)  # block indexes requested, not yet answered
    copied: int = 0
    reused: int = 0
    temp_id: tuple[int, int, int] = (0, 0, 0)  # (st_dev, st_ino, st_ctime_ns) of the complete temp file

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def done(self) -> bool:
        return not self.fetch and not self.outstanding


def unchanged(st: os.stat_result | None, rec: FileInfo | None) -> bool:
    """True if what is on disk is still what record `rec` describes (None: nothing there)."""
    if rec is None or rec.deleted:
        return st is None
    if st is None:
        return False
    if rec.type.name == "DIR":
        return stat.S_ISDIR(st.st_mode)
    return (
        stat.S_ISREG(st.st_mode) and st.st_size == rec.size and st.st_mtime_ns == rec.mtime_ns
        and st.st_ino == rec.inode and bool(st.st_mode & stat.S_IXUSR) == rec.executable
    )  # fmt: skip


def open_job(
    fs: FolderFS,
    index: FolderIndex,
    job: Job,
    executor: Executor | None = None,
    busy: Container[tuple[int, int]] = (),
) -> None:
    """Open the temp file, keep blocks it already holds, copy local blocks (on `executor` if
    given); fill `job.fetch`. A temp file with an inode in `busy` (another pull's) is not resumed."""
    target = job.target
    job.fd, existed = fs.open_temp(target.name, busy)
    have: set[int] = set()
    if existed:
        tmp_size = os.fstat(job.fd).st_size
        for b in target.blocks():
            if b.offset + b.size <= tmp_size and hashlib.sha256(os.pread(job.fd, b.size, b.offset)).digest() == b.hash:
                have.add(b.index)
        job.reused = len(have)
        os.ftruncate(job.fd, target.size)
    elif target.size >= DIRECT_MIN_SIZE:
        # A new file gets its length from the writes of its blocks; a large one is sized first
        # so that direct writes (several at once for local copies) never extend it.
        os.ftruncate(job.fd, target.size)
    plan = plan_blocks(target, have, index.find_block)
    if (plan.copy or plan.fetch) and target.size >= DIRECT_MIN_SIZE:
        job.dfd = fs.open_temp_direct(target.name, job.fd)
    sources: dict[str, _Source] = {}
    try:
        copies: list[tuple[int, _Source, int]] = []
        for i, src_name, src_i in plan.copy:
            src = sources.get(src_name)
            if src is None:
                src = sources[src_name] = _open_source(fs, index, src_name, direct=job.dfd >= 0)
            if src.fd < 0 or not src.block_size:
                job.fetch.append(i)
            else:
                copies.append((i, src, src_i * src.block_size))

        def copy(c: tuple[int, _Source, int]) -> bool:
            return _copy_block(job, c[1], c[0], c[2])

        # Direct I/O waits for the device on every block: a few threads keep it busy.
        results = executor.map(copy, copies) if executor is not None and len(copies) > 1 else map(copy, copies)
        for (i, _, _), ok in zip(copies, list(results), strict=True):
            if ok:
                job.copied += 1
            else:
                job.fetch.append(i)
    finally:
        for src in sources.values():
            for fd in (src.fd, src.dfd):
                if fd >= 0:
                    os.close(fd)
    job.fetch.extend(plan.fetch)
    job.fetch = deque(sorted(job.fetch))


@dataclass(slots=True)
class _Source:
    """A local file blocks are copied from."""

    fd: int  # -1: could not be opened
    dfd: int  # the same file opened O_DIRECT, or -1
    trusted: bool  # it still matches its index record, so its blocks need no rehash
    block_size: int


def _open_source(fs: FolderFS, index: FolderIndex, name: str, direct: bool) -> _Source:
    rec = index.local(name)
    try:
        fd = fs.open_read(name)
    except OSError:
        return _Source(-1, -1, False, 0)
    dfd = fs.open_read_direct(name, fd) if direct else -1
    return _Source(fd, dfd, unchanged(os.fstat(fd), rec), rec.block_size if rec else 0)


def _copy_block(job: Job, src: _Source, i: int, src_off: int) -> bool:
    """Copy the block at `src_off` of the open source into block `i` of the temp file; False if it differs."""
    t = job.target
    offset, size = block_range(t.size, t.block_size, i)
    if job.dfd >= 0 and not job.direct_failed and src.dfd >= 0 and _aligned(size, offset, src_off):
        # Direct read and write through one staging buffer: no page cache is allocated for either
        # file, which costs more than the copy itself when the source is not cached.
        with memoryview(_aligned_buffer()) as view, view[:size] as chunk:
            try:
                if os.preadv(src.dfd, [chunk], src_off) == size:
                    if not src.trusted and hashlib.sha256(chunk).digest() != t.block_hash(i):
                        return False
                    if os.pwrite(job.dfd, chunk, offset) == size:
                        return True
            except OSError:
                pass
    if src.trusted:
        try:
            n = os.copy_file_range(src.fd, job.fd, size, src_off, offset)
            if n == size:
                return True
        except OSError:
            pass
    data = os.pread(src.fd, size, src_off)
    if len(data) != size or hashlib.sha256(data).digest() != t.block_hash(i):
        return False
    os.pwrite(job.fd, data, offset)
    return True


def _aligned(size: int, *offsets: int) -> bool:
    return 0 < size <= MAX_BLOCK_SIZE and not size % DIRECT_ALIGN and all(not o % DIRECT_ALIGN for o in offsets)


def block_ok(job: Job, i: int, data: bytes) -> bool:
    """True if `data` has the length and SHA-256 of block `i` of the job's target."""
    t = job.target
    return len(data) == block_range(t.size, t.block_size, i)[1] and hashlib.sha256(data).digest() == t.block_hash(i)


def write_verified(job: Job, i: int, data: bytes) -> None:
    """Write block `i` once `block_ok` accepted it.

    Safe to run in several threads at once for different blocks of the same job (each thread
    writes through its own staging buffer at its own offset); `job.fd` must stay open meanwhile.
    """
    _write(job, data, i * job.target.block_size)


DIRECT_ALIGN = 4096  # offset, length and memory alignment that O_DIRECT accepts on common file systems
# Smaller files are written through the page cache: a direct write waits for the device on every
# call (~1 ms here), which for many small files costs far more than the one batched syncfs that
# makes their buffered data durable at flush time.
DIRECT_MIN_SIZE = 4 * 1024 * 1024
_local = threading.local()


def _aligned_buffer() -> mmap.mmap:
    """This thread's page-aligned staging buffer for direct writes (anonymous mmap: page-aligned)."""
    buf: mmap.mmap | None = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = mmap.mmap(-1, MAX_BLOCK_SIZE)
    return buf


def _write(job: Job, data: bytes | memoryview, offset: int) -> None:
    """Write `data` at `offset` of the temp file: direct when aligned and supported, else buffered."""
    n = len(data)
    if job.dfd >= 0 and not job.direct_failed and _aligned(n, offset):
        with memoryview(_aligned_buffer()) as view:
            view[:n] = data
            try:
                if os.pwrite(job.dfd, view[:n], offset) == n:
                    return
            except OSError:
                pass
        job.direct_failed = True  # refused, or short: buffered from now on (dfd closes with the job)
    if os.pwrite(job.fd, data, offset) != n:
        raise OSError(f"short write to the temp file of {job.name!r}")


def _close_direct(job: Job) -> None:
    if job.dfd >= 0:
        os.close(job.dfd)
        job.dfd = -1


def finish_job(job: Job) -> None:
    """Set the exec bit and mtime on the complete temp file and close it (durability comes later)."""
    _close_direct(job)
    os.utime(job.fd, ns=(job.target.mtime_ns, job.target.mtime_ns))
    st = os.fstat(job.fd)
    mode = 0o755 if job.target.executable else 0o644
    if stat.S_IMODE(st.st_mode) != mode:
        os.fchmod(job.fd, mode)
        st = os.fstat(job.fd)
    # ctime moves on any change and cannot be set: with the inode it tells this file from one put
    # at its name later, even if that one got the same (freed and reused) inode number
    job.temp_id = (st.st_dev, st.st_ino, st.st_ctime_ns)
    os.close(job.fd)
    job.fd = -1


def abort_job(job: Job) -> None:
    """Close the temp file but keep it, so a later attempt resumes from it."""
    _close_direct(job)
    if job.fd >= 0:
        os.close(job.fd)
        job.fd = -1
