"""The per-folder index in SQLite: our files, each peer's files, sequences, and a block lookup.

Theory: one database per folder, WAL mode. `files` holds a row per (device, name): our own rows
carry our local sequence (bumped on every change we record) and the inode we saw; a peer's rows
are what that peer announced. `peers` remembers, per peer, its index id and the highest sequence
received, so a reconnect asks only for the delta. `blocks` maps a block hash to where it lives in
our current files, so a needed block present anywhere locally is copied instead of fetched. Each
write method is one transaction (executemany), so a batch of thousands of files commits once.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgpack

from agent.sync.blocks import HASH_LEN
from agent.sync.model import FileInfo, FileType
from agent.sync.vectors import Vector

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    device TEXT NOT NULL, name TEXT NOT NULL, type INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, executable INTEGER NOT NULL, deleted INTEGER NOT NULL,
    version BLOB NOT NULL, sequence INTEGER NOT NULL, block_size INTEGER NOT NULL,
    hashes BLOB NOT NULL, modified_by TEXT NOT NULL, inode INTEGER NOT NULL,
    PRIMARY KEY (device, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS files_by_sequence ON files (device, sequence);
CREATE TABLE IF NOT EXISTS blocks (hash BLOB NOT NULL, name TEXT NOT NULL, idx INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS blocks_by_hash ON blocks (hash);
CREATE INDEX IF NOT EXISTS blocks_by_name ON blocks (name);
CREATE TABLE IF NOT EXISTS peers (
    device TEXT PRIMARY KEY, index_id BLOB NOT NULL, max_sequence INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    path TEXT PRIMARY KEY, name TEXT NOT NULL, by TEXT NOT NULL, kept_at REAL NOT NULL, size INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS versions_by_age ON versions (kept_at);
"""
_COLUMNS = "name, type, size, mtime_ns, executable, deleted, version, sequence, block_size, hashes, modified_by, inode"
_LOCAL = ""  # the device column of our own rows
_CHUNK = 500  # names per IN (...) query, below SQLite's variable limit

Row = tuple[str, int, int, int, int, int, bytes, int, int, bytes, str, int]


def _pack_version(v: Vector) -> bytes:
    return msgpack.packb([list(pair) for pair in v.counters])


def _to_row(f: FileInfo, sequence: int | None = None, inode: int | None = None) -> Row:
    """The row of `f`, with `sequence` or `inode` instead of its own if given."""
    return (
        f.name, int(f.type), f.size, f.mtime_ns, int(f.executable), int(f.deleted), _pack_version(f.version),
        f.sequence if sequence is None else sequence, f.block_size, f.hashes, f.modified_by,
        f.inode if inode is None else inode,
    )  # fmt: skip


def _from_row(r: Row) -> FileInfo:
    pairs = msgpack.unpackb(r[6])
    return FileInfo(
        name=r[0], type=FileType(r[1]), size=r[2], mtime_ns=r[3], executable=bool(r[4]), deleted=bool(r[5]),
        version=Vector(tuple((d, c) for d, c in pairs)), sequence=r[7], block_size=r[8], hashes=r[9],
        modified_by=r[10], inode=r[11],
    )  # fmt: skip


class FolderIndex:
    """Our files and our peers' files for one folder, stored in SQLite."""

    def __init__(self, db_path: Path | str, *, read_only: bool = False) -> None:
        """Open (creating if need be) the index at `db_path`; `read_only` opens one that exists,
        for a reader beside the engine (serving blocks), which can then never write."""
        if read_only:
            # a URI: '?', '#' and '%' in the path (a home directory may hold them) must be escaped
            uri = f"file:{quote(str(Path(db_path).absolute()))}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        else:
            # One engine thread uses the connection at a time; the shell may move that thread.
            self._db = sqlite3.connect(str(db_path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, never torn
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='index_id'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('index_id', ?)", (secrets.token_bytes(16),))
                self._db.execute("INSERT INTO meta VALUES ('sequence', 0)")
        self.index_id: bytes = self._db.execute("SELECT value FROM meta WHERE key='index_id'").fetchone()[0]
        # a reader's copy goes stale: it answers record lookups only
        self.sequence: int = self._db.execute("SELECT value FROM meta WHERE key='sequence'").fetchone()[0]

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    # -- our own files ---------------------------------------------------------------------------

    def local(self, name: str) -> FileInfo | None:
        """Our current record of `name`, tombstones included."""
        return self._get(_LOCAL, name)

    def local_many(self, names: Iterable[str]) -> dict[str, FileInfo]:
        """Our records of `names` that exist."""
        return self._get_many(_LOCAL, names)

    def local_files(self) -> Iterator[FileInfo]:
        """Every record of ours, tombstones included."""
        for r in self._db.execute(f"SELECT {_COLUMNS} FROM files WHERE device=? ORDER BY name", (_LOCAL,)):
            yield _from_row(r)

    def local_files_under(self, prefix: str) -> list[FileInfo]:
        """Our records named `prefix` or inside directory `prefix`."""
        if not prefix:
            return list(self.local_files())
        cur = self._db.execute(
            f"SELECT {_COLUMNS} FROM files WHERE device=? AND (name=? OR (name>=? AND name<?))",
            (_LOCAL, prefix, prefix + "/", prefix + "0"),  # '0' sorts right after '/'
        )
        return [_from_row(r) for r in cur]

    def changes_since(self, sequence: int) -> Iterator[FileInfo]:
        """Our records with a sequence above `sequence`, in sequence order, read as consumed."""
        cur = self._db.execute(
            f"SELECT {_COLUMNS} FROM files WHERE device=? AND sequence>? ORDER BY sequence", (_LOCAL, sequence)
        )
        try:
            for r in cur:
                yield _from_row(r)
        finally:
            cur.close()  # a consumer that stops early must not leave the statement open

    def update_local(self, files: Iterable[FileInfo]) -> None:
        """Record new versions of our files in one transaction; each gets the next sequence."""
        files = list(files)
        if not files:
            return
        # One name twice in a batch (a conflict copy's record, then a pull's): the last record is
        # the one kept, and only its blocks may be listed, or a stale block entry would let a pull
        # copy "trusted" bytes from a file that no longer holds them.
        last = {f.name: i for i, f in enumerate(files)}
        files = [f for i, f in enumerate(files) if last[f.name] == i]
        with self._transaction():
            first = self.sequence + 1
            rows = [(_LOCAL, *_to_row(f, sequence=first + i)) for i, f in enumerate(files)]
            self._db.executemany(f"INSERT OR REPLACE INTO files (device, {_COLUMNS}) VALUES ({_qs(13)})", rows)
            self._db.executemany("DELETE FROM blocks WHERE name=?", [(f.name,) for f in files])
            self._db.executemany(
                "INSERT INTO blocks VALUES (?, ?, ?)",
                [
                    (f.hashes[i : i + HASH_LEN], f.name, i // HASH_LEN)
                    for f in files
                    if not f.deleted
                    for i in range(0, len(f.hashes), HASH_LEN)
                ],
            )
            self._db.execute("UPDATE meta SET value=? WHERE key='sequence'", (first + len(files) - 1,))
        self.sequence = first + len(files) - 1

    def forget_local(self, names: Iterable[str]) -> None:
        """Drop our records of `names` without a new sequence: peers are not told (a receive-only
        folder's revert, which then asks the peers' records again)."""
        todo = [(_LOCAL, n) for n in names]
        if todo:
            with self._transaction():
                self._db.executemany("DELETE FROM files WHERE device=? AND name=?", todo)
                self._db.executemany("DELETE FROM blocks WHERE name=?", [(n,) for _, n in todo])

    def set_inode(self, name: str, inode: int, mtime_ns: int) -> None:
        """Refresh the scan state of a file whose content is unchanged (no new version)."""
        self._db.execute(
            "UPDATE files SET inode=?, mtime_ns=? WHERE device=? AND name=?", (inode, mtime_ns, _LOCAL, name)
        )

    def find_block(self, digest: bytes) -> list[tuple[str, int]]:
        """(name, block index) of local files that hold a block with this hash."""
        return list(self._db.execute("SELECT name, idx FROM blocks WHERE hash=? LIMIT 8", (digest,)))

    def totals(self) -> tuple[int, int]:
        """(files, bytes) of our existing files."""
        n, b = self._db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM files WHERE device=? AND deleted=0 AND type=0",
            (_LOCAL,),
        ).fetchone()
        return int(n), int(b)

    # -- peers -----------------------------------------------------------------------------------

    def peer_state(self, device: str) -> tuple[bytes, int]:
        """(index id, highest sequence) we hold of `device`'s index; (b'', 0) if nothing."""
        row = self._db.execute("SELECT index_id, max_sequence FROM peers WHERE device=?", (device,)).fetchone()
        return (b"", 0) if row is None else (row[0], row[1])

    def reset_peer(self, device: str, index_id: bytes) -> None:
        """Forget everything `device` announced; it starts again under `index_id`."""
        with self._transaction():
            self._db.execute("DELETE FROM files WHERE device=?", (device,))
            self._db.execute("INSERT OR REPLACE INTO peers VALUES (?, ?, 0)", (device, index_id))

    def apply_remote(self, device: str, files: Iterable[FileInfo]) -> None:
        """Store files announced by `device` in one transaction and advance its sequence."""
        rows = [(device, *_to_row(f, inode=0)) for f in files]
        if not rows:
            return
        top = max(r[8] for r in rows)
        with self._transaction():
            self._db.executemany(f"INSERT OR REPLACE INTO files (device, {_COLUMNS}) VALUES ({_qs(13)})", rows)
            self._db.execute("UPDATE peers SET max_sequence=max(max_sequence, ?) WHERE device=?", (top, device))

    def remote(self, device: str, name: str) -> FileInfo | None:
        """What `device` announced for `name`."""
        return self._get(device, name)

    def remote_many(self, device: str, names: Iterable[str]) -> dict[str, FileInfo]:
        """What `device` announced for those of `names` it announced."""
        return self._get_many(device, names)

    def count_remote(self, device: str) -> int:
        """How many names `device` announced (deletion records included)."""
        return int(self._db.execute("SELECT count(*) FROM files WHERE device=?", (device,)).fetchone()[0])

    def remote_bytes(self, device: str) -> int:
        """About how many bytes `device`'s records take: names, vectors and hashes, 64 for the rest."""
        row = self._db.execute(
            "SELECT coalesce(sum(64 + length(CAST(name AS BLOB)) + length(hashes) + length(version)), 0)"
            " FROM files WHERE device=?",
            (device,),
        ).fetchone()
        return int(row[0])

    def remote_names(self, device: str, names: Iterable[str]) -> set[str]:
        """Those of `names` that `device` announced."""
        return {r[0] for r in self._rows_named(device, names, "name")}

    def remote_files(self, device: str) -> Iterator[FileInfo]:
        """Everything `device` announced."""
        for r in self._db.execute(f"SELECT {_COLUMNS} FROM files WHERE device=?", (device,)):
            yield _from_row(r)

    def peers(self) -> list[str]:
        """Every peer we hold an index of."""
        return [r[0] for r in self._db.execute("SELECT device FROM peers ORDER BY device")]

    def differing(self, device: str) -> Iterator[FileInfo]:
        """The files of `device` whose version differs from ours (candidates for pulling)."""
        cur = self._db.execute(
            f"SELECT {', '.join('p.' + c.strip() for c in _COLUMNS.split(','))} FROM files p "
            "LEFT JOIN files l ON l.device=? AND l.name=p.name WHERE p.device=? AND "
            "(l.name IS NULL OR l.version != p.version)",
            (_LOCAL, device),
        )
        for r in cur:
            yield _from_row(r)

    # -- helpers ---------------------------------------------------------------------------------

    def _get(self, device: str, name: str) -> FileInfo | None:
        r = self._db.execute(f"SELECT {_COLUMNS} FROM files WHERE device=? AND name=?", (device, name)).fetchone()
        return None if r is None else _from_row(r)

    # -- kept versions (agent.sync.versions) --------------------------------------------------------
    # The catalogue of `.tofu-versions`: who replaced each version and how large it is. The
    # directory is the truth (a crash between a move and its note leaves a version without one).

    def note_versions(self, notes: Iterable[tuple[str, str, str, float, int]]) -> None:
        """Record kept versions: (path, name, device that replaced it, wall time kept, size)."""
        with self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO versions VALUES (?, ?, ?, ?, ?)", list(notes))

    def version_notes(self, paths: Iterable[str]) -> dict[str, tuple[str, float, int]]:
        """path -> (device that replaced it, wall time kept, size) for the noted `paths`."""
        todo = list(paths)
        found: dict[str, tuple[str, float, int]] = {}
        for i in range(0, len(todo), _CHUNK):
            chunk = todo[i : i + _CHUNK]
            q = f"SELECT path, by, kept_at, size FROM versions WHERE path IN ({_qs(len(chunk))})"
            found.update({r[0]: (r[1], r[2], r[3]) for r in self._db.execute(q, chunk)})
        return found

    def oldest_versions(self, limit: int) -> list[tuple[str, int]]:
        """(path, size) of the `limit` oldest noted versions."""
        return list(self._db.execute("SELECT path, size FROM versions ORDER BY kept_at, path LIMIT ?", (limit,)))

    def forget_versions(self, paths: Iterable[str]) -> None:
        """Drop the notes of versions that were removed."""
        with self._transaction():
            self._db.executemany("DELETE FROM versions WHERE path=?", [(p,) for p in paths])

    def _get_many(self, device: str, names: Iterable[str]) -> dict[str, FileInfo]:
        return {r[0]: _from_row(r) for r in self._rows_named(device, names, _COLUMNS)}

    def _rows_named(self, device: str, names: Iterable[str], columns: str) -> Iterator[tuple[Any, ...]]:
        """`columns` (the name first) of `device`'s records for `names`, in chunks of bound parameters."""
        todo = list(names)
        for i in range(0, len(todo), _CHUNK):
            chunk = todo[i : i + _CHUNK]
            yield from self._db.execute(
                f"SELECT {columns} FROM files WHERE device=? AND name IN ({_qs(len(chunk))})", (device, *chunk)
            )

    def _transaction(self) -> _Tx:
        return _Tx(self._db)


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _qs(n: int) -> str:
    return ", ".join("?" * n)


def under(files: Iterable[FileInfo], prefix: str) -> list[FileInfo]:
    """The files named `prefix` or inside directory `prefix` ('' is everything)."""
    if not prefix:
        return list(files)
    return [f for f in files if f.name == prefix or f.name.startswith(prefix + "/")]
