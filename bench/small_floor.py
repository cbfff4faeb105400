"""The least work 10,000 small files cost a crash-safe Python receiver, next to rsync, in one run.

    .venv/bin/python bench/small_floor.py --workdir /mnt/bfs    # a fresh file system: see README

No agent runs here. Each figure is the tightest Python loop over the same system calls a sync tool
cannot skip, with no index, no protocol, no planning, no network:
- `rsync-like receiver`: per file create a temp file, write, set mtime, close, rename (what the
  rsync receiver does; nothing is made durable);
- `durable receiver`: the same files, but made durable the way our agent batches it (every temp
  file written, one syncfs, then the renames, then one fsync per directory);
- `sender read+hash`: read and SHA-256 every file (the least a scan that indexes content does);
- `rsync`: a real `rsync -a` push of the same tree to an rsync daemon on 127.0.0.1.
It prints the receiver floor as a fraction of rsync's whole transfer: the room left for
everything else (hash checks, index records, messages, TLS, the sender's scan on the same two cores).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sync_bench import bench_rsync, make_data  # noqa: E402

DATA = os.urandom(4096)


def receive(dest: Path, files: int, dirs: int, durable: bool) -> float:
    """Seconds to write `files` 4 KiB files into `dirs` directories under `dest`, via temp + rename."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    dest.mkdir()
    t0 = time.perf_counter()
    dfds = []
    for d in range(dirs):
        os.mkdir(dest / f"d{d:03d}")
        dfds.append(os.open(dest / f"d{d:03d}", os.O_RDONLY | os.O_DIRECTORY))
    per_dir = files // dirs
    try:
        for dfd in dfds:
            for i in range(per_dir):
                fd = os.open(f".tmp-{i}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd)
                os.write(fd, DATA)
                os.utime(fd, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
                os.close(fd)
                if not durable:
                    os.rename(f".tmp-{i}", f"f{i:05d}.dat", src_dir_fd=dfd, dst_dir_fd=dfd)
        if durable:
            root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
            try:
                if libc.syncfs(root) != 0:
                    raise OSError(ctypes.get_errno(), "syncfs failed")
            finally:
                os.close(root)
            for dfd in dfds:
                for i in range(per_dir):
                    os.rename(f".tmp-{i}", f"f{i:05d}.dat", src_dir_fd=dfd, dst_dir_fd=dfd)
                os.fsync(dfd)
        return time.perf_counter() - t0
    finally:
        for dfd in dfds:
            os.close(dfd)


def read_and_hash(src: Path) -> float:
    """Seconds to read and SHA-256 every file under `src`."""
    t0 = time.perf_counter()
    for dirpath, _, names in os.walk(src):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as fh:
                hashlib.sha256(fh.read()).digest()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp", help="where the data goes (one file system)")
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--dirs", type=int, default=100)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tf-", dir=args.workdir))
    try:
        master = make_data(work, 0, args.files, args.dirs)
        rsync = bench_rsync(master, work, 600.0, frozenset({"small"}))["small"] if shutil.which("rsync") else None
        os.sync()
        plain = receive(work / "plain", args.files, args.dirs, durable=False)
        os.sync()
        durable = receive(work / "durable", args.files, args.dirs, durable=True)
        hashing = read_and_hash(master / "small")
        print(f"{args.files} x 4 KiB files in {args.dirs} directories")
        print(f"rsync-like receiver (no durability)   {plain:6.3f} s")
        print(f"durable receiver (syncfs batch)       {durable:6.3f} s")
        print(f"sender read+hash                      {hashing:6.3f} s")
        if rsync is None:
            print("rsync: not installed (apt-get install -y rsync)")
        else:
            print(f"rsync -a push over loopback           {rsync:6.3f} s")
            print(f"durable receiver floor / rsync        {durable / rsync:6.2f}")
            print(f"room left under rsync's time          {rsync - durable:6.3f} s "
                  f"({(rsync - durable) / args.files * 1e6:.0f} us per file for everything else)")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
