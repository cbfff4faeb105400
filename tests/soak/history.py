"""What a soak run records: every file operation (who, what, when, with which content), every fault,
and the exact expected state of each machine's own area.

Layout of every synced folder:

- `own-NAME/...`: only machine NAME's writer touches it (files, directories, renames, appends,
  truncates, chmod, symlinks). With one writer the end state is known exactly: `OwnModel`.
- `shared/...`: a small pool of names that every machine writes, deletes and renames at the same
  time, so conflicts happen. The end state is not known; the checker applies the rules that hold
  whatever the interleaving (see `checker.py`).
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field

DIR = "d"
FILE = "f"
LINK = "l"

SHARED = "shared"
SHARED_DIRS = ("d0", "d1", "d2")
SHARED_NAMES = tuple(f"{SHARED}/a{i}.txt" for i in range(8)) + tuple(
    f"{SHARED}/{d}/b{i}.txt" for d in SHARED_DIRS for i in range(4)
)


def own_root(machine: str) -> str:
    return f"own-{machine}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class Entry:
    """One name in a model: a directory, a file (content hash and exec bit) or a symlink."""

    kind: str
    sha: str = ""
    exec: bool = False
    op: int = 0  # the op that made this state (for messages)

    def same(self, other: Entry) -> bool:
        return (self.kind, self.sha, self.exec) == (other.kind, other.sha, other.exec)


@dataclass(slots=True)
class Op:
    """One file operation as it was done on one machine's folder."""

    seq: int
    machine: str
    kind: str  # write, append, truncate, delete, rmtree, rename, mkdir, chmod, symlink
    path: str
    path2: str = ""  # rename target
    size: int = 0
    sha: str = ""  # the file's content after the op (writes, appends, truncates)
    t_start: float = 0.0
    t_end: float = 0.0
    ok: bool = True
    note: str = ""  # e.g. "burst while m1 starts", "while m1 is down"

    def describe(self, t0: float) -> str:
        target = f" -> {self.path2}" if self.path2 else ""
        extra = f", {self.size:,} bytes" if self.kind in ("write", "append") else ""
        note = f" [{self.note}]" if self.note else ""
        when = f"+{self.t_start - t0:.1f} s"
        return f"op #{self.seq} {self.kind} {self.path}{target} on {self.machine} at {when}{extra}{note}"


@dataclass(slots=True)
class Fault:
    """One fault injected (or healed) on one machine."""

    t: float
    machine: str
    kind: str  # sigterm, sigkill, restart, pause, resume, rotate, join, cut, heal
    detail: str = ""


class OwnModel:
    """The exact state of `own-NAME/` on machine NAME (and, symlinks aside, on every machine at the end)."""

    def __init__(self, machine: str) -> None:
        self.root = own_root(machine)
        self.entries: dict[str, Entry] = {self.root: Entry(DIR)}

    def files(self) -> list[str]:
        return sorted(p for p, e in self.entries.items() if e.kind == FILE)

    def dirs(self) -> list[str]:
        return sorted(p for p, e in self.entries.items() if e.kind == DIR)

    def children(self, path: str) -> list[str]:
        prefix = path + "/"
        return [p for p in self.entries if p.startswith(prefix)]

    def set(self, path: str, entry: Entry) -> None:
        self.entries[path] = entry

    def remove(self, path: str) -> None:
        self.entries.pop(path, None)
        for p in self.children(path):
            del self.entries[p]

    def rename(self, src: str, dst: str) -> None:
        moved = {src: self.entries.pop(src)}
        for p in self.children(src):
            moved[p] = self.entries.pop(p)
        for p, e in moved.items():
            self.entries[dst + p[len(src) :]] = e

    def synced(self) -> dict[str, Entry]:
        """What every other machine must hold under `own-NAME/`: all but the symlinks."""
        return {p: e for p, e in self.entries.items() if e.kind != LINK}


@dataclass
class History:
    """Everything a run did, in the order it was done; thread-safe appends."""

    t0: float = field(default_factory=time.monotonic)
    ops: list[Op] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    shared_contents: dict[str, bytes] = field(default_factory=dict)  # sha -> bytes of every shared write
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _seq: int = 0

    def next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def add(self, op: Op) -> None:
        with self._lock:
            self.ops.append(op)

    def fault(self, machine: str, kind: str, detail: str = "") -> None:
        with self._lock:
            self.faults.append(Fault(time.monotonic(), machine, kind, detail))

    def remember_shared(self, data: bytes) -> str:
        digest = sha(data)
        with self._lock:
            self.shared_contents[digest] = data
        return digest
