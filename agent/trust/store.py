"""The SQLite trust store: one row per device and an append-only event log (WAL, multi-process).

Every change runs in a `BEGIN IMMEDIATE` transaction that reads the row, applies a pure
transition from `agent.trust.policy`, writes the row and appends the event, so the agent and CLI
commands can change the store at the same time without losing an update.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.errors import AmbiguousDeviceError, TrustStoreError, UnknownDeviceError
from agent.trust import introduction, policy, window
from agent.trust.introduction import Introduce, Introduced
from agent.trust.model import (
    Decision,
    DeviceRecord,
    EventKind,
    Outcome,
    Review,
    Reviewer,
    TrustEvent,
    TrustLevel,
    TrustPolicy,
)

log = logging.getLogger(__name__)

# 1: the first schema. 2: devices.introducer (household introductions), added to a version-1
# table by `_migrate`.
SCHEMA_VERSION = 2
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
    pending_fingerprint TEXT,
    introducer INTEGER NOT NULL DEFAULT 0
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
    "device_id, name, fingerprint, trust, first_seen, last_seen, sync_count, addresses, notes, pending_fingerprint,"
    " introducer"
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
        introducer=bool(row["introducer"]),
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
                self._migrate(self._db)
        except sqlite3.Error as exc:
            raise TrustStoreError(f"cannot open trust store {path}: {exc}") from exc

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Bring a table written by an older version up to SCHEMA_VERSION, in the opening transaction.

        Decided by the columns present, not only by user_version: an older agent opening this
        store sets user_version back to its own number but keeps the columns it does not know.
        """
        columns = {row["name"] for row in db.execute("PRAGMA table_info(devices)").fetchall()}
        if "introducer" not in columns:  # version 1: no household introductions yet
            db.execute("ALTER TABLE devices ADD COLUMN introducer INTEGER NOT NULL DEFAULT 0")
            log.info("trust store: added the introducer column (schema version 1 -> 2)")
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version < SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

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
            f"INSERT OR REPLACE INTO devices ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                int(r.introducer),
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
    ) -> TrustEvent:
        cursor = db.execute(
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
        seq = cursor.lastrowid
        assert seq is not None
        return TrustEvent(seq, now, device_id, kind, fingerprint, old_fingerprint, address, detail, trust_after)

    def verify_device(
        self,
        device_id: str,
        name: str,
        fingerprint: str,
        now: float,
        address: str | None = None,
        follow: policy.ChainFollower | None = None,
    ) -> Decision:
        """The one decision point, for a device that has proven `fingerprint` in a handshake."""
        decision = self.handshake(device_id, name, fingerprint, now, address, follow=follow).decision
        assert decision is not None
        return decision

    def handshake(
        self,
        device_id: str,
        name: str,
        fingerprint: str,
        now: float,
        address: str | None = None,
        *,
        follow: policy.ChainFollower | None = None,
        review: Reviewer | None = None,
        window_open: bool = False,
        window_reason: str = "",
    ) -> Outcome:
        """Decide on a device that proved `fingerprint` (following a signed rotation chain from its
        pin with `follow`), then let `review` (the anomaly rules) log anomalies and block devices.

        All of it is one transaction that reads the log once: a crash leaves either nothing or the
        moved pin, the decision, its log entry and the review's entries together. An ordinary
        reconnect writes only the row (last_seen, name, addresses), not the log (`worth_logging`).
        """
        with self._transaction() as db:
            events = self._read_log(db)
            previous = self.get(device_id)
            restore = TrustLevel.TOFU
            if previous is not None and previous.trust is TrustLevel.KEY_CHANGED:
                restore = policy.restore_level(events, device_id)
            decision = policy.decide(
                previous, device_id, name, fingerprint, now, self.policy, address, restore, follow, window_open,
                window_reason,
            )  # fmt: skip
            self._put(db, decision.record)
            if decision.event is EventKind.FIRST_USE and decision.level is TrustLevel.PENDING:
                self._drop_pending(db, now, keep=device_id)
            if policy.worth_logging(decision, fingerprint, events):
                old = previous.fingerprint if previous and previous.fingerprint != fingerprint else None
                detail = decision.detail or (f"name={name}" if decision.event is EventKind.FIRST_USE else "")
                entry = self._log(
                    db,
                    now,
                    device_id,
                    decision.event,
                    fingerprint=fingerprint,
                    old_fingerprint=old,
                    address=address,
                    trust_after=decision.level,
                    detail=detail,
                )
                events.append(entry)
            return self._review(db, decision, review, events, now)

    def _drop_pending(self, db: sqlite3.Connection, now: float, keep: str | None = None) -> list[str]:
        """Forget pending requests past 30 days or past the 64 newest, in the caller's transaction."""
        drop = [d for d in window.pending_to_drop(self.all(), now) if d != keep]
        for device_id in drop:
            db.execute("DELETE FROM devices WHERE device_id = ?", (device_id,))
            self._log(
                db, now, device_id, EventKind.FORGOTTEN, trust_after=TrustLevel.UNKNOWN,
                detail="pending request dropped (too old, or too many waiting)",
            )  # fmt: skip
        if drop:
            log.warning("dropped %d pending device request(s): too old or too many waiting", len(drop))
        return drop

    def expire_pending(self, now: float) -> list[str]:
        """Forget pending requests past 30 days or past the 64 newest (at start and daily)."""
        with self._transaction() as db:
            return self._drop_pending(db, now)

    def review(self, review: Reviewer, now: float) -> Outcome:
        """Run the anomaly rules alone (no handshake) in one transaction that reads the log once."""
        with self._transaction() as db:
            return self._review(db, None, review, self._read_log(db), now)

    def _read_log(self, db: sqlite3.Connection) -> list[TrustEvent]:
        """The whole log, oldest first: the one read of it a decision makes."""
        return [_row_to_event(r) for r in db.execute("SELECT * FROM events ORDER BY seq").fetchall()]

    def _review(
        self,
        db: sqlite3.Connection,
        decision: Decision | None,
        review: Reviewer | None,
        events: list[TrustEvent],
        now: float,
    ) -> Outcome:
        records = self.all()
        found = review(events, records) if review is not None else Review()
        for a in found.anomalies:
            record = self.get(a.device_id)
            trust_after = record.trust if record else None
            entry = self._log(
                db,
                now,
                a.device_id,
                EventKind.ANOMALY,
                fingerprint=a.fingerprint,
                detail=a.detail,
                trust_after=trust_after,
            )
            events.append(entry)
        blocked: list[str] = []
        for device_id, note in found.block:
            record = self.get(device_id)
            if record is None or record.trust is TrustLevel.REVOKED:
                continue
            new, kind = policy.revoke(record, note)
            self._put(db, new)
            entry = self._log(db, now, device_id, kind, fingerprint=new.fingerprint, detail=note, trust_after=new.trust)
            events.append(entry)
            blocked.append(device_id)
        if blocked:
            records = self.all()
        return Outcome(decision, found, tuple(blocked), tuple(events), tuple(records))

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

    def set_introducer(self, device: str, on: bool, now: float) -> DeviceRecord:
        """Mark the device as an introducer (its signed introductions are applied here), or unmark it."""
        detail = "introducer on: its introductions are applied here" if on else "introducer off"
        return self.change(device, now, lambda r: policy.set_introducer(r, on), detail)

    def introduce(
        self, intro: Introduce, introducer_name: str, now: float, *, introducer_fingerprint: str | None = None
    ) -> Introduced | None:
        """Apply a verified introduction (`introduction.introduce`) and its log entry in one transaction.

        The caller checked the signature against the key the introducer proved on this connection
        (`introducer_fingerprint`). Checked again here, in the transaction, against what a person may
        have changed since: the introducer must still be marked, may sync, and be pinned to that key;
        otherwise nothing changes (None), as when the introduction changes nothing.
        """
        with self._transaction() as db:
            sender = self.get(intro.introducer)
            if sender is None or not sender.introducer or not sender.trust.may_sync:
                return None
            if introducer_fingerprint is not None and sender.fingerprint != introducer_fingerprint:
                return None
            existing = self.get(intro.device_id)
            done = introduction.introduce(existing, intro, introducer_name, now)
            if done is None:
                return None
            self._put(db, done.record)
            pinned = existing.fingerprint if existing is not None and existing.trust is not TrustLevel.UNKNOWN else None
            self._log(
                db,
                now,
                intro.device_id,
                done.event,
                fingerprint=intro.fingerprint,
                old_fingerprint=pinned if pinned != intro.fingerprint else None,
                detail=done.detail,
                trust_after=done.record.trust,
            )
        return done

    def forget(self, device: str, now: float) -> DeviceRecord:
        """Delete the device's record; it is a stranger on next contact. The log keeps its history."""
        with self._transaction() as db:
            record = self.resolve(device)
            _, kind = policy.forget(record)
            db.execute("DELETE FROM devices WHERE device_id = ?", (record.device_id,))
            self._log(db, now, record.device_id, kind, fingerprint=record.fingerprint, trust_after=TrustLevel.UNKNOWN)
        return record

    def add(self, device_id: str, name: str, fingerprint: str, now: float, detail: str = "") -> DeviceRecord:
        """Pre-pin a device as `verified` before first contact (a scanned URI or an import)."""
        return self._pin(device_id, now, lambda r: policy.add(r, device_id, name, fingerprint, now), detail)

    def pair(self, device_id: str, name: str, fingerprint: str, now: float, detail: str = "") -> DeviceRecord:
        """A device proved `fingerprint` in a pairing: add it, or verify the known one (`policy.pair`)."""
        return self._pin(device_id, now, lambda r: policy.pair(r, device_id, name, fingerprint, now), detail)

    def _pin(
        self,
        device_id: str,
        now: float,
        transition: Callable[[DeviceRecord | None], tuple[DeviceRecord, EventKind]],
        detail: str,
    ) -> DeviceRecord:
        with self._transaction() as db:
            existing = self.get(device_id)
            record, kind = transition(existing)
            self._put(db, record)
            old = existing.fingerprint if existing and existing.fingerprint != record.fingerprint else None
            self._log(
                db,
                now,
                device_id,
                kind,
                fingerprint=record.fingerprint,
                old_fingerprint=old,
                detail=detail,
                trust_after=record.trust,
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
            stored, outcome = policy.import_record(self.get(record.device_id), record)
            if stored is None:
                return outcome
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
