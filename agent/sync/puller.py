"""Writing one pulled file: temp file, resume, local block copies, verified writes (disk).

Theory: a pulled file is assembled in `.tofu-tmp-<hash of name>` beside its target. The name is
deterministic so that after a crash or disconnect the next attempt finds the temp file, rehashes
its blocks and keeps every block that already matches: an interrupted transfer resumes without
re-requesting finished blocks. Blocks present in any local file are copied (copy_file_range when
the source still matches its index record, else read and verified); the rest are requested, and
every received block is checked against its SHA-256 before it is written.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import stat
import threading
from collections import deque
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
    fetch: deque[int] = field(default_factory=deque)  # block indexes still to request
    outstanding: set[int] = field(default_factory=set)  # block indexes requested, not yet answered
    copied: int = 0
    reused: int = 0

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
        and st.st_ino == rec.inode
    )  # fmt: skip


def open_job(fs: FolderFS, index: FolderIndex, job: Job) -> None:
    """Open the temp file, keep blocks it already holds, copy local blocks; fill `job.fetch`."""
    target = job.target
    job.fd, existed = fs.open_temp(target.name)
    have: set[int] = set()
    if existed:
        tmp_size = os.fstat(job.fd).st_size
        for b in target.blocks():
            if b.offset + b.size <= tmp_size and hashlib.sha256(os.pread(job.fd, b.size, b.offset)).digest() == b.hash:
                have.add(b.index)
        job.reused = len(have)
    os.ftruncate(job.fd, target.size)
    plan = plan_blocks(target, have, index.find_block)
    sources: dict[str, tuple[int, bool, int]] = {}
    try:
        for i, src_name, src_i in plan.copy:
            if src_name not in sources:
                rec = index.local(src_name)
                try:
                    sfd = fs.open_read(src_name)
                except OSError:
                    sources[src_name] = (-1, False, 0)
                else:
                    sources[src_name] = (sfd, unchanged(os.fstat(sfd), rec), rec.block_size if rec else 0)
            sfd, trusted, src_bs = sources[src_name]
            if sfd < 0 or not src_bs or not _copy_block(job, sfd, trusted, i, src_i * src_bs):
                job.fetch.append(i)
            else:
                job.copied += 1
    finally:
        for sfd, _, _ in sources.values():
            if sfd >= 0:
                os.close(sfd)
    job.fetch.extend(plan.fetch)
    job.fetch = deque(sorted(job.fetch))
    if job.fetch:
        job.dfd = fs.open_temp_direct(target.name, job.fd)


def _copy_block(job: Job, sfd: int, trusted: bool, i: int, src_off: int) -> bool:
    """Copy the block at `src_off` of the open source into block `i` of the temp file; False if it differs."""
    t = job.target
    offset, size = block_range(t.size, t.block_size, i)
    if trusted:
        try:
            n = os.copy_file_range(sfd, job.fd, size, src_off, offset)
            if n == size:
                return True
        except OSError:
            pass
    data = os.pread(sfd, size, src_off)
    if len(data) != size or hashlib.sha256(data).digest() != t.block_hash(i):
        return False
    os.pwrite(job.fd, data, offset)
    return True


def write_block(job: Job, i: int, data: bytes) -> bool:
    """Write received block `i` if its length and SHA-256 match; False if it does not."""
    t = job.target
    offset, size = block_range(t.size, t.block_size, i)
    if len(data) != size or hashlib.sha256(data).digest() != t.block_hash(i):
        return False
    _write(job, data, offset)
    return True


DIRECT_ALIGN = 4096  # offset, length and memory alignment that O_DIRECT accepts on common file systems
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
    if job.dfd >= 0 and n and not n % DIRECT_ALIGN and not offset % DIRECT_ALIGN and n <= MAX_BLOCK_SIZE:
        buf = _aligned_buffer()
        with memoryview(buf) as view:
            view[:n] = data
            try:
                if os.pwrite(job.dfd, view[:n], offset) == n:
                    return
            except OSError:
                pass
        os.close(job.dfd)  # the file system refused (or wrote short): buffered from now on
        job.dfd = -1
    os.pwrite(job.fd, data, offset)


def _close_direct(job: Job) -> None:
    if job.dfd >= 0:
        os.close(job.dfd)
        job.dfd = -1


def finish_job(job: Job) -> None:
    """Set the exec bit and mtime on the complete temp file and close it (durability comes later)."""
    _close_direct(job)
    os.fchmod(job.fd, 0o755 if job.target.executable else 0o644)
    os.utime(job.fd, ns=(job.target.mtime_ns, job.target.mtime_ns))
    os.close(job.fd)
    job.fd = -1


def abort_job(job: Job) -> None:
    """Close the temp file but keep it, so a later attempt resumes from it."""
    _close_direct(job)
    if job.fd >= 0:
        os.close(job.fd)
        job.fd = -1
