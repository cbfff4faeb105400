"""The SQLite trust store: one row per device and an append-only event log (WAL, multi-process).

Every change runs in a `BEGIN IMMEDIATE` transaction that reads the row, applies a pure
transition from `agent.trust.policy`, writes the row and appends the event, so the agent and CLI
commands can change the store at the same time without losing an update.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from agent.errors import AmbiguousDeviceError, TrustStoreError, UnknownDeviceError, UserError
from agent.trust import policy
from agent.trust.model import Decision, DeviceRecord, EventKind, TrustEvent, TrustLevel, TrustPolicy

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    trust TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    sync_count INTEGER NOT NULL DEFAULT 0,
    addresses TEXT NOT NULL DEFAULT '[]',
    notes TEXT NOT NULL DEFAULT '',
    pending_fingerprint TEXT
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    device_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    fingerprint TEXT,
    old_fingerprint TEXT,
    address TEXT,
    detail TEXT NOT NULL DEFAULT '',
    trust_after TEXT
);
CREATE INDEX IF NOT EXISTS events_device ON events (device_id, seq);
CREATE TRIGGER IF NOT EXISTS events_append_only_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'the trust event log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_append_only_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'the trust event log is append-only'); END;
"""
_COLUMNS = (
    "device_id, name, fingerprint, trust, first_seen, last_seen, sync_count, addresses, notes, pending_fingerprint"
)


def _row_to_record(row: sqlite3.Row) -> DeviceRecord:
    return DeviceRecord(
        device_id=row["device_id"],
        name=row["name"],
        fingerprint=row["fingerprint"],
        trust=TrustLevel(row["trust"]),
        first_seen=row["first_seen"],
        last_seen=row["last_seen"],
        sync_count=row["sync_count"],
        addresses=tuple(json.loads(row["addresses"])),
        notes=row["notes"],
        pending_fingerprint=row["pending_fingerprint"],
    )


def _row_to_event(row: sqlite3.Row) -> TrustEvent:
    return TrustEvent(
        seq=row["seq"],
        time=row["time"],
        device_id=row["device_id"],
        kind=EventKind(row["kind"]),
        fingerprint=row["fingerprint"],
        old_fingerprint=row["old_fingerprint"],
        address=row["address"],
        detail=row["detail"],
        trust_after=TrustLevel(row["trust_after"]) if row["trust_after"] else None,
    )


# An import may raise a known key to these levels, never lower it.
_IMPORT_RANK = {TrustLevel.REVOKED: 3, TrustLevel.VERIFIED: 2}


class TrustStore:
    """Devices and their trust levels; safe to open from several processes at once."""

    def __init__(self, path: Path, policy: TrustPolicy = TrustPolicy.AUTO) -> None:
        self.path = path
        self.policy = policy
        # One connection shared by the agent's worker threads: a transaction must not interleave
        # with another thread's statements, so every use of the connection holds this lock.
        self._lock = threading.RLock()
        try:
            # autocommit mode: transactions are explicit, so BEGIN IMMEDIATE means what it says.
            self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            path.chmod(0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            with self._transaction():
                for statement in _SCHEMA.split(";\n"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise TrustStoreError(f"cannot open trust store {path}: {exc}") from exc

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    def __enter__(self) -> TrustStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._begin() as db:
            yield db

    @contextmanager
    def _begin(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise TrustStoreError(f"trust store is busy or unreadable: {exc}") from exc
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise TrustStoreError(f"cannot write trust store: {exc}") from exc

    # -- reads ----------------------------------------------------------------------------------

    def get(self, device_id: str) -> DeviceRecord | None:
        """The record for exactly `device_id`, or None."""
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        return _row_to_record(row) if row else None

    def all(self) -> list[DeviceRecord]:
        """Every known device, by name."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM devices ORDER BY name, device_id").fetchall()
        return [_row_to_record(r) for r in rows]

    def resolve(self, text: str) -> DeviceRecord:
        """The device whose id is `text` or starts with it (case-insensitive).

        :raises UnknownDeviceError: nothing matches.
        :raises AmbiguousDeviceError: more than one device matches.
        """
        prefix = text.strip().upper()
        if not prefix:
            raise UnknownDeviceError("give a device id or the start of one")
        exact = self.get(prefix)
        if exact is not None:
            return exact
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM devices WHERE device_id LIKE ? ESCAPE '\\' LIMIT 3",
                (escaped + "%",),
            ).fetchall()
        if not rows:
            raise UnknownDeviceError(f"no known device matches {text!r} (see `tofu-agent peers`)")
        if len(rows) > 1:
            raise AmbiguousDeviceError(f"{text!r} matches more than one device; give more of the id")
        return _row_to_record(rows[0])

    def events(self, device_id: str | None = None, limit: int | None = None) -> list[TrustEvent]:
        """The event log, newest first, optionally for one device."""
        sql = "SELECT * FROM events"
        args: list[object] = []
        if device_id is not None:
            sql += " WHERE device_id = ?"
            args.append(device_id)
        sql += " ORDER BY seq DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_row_to_event(r) for r in rows]

    # -- writes ---------------------------------------------------------------------------------

    def _put(self, db: sqlite3.Connection, r: DeviceRecord) -> None:
        db.execute(
            f"INSERT OR REPLACE INTO devices ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                r.device_id,
                r.name,
                r.fingerprint,
                r.trust.value,
                r.first_seen,
                r.last_seen,
                r.sync_count,
                json.dumps(list(r.addresses)),
                r.notes,
                r.pending_fingerprint,
            ),
        )

    def _log(
        self,
        db: sqlite3.Connection,
        now: float,
        device_id: str,
        kind: EventKind,
        *,
        fingerprint: str | None = None,
        old_fingerprint: str | None = None,
        address: str | None = None,
        detail: str = "",
        trust_after: TrustLevel | None = None,
    ) -> None:
        db.execute(
            "INSERT INTO events (time, device_id, kind, fingerprint, old_fingerprint, address, detail,"
            " trust_after) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                now,
                device_id,
                kind.value,
                fingerprint,
                old_fingerprint,
                address,
                detail,
                trust_after.value if trust_after else None,
            ),
        )

    def verify_device(
        self, device_id: str, name: str, fingerprint: str, now: float, address: str | None = None
    ) -> Decision:
        """The one decision point, for a device that has proven `fingerprint` in a handshake."""
        with self._transaction() as db:
            previous = self.get(device_id)
            restore = TrustLevel.TOFU
            if previous is not None and previous.trust is TrustLevel.KEY_CHANGED:
                restore = self._level_before_change(db, device_id)
            decision = policy.decide(previous, device_id, name, fingerprint, now, self.policy, address, restore)
            self._put(db, decision.record)
            if self._repeats_refusal(db, device_id, decision.event, fingerprint):
                return decision
            old = previous.fingerprint if previous and previous.fingerprint != fingerprint else None
            self._log(
                db,
                now,
                device_id,
                decision.event,
                fingerprint=fingerprint,
                old_fingerprint=old,
                address=address,
                trust_after=decision.level,
                detail=f"name={name}" if decision.event is EventKind.FIRST_USE else "",
            )
        return decision

    def _level_before_change(self, db: sqlite3.Connection, device_id: str) -> TrustLevel:
        """The last level that allowed sync, from the log (`tofu` if none is recorded)."""
        row = db.execute(
            "SELECT trust_after FROM events WHERE device_id = ? AND trust_after IN ('tofu', 'verified')"
            " ORDER BY seq DESC LIMIT 1",
            (device_id,),
        ).fetchone()
        return TrustLevel(row["trust_after"]) if row else TrustLevel.TOFU

    def _repeats_refusal(self, db: sqlite3.Connection, device_id: str, kind: EventKind, fingerprint: str) -> bool:
        """True if this refusal was already logged since the device's last other decision.

        A refused peer retries, and an impersonator may alternate keys: one entry per distinct
        (kind, key) keeps the log bounded and readable, while every distinct key still counts for
        the anomaly rules. The row's last_seen still moves.
        """
        if kind not in (EventKind.REFUSED, EventKind.KEY_CHANGED):
            return False
        row = db.execute(
            "SELECT 1 FROM events WHERE device_id = ? AND kind = ? AND fingerprint = ? AND seq > COALESCE("
            " (SELECT MAX(seq) FROM events WHERE device_id = ? AND kind NOT IN ('refused', 'key_changed', 'anomaly')),"
            " 0) LIMIT 1",
            (device_id, kind.value, fingerprint, device_id),
        ).fetchone()
        return row is not None

    def change(
        self,
        device: str,
        now: float,
        transition: Callable[[DeviceRecord], tuple[DeviceRecord, EventKind]],
        detail: str = "",
    ) -> DeviceRecord:
        """Apply a person's transition in one transaction (read, check, write, log)."""
        with self._transaction() as db:
            record = self.resolve(device)
            new, kind = transition(record)
            self._put(db, new)
            old = record.fingerprint if record.fingerprint != new.fingerprint else None
            self._log(
                db,
                now,
                record.device_id,
                kind,
                fingerprint=new.fingerprint,
                old_fingerprint=old,
                detail=detail,
                trust_after=new.trust,
            )
        return new

    def verify(self, device: str, now: float, detail: str = "") -> DeviceRecord:
        """Mark the device's pinned key as checked by a person."""
        return self.change(device, now, policy.verify, detail)

    def revoke(self, device: str, now: float, note: str = "revoked by user") -> DeviceRecord:
        """Block the device whatever key it shows."""
        return self.change(device, now, lambda r: policy.revoke(r, note), note)

    def retrust(self, device: str, now: float) -> DeviceRecord:
        """Pin the key offered after a change, or lift a block."""
        return self.change(device, now, policy.retrust)

    def accept(self, device: str, now: float) -> DeviceRecord:
        """Admit a device that waits for approval."""
        return self.change(device, now, policy.accept)

    def forget(self, device: str, now: float) -> DeviceRecord:
        """Delete the device's record; it is a stranger on next contact. The log keeps its history."""
        with self._transaction() as db:
            record = self.resolve(device)
            db.execute("DELETE FROM devices WHERE device_id = ?", (record.device_id,))
            self._log(
                db,
                now,
                record.device_id,
                EventKind.FORGOTTEN,
                fingerprint=record.fingerprint,
                trust_after=TrustLevel.UNKNOWN,
            )
        return record

    def add(self, device_id: str, name: str, fingerprint: str, now: float, detail: str = "") -> DeviceRecord:
        """Pre-pin a device as `verified` before first contact (a scanned URI or an import)."""
        with self._transaction() as db:
            existing = self.get(device_id)
            if existing is not None and existing.fingerprint != fingerprint:
                raise UserError(
                    f"device {device_id} is already pinned to another key; if the new one is right, "
                    f"run `tofu-agent trust forget {device_id}` first"
                )
            record = existing or DeviceRecord(device_id, name, fingerprint, TrustLevel.VERIFIED, now, now)
            record = replace(record, trust=TrustLevel.VERIFIED, pending_fingerprint=None, notes="")
            self._put(db, record)
            self._log(
                db,
                now,
                device_id,
                EventKind.ADDED,
                fingerprint=fingerprint,
                detail=detail,
                trust_after=TrustLevel.VERIFIED,
            )
        return record

    def record_event(
        self,
        device_id: str,
        kind: EventKind,
        now: float,
        *,
        fingerprint: str | None = None,
        old_fingerprint: str | None = None,
        address: str | None = None,
        detail: str = "",
    ) -> None:
        """Append an event that changes no row (an anomaly, a cleared anomaly)."""
        with self._transaction() as db:
            record = self.get(device_id)
            self._log(
                db,
                now,
                device_id,
                kind,
                fingerprint=fingerprint,
                old_fingerprint=old_fingerprint,
                address=address,
                detail=detail,
                trust_after=record.trust if record else None,
            )

    def rotate_pin(self, device_id: str, new_fingerprint: str, now: float, detail: str = "") -> DeviceRecord:
        """Move the pin along a verified rotation chain, keeping the trust level."""
        with self._transaction() as db:
            record = self.get(device_id)
            if record is None:
                raise UnknownDeviceError(f"no known device {device_id}")
            new = replace(record, fingerprint=new_fingerprint, pending_fingerprint=None, last_seen=now)
            self._put(db, new)
            self._log(
                db,
                now,
                device_id,
                EventKind.ROTATED,
                fingerprint=new_fingerprint,
                old_fingerprint=record.fingerprint,
                detail=detail,
                trust_after=new.trust,
            )
        return new

    def count_sync(self, device_id: str, now: float) -> None:
        """Count one completed sync session with the device."""
        with self._transaction() as db:
            db.execute(
                "UPDATE devices SET sync_count = sync_count + 1, last_seen = MAX(last_seen, ?) WHERE device_id = ?",
                (now, device_id),
            )

    def import_record(self, record: DeviceRecord, now: float) -> str:
        """Merge one exported record; returns what happened (`added`, `updated`, `kept`, `conflict`).

        A pin is never replaced by an import: a different key for a known device is a conflict the
        person resolves with `trust forget` first. A known key may be raised to `verified` or
        `revoked`, never lowered.
        """
        with self._transaction() as db:
            existing = self.get(record.device_id)
            if existing is None:
                stored, outcome = replace(record, pending_fingerprint=None), "added"
            elif existing.fingerprint != record.fingerprint:
                return "conflict"
            elif _IMPORT_RANK.get(record.trust, 0) > _IMPORT_RANK.get(existing.trust, 0):
                pending = None if record.trust is TrustLevel.VERIFIED else existing.pending_fingerprint
                stored, outcome = replace(existing, trust=record.trust, pending_fingerprint=pending), "updated"
            else:
                return "kept"
            self._put(db, stored)
            self._log(
                db,
                now,
                record.device_id,
                EventKind.ADDED,
                fingerprint=record.fingerprint,
                detail="imported",
                trust_after=record.trust,
            )
            return outcome
