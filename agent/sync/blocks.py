"""Block size choice and SHA-256 hashing of file content in large, GIL-releasing chunks.

Theory: a file is cut into fixed-size blocks (the last may be shorter); each block is named by its
SHA-256. The block size grows with the file as Syncthing's does (128 KiB, doubling while the file
would have more than 2000 blocks) but stops at 2 MiB so a block always fits in one 4 MiB frame.
`hashlib` releases the GIL for buffers over 2 KiB, so hashing ranges in worker threads scales.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Executor

MIN_BLOCK_SIZE = 128 * 1024
MAX_BLOCK_SIZE = 2 * 1024 * 1024
TARGET_BLOCKS = 2000
HASH_LEN = 32
MAX_BLOCKS_PER_FILE = 65536  # 128 GiB at 2 MiB; the hashes of one file (2 MiB) fit in a frame
MAX_FILE_SIZE = MAX_BLOCKS_PER_FILE * MAX_BLOCK_SIZE
READ_CHUNK = 8 * 1024 * 1024  # large reads amortise syscalls; a multiple of every block size
PARALLEL_MIN = 64 * 1024 * 1024  # files at least this big are hashed in ranges on an executor


def block_size_for(size: int) -> int:
    """The block size for a file of `size` bytes."""
    bs = MIN_BLOCK_SIZE
    while bs < MAX_BLOCK_SIZE and size > bs * TARGET_BLOCKS:
        bs *= 2
    return bs


def is_valid_block_size(bs: int) -> bool:
    """True for the block sizes `block_size_for` can choose."""
    return MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE and bs & (bs - 1) == 0


def block_count(size: int, bs: int) -> int:
    """How many blocks a file of `size` bytes has (0 for an empty file)."""
    return (size + bs - 1) // bs


def block_range(size: int, bs: int, i: int) -> tuple[int, int]:
    """(offset, length) of block `i`."""
    offset = i * bs
    return offset, min(bs, size - offset)


def sha256(data: bytes | memoryview) -> bytes:
    """SHA-256 digest of `data`."""
    return hashlib.sha256(data).digest()


def hash_bytes(data: bytes | memoryview, bs: int) -> bytes:
    """Concatenated block hashes of an in-memory buffer."""
    view = memoryview(data)
    return b"".join(hashlib.sha256(view[i : i + bs]).digest() for i in range(0, len(view), bs))


def _hash_range(fd: int, start: int, end: int, bs: int) -> bytes:
    """Block hashes of [start, end) of an open file; start is block-aligned."""
    out: list[bytes] = []
    pos = start
    # One buffer reused for every chunk: a fresh 8 MiB bytes per read would be fresh pages
    # (page faults) every time.
    with memoryview(bytearray(min(READ_CHUNK, end - start))) as buf:
        while pos < end:
            want = min(READ_CHUNK, end - pos)
            with buf[:want] as chunk:
                got = os.preadv(fd, [chunk], pos)
                if got != want:
                    raise OSError(f"file shrank while hashing (wanted {want} bytes at {pos}, got {got})")
                out.append(hash_bytes(chunk, bs))
            pos += want
    return b"".join(out)


def hash_fd(fd: int, size: int, bs: int, executor: Executor | None = None) -> bytes:
    """Concatenated block hashes of the first `size` bytes of `fd`, in parallel ranges if possible.

    :raises OSError: the file could not be read or is shorter than `size`.
    """
    if executor is None or size < PARALLEL_MIN:
        return _hash_range(fd, 0, size, bs)
    parts = 4
    step = block_count(block_count(size, bs), parts) * bs
    futures = [executor.submit(_hash_range, fd, start, min(start + step, size), bs) for start in range(0, size, step)]
    return b"".join(f.result() for f in futures)
