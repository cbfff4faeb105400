"""The SQLite trust store: round trips, the append-only log, resolving ids, imports, file mode, and
several processes writing at once."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import AmbiguousDeviceError, TrustStoreError, UnknownDeviceError, UserError
from agent.trust.model import DeviceRecord, EventKind, TrustLevel, TrustPolicy
from agent.trust.store import TrustStore

T0 = 1_700_000_000.0
A = "AAAABBBBCCCCDDDDEEEEFFFFGGGGHHHH"
B = "AAAAXBBBCCCCDDDDEEEEFFFFGGGGHHHH"
C = "ZZZZBBBBCCCCDDDDEEEEFFFFGGGGHHHH"


def fp(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


K1, K2, K3 = fp("k1"), fp("k2"), fp("k3")


@pytest.fixture
def store(home: Path) -> Iterator[TrustStore]:
    with TrustStore(home / "trust.db") as s:
        yield s


def kinds(store: TrustStore, device: str | None = None) -> list[EventKind]:
    """Event kinds oldest first."""
    return [e.kind for e in reversed(store.events(device))]


# -- round trips ----------------------------------------------------------------------------------


def test_record_round_trips_through_the_file(home: Path) -> None:
    path = home / "trust.db"
    with TrustStore(path) as s:
        decision = s.verify_device(A, "laptop", K1, T0, "192.168.1.4")
        s.count_sync(A, T0 + 5)
    with TrustStore(path) as s:
        got = s.get(A)
    assert got == DeviceRecord(
        device_id=A,
        name="laptop",
        fingerprint=K1,
        trust=TrustLevel.TOFU,
        first_seen=T0,
        last_seen=T0 + 5,
        sync_count=1,
        addresses=("192.168.1.4",),
        notes="",
        pending_fingerprint=None,
    )
    assert decision.record == DeviceRecord(A, "laptop", K1, TrustLevel.TOFU, T0, T0, 0, ("192.168.1.4",))


def test_all_lists_devices_by_name(store: TrustStore) -> None:
    store.verify_device(A, "zebra", K1, T0)
    store.verify_device(B, "apple", K2, T0)
    store.verify_device(C, "mango", K3, T0)
    assert [r.name for r in store.all()] == ["apple", "mango", "zebra"]
    assert store.get("NOSUCHDEVICE") is None


def test_pending_fingerprint_round_trips(store: TrustStore) -> None:
    store.verify_device(A, "laptop", K1, T0)
    store.verify_device(A, "laptop", K2, T0 + 1)
    got = store.get(A)
    assert got is not None
    assert (got.trust, got.fingerprint, got.pending_fingerprint) == (TrustLevel.KEY_CHANGED, K1, K2)


def test_count_sync_counts_and_keeps_last_seen_monotonic(store: TrustStore) -> None:
    store.verify_device(A, "laptop", K1, T0)
    store.count_sync(A, T0 + 10)
    store.count_sync(A, T0 + 3)
    got = store.get(A)
    assert got is not None
    assert (got.sync_count, got.last_seen) == (2, T0 + 10)
    store.count_sync(B, T0)  # unknown device: nothing to count, nothing created
    assert store.get(B) is None


# -- the event log --------------------------------------------------------------------------------


def test_every_decision_is_logged_with_old_and_new_fingerprints(store: TrustStore) -> None:
    store.verify_device(A, "laptop", K1, T0, "10.0.0.1")  # first use
    store.verify_device(A, "laptop", K1, T0 + 1)  # an ordinary reconnect: the row only
    store.verify_device(A, "laptop", K2, T0 + 2)  # key change
    store.verify_device(A, "laptop", K1, T0 + 3)  # the pinned key again: re-admitted
    store.verify_device(A, "laptop", K2, T0 + 3.5)  # key change again (a new decision since)
    store.retrust(A, T0 + 4)
    store.verify(A, T0 + 5, "safety number")
    store.revoke(A, T0 + 6, "stolen")
    store.verify_device(A, "laptop", K3, T0 + 7)  # refused (revoked)
    store.forget(A, T0 + 8)
    events = list(reversed(store.events()))
    summary = [(e.kind, e.fingerprint, e.old_fingerprint, e.trust_after, e.time) for e in events]
    assert summary == [
        (EventKind.FIRST_USE, K1, None, TrustLevel.TOFU, T0),
        (EventKind.KEY_CHANGED, K2, K1, TrustLevel.KEY_CHANGED, T0 + 2),
        (EventKind.MATCH, K1, None, TrustLevel.TOFU, T0 + 3),
        (EventKind.KEY_CHANGED, K2, K1, TrustLevel.KEY_CHANGED, T0 + 3.5),
        (EventKind.RETRUSTED, K2, K1, TrustLevel.TOFU, T0 + 4),
        (EventKind.VERIFIED, K2, None, TrustLevel.VERIFIED, T0 + 5),
        (EventKind.REVOKED, K2, None, TrustLevel.REVOKED, T0 + 6),
        (EventKind.REFUSED, K3, K2, TrustLevel.REVOKED, T0 + 7),
        (EventKind.FORGOTTEN, K2, None, TrustLevel.UNKNOWN, T0 + 8),
    ]
    assert events[0].address == "10.0.0.1"
    assert events[0].detail == "name=laptop"
    assert events[5].detail == "safety number"
    assert events[6].detail == "stolen"
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert all(e.device_id == A for e in events)


def test_a_refused_peer_retrying_is_logged_once_but_still_seen(store: TrustStore) -> None:
    store.verify_device(A, "laptop", K1, T0)
    for i in range(3):
        assert store.verify_device(A, "laptop", K2, T0 + 1 + i).level is TrustLevel.KEY_CHANGED
    store.revoke(A, T0 + 10)
    for i in range(3):
        store.verify_device(A, "laptop", K3, T0 + 11 + i)
    store.verify_device(A, "laptop", K1, T0 + 20)  # another key: a new refusal
    store.verify_device(A, "laptop", K3, T0 + 21)  # and back: already logged since the revoke
    assert [(e.kind, e.fingerprint) for e in reversed(store.events())] == [
        (EventKind.FIRST_USE, K1),
        (EventKind.KEY_CHANGED, K2),
        (EventKind.REVOKED, K1),
        (EventKind.REFUSED, K3),
        (EventKind.REFUSED, K1),
    ]
    got = store.get(A)
    assert got is not None
    assert got.last_seen == T0 + 21


def test_accept_is_logged(home: Path) -> None:
    with TrustStore(home / "trust.db", TrustPolicy.MANUAL) as s:
        assert s.verify_device(A, "laptop", K1, T0).level is TrustLevel.PENDING
        assert s.verify_device(A, "laptop", K1, T0 + 1).level is TrustLevel.PENDING
        assert s.accept(A, T0 + 2).trust is TrustLevel.TOFU
        assert s.verify_device(A, "laptop", K1, T0 + 3).may_sync
        # The first connection after the accept is an ordinary one: the row moves, the log does not.
        assert kinds(s) == [EventKind.FIRST_USE, EventKind.REFUSED, EventKind.ACCEPTED]


def test_events_newest_first_limit_and_device_filter(store: TrustStore) -> None:
    for i in range(3):
        store.verify_device(A, "a", K1, T0 + i)
        store.verify_device(B, "b", K2, T0 + i)
        store.revoke(B, T0 + i)
        store.retrust(B, T0 + i)
    events = store.events()
    assert [e.seq for e in events] == sorted((e.seq for e in events), reverse=True)
    assert len(store.events(limit=2)) == 2
    assert store.events(limit=2) == events[:2]
    only_b = store.events(B)
    assert len(only_b) == 7
    assert {e.device_id for e in only_b} == {B}


def test_record_event_and_a_rotation_are_logged(store: TrustStore) -> None:
    store.verify_device(A, "laptop", K1, T0)
    store.record_event(A, EventKind.ANOMALY, T0 + 1, detail="repeated_key_change")
    rotated = store.verify_device(A, "laptop", K2, T0 + 2, follow=lambda pin: (pin, K2))
    assert (rotated.level, rotated.event, rotated.record.fingerprint) == (TrustLevel.TOFU, EventKind.ROTATED, K2)
    newest, anomaly = store.events(limit=2)
    assert (newest.kind, newest.fingerprint, newest.old_fingerprint) == (EventKind.ROTATED, K2, K1)
    assert (newest.trust_after, newest.detail) == (TrustLevel.TOFU, f"{K1[:16]} -> {K2[:16]}")
    assert (anomaly.kind, anomaly.detail, anomaly.trust_after) == (
        EventKind.ANOMALY,
        "repeated_key_change",
        TrustLevel.TOFU,
    )
    assert store.verify_device(A, "laptop", K2, T0 + 3).event is EventKind.MATCH
    # A chain that does not start at the pin, or does not end at the proven key, moves nothing.
    assert store.verify_device(A, "laptop", K3, T0 + 4, follow=lambda pin: (K1, K3)).event is EventKind.KEY_CHANGED
    assert store.verify_device(B, "other", K2, T0, follow=lambda pin: (pin, K3)).event is EventKind.FIRST_USE


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE events SET kind = 'verified'",
        "UPDATE events SET fingerprint = NULL WHERE seq = 1",
        "DELETE FROM events",
        "DELETE FROM events WHERE seq = 1",
    ],
)
def test_event_log_is_append_only(home: Path, sql: str) -> None:
    path = home / "trust.db"
    with TrustStore(path) as s:
        s.verify_device(A, "laptop", K1, T0)
        before = s.events()
    raw = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            raw.execute(sql)
    finally:
        raw.close()
    with TrustStore(path) as s:
        assert s.events() == before


def test_a_failed_change_writes_nothing(store: TrustStore) -> None:
    store.verify_device(A, "laptop", K1, T0)
    before = (store.get(A), store.events())
    with pytest.raises(UserError, match="no changed key"):
        store.retrust(A, T0 + 1)
    with pytest.raises(UserError, match="not waiting for approval"):
        store.accept(A, T0 + 1)
    with pytest.raises(UnknownDeviceError):
        store.verify("ZZZZ", T0 + 1)
    assert (store.get(A), store.events()) == before
    # The store is still usable after a rolled-back transaction.
    assert store.verify(A, T0 + 2).trust is TrustLevel.VERIFIED


# -- resolving what people type -------------------------------------------------------------------


@pytest.fixture
def three(store: TrustStore) -> TrustStore:
    for device, key in ((A, K1), (B, K2), (C, K3)):
        store.verify_device(device, "dev", key, T0)
    return store


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (A, A),
        (A.lower(), A),
        (f"  {A}\n", A),
        ("AAAAB", A),
        ("aaaab", A),
        ("AaAaX", B),
        ("Z", C),
        ("zzzzbbbbcccc", C),
    ],
)
def test_resolve_exact_prefix_and_case(three: TrustStore, text: str, expected: str) -> None:
    assert three.resolve(text).device_id == expected


@pytest.mark.parametrize("text", ["A", "AAAA", "aaaa"])
def test_resolve_ambiguous(three: TrustStore, text: str) -> None:
    with pytest.raises(AmbiguousDeviceError, match="more than one"):
        three.resolve(text)


@pytest.mark.parametrize("text", ["Q", "AAAAC", A + "X", "", "   ", "%", "_", "A%", "A_AA", "%B", "____", "\\"])
def test_resolve_unknown_and_wildcards_match_nothing(three: TrustStore, text: str) -> None:
    with pytest.raises(UnknownDeviceError):
        three.resolve(text)


def test_resolve_is_used_by_every_person_action(three: TrustStore) -> None:
    assert three.verify("aaaab", T0).device_id == A
    assert three.revoke("aaaax", T0).device_id == B
    assert three.retrust("aaaax", T0).device_id == B
    assert three.forget("z", T0).device_id == C
    with pytest.raises(AmbiguousDeviceError):
        three.revoke("aaaa", T0)
    with pytest.raises(UnknownDeviceError):
        three.forget("%", T0)


# -- forget, add ----------------------------------------------------------------------------------


def test_forget_then_seen_again_is_first_use_even_with_another_key(store: TrustStore) -> None:
    store.verify_device(A, "laptop", K1, T0)
    store.count_sync(A, T0 + 1)
    store.revoke(A, T0 + 2)
    forgotten = store.forget(A, T0 + 3)
    assert forgotten.trust is TrustLevel.REVOKED
    assert store.get(A) is None
    d = store.verify_device(A, "laptop", K2, T0 + 4)
    assert (d.event, d.level, d.record.fingerprint) == (EventKind.FIRST_USE, TrustLevel.TOFU, K2)
    assert (d.record.first_seen, d.record.sync_count) == (T0 + 4, 0)
    # The log keeps the old history.
    assert kinds(store, A) == [
        EventKind.FIRST_USE,
        EventKind.REVOKED,
        EventKind.FORGOTTEN,
        EventKind.FIRST_USE,
    ]


def test_add_pre_pins_as_verified_and_the_same_key_then_matches(store: TrustStore) -> None:
    added = store.add(A, "phone", K1, T0, "added from URI")
    assert (added.trust, added.fingerprint, added.name) == (TrustLevel.VERIFIED, K1, "phone")
    d = store.verify_device(A, "phone", K1, T0 + 1)
    assert (d.level, d.event) == (TrustLevel.VERIFIED, EventKind.MATCH)
    (first,) = store.events()  # the reconnect moved the row, not the log
    assert (first.kind, first.fingerprint, first.detail) == (EventKind.ADDED, K1, "added from URI")


def test_add_then_another_key_is_a_key_change(store: TrustStore) -> None:
    store.add(A, "phone", K1, T0)
    d = store.verify_device(A, "phone", K2, T0 + 1)
    assert (d.level, d.record.fingerprint, d.record.pending_fingerprint) == (TrustLevel.KEY_CHANGED, K1, K2)


def test_add_raises_a_known_device_with_the_same_key(store: TrustStore) -> None:
    store.verify_device(A, "laptop", K1, T0)
    assert store.add(A, "ignored", K1, T0 + 1).trust is TrustLevel.VERIFIED
    got = store.get(A)
    assert got is not None
    assert (got.trust, got.name, got.first_seen) == (TrustLevel.VERIFIED, "laptop", T0)


def test_add_never_replaces_a_pin(store: TrustStore) -> None:
    store.verify_device(A, "laptop", K1, T0)
    before = (store.get(A), store.events())
    with pytest.raises(UserError, match="forget"):
        store.add(A, "laptop", K2, T0 + 1)
    assert (store.get(A), store.events()) == before


# -- import ---------------------------------------------------------------------------------------


def imported(device: str, key: str, trust: TrustLevel, **kw: object) -> DeviceRecord:
    return DeviceRecord(device, "imp", key, trust, T0 - 100, T0 - 50, **kw)  # type: ignore[arg-type]


def test_import_adds_an_unknown_device_as_given(store: TrustStore) -> None:
    record = imported(A, K1, TrustLevel.VERIFIED, sync_count=7, addresses=("10.1.1.1",), notes="n")
    assert store.import_record(record, T0) == "added"
    assert store.get(A) == record
    (event,) = store.events()
    assert (event.kind, event.fingerprint, event.detail, event.trust_after, event.time) == (
        EventKind.ADDED,
        K1,
        "imported",
        TrustLevel.VERIFIED,
        T0,
    )


def test_import_drops_a_pending_fingerprint_on_a_new_device(store: TrustStore) -> None:
    assert store.import_record(imported(A, K1, TrustLevel.TOFU, pending_fingerprint=K2), T0) == "added"
    got = store.get(A)
    assert got is not None
    assert got.pending_fingerprint is None


@pytest.mark.parametrize(
    ("local", "incoming", "outcome", "after"),
    [
        (TrustLevel.TOFU, TrustLevel.VERIFIED, "updated", TrustLevel.VERIFIED),
        (TrustLevel.TOFU, TrustLevel.REVOKED, "updated", TrustLevel.REVOKED),
        (TrustLevel.VERIFIED, TrustLevel.REVOKED, "updated", TrustLevel.REVOKED),
        (TrustLevel.PENDING, TrustLevel.VERIFIED, "updated", TrustLevel.VERIFIED),
        (TrustLevel.TOFU, TrustLevel.TOFU, "kept", TrustLevel.TOFU),
        (TrustLevel.TOFU, TrustLevel.PENDING, "kept", TrustLevel.TOFU),
        (TrustLevel.PENDING, TrustLevel.TOFU, "kept", TrustLevel.PENDING),
        (TrustLevel.VERIFIED, TrustLevel.TOFU, "kept", TrustLevel.VERIFIED),
        (TrustLevel.VERIFIED, TrustLevel.VERIFIED, "kept", TrustLevel.VERIFIED),
        (TrustLevel.REVOKED, TrustLevel.VERIFIED, "kept", TrustLevel.REVOKED),
        (TrustLevel.REVOKED, TrustLevel.TOFU, "kept", TrustLevel.REVOKED),
    ],
)
def test_import_raises_but_never_lowers(
    home: Path, local: TrustLevel, incoming: TrustLevel, outcome: str, after: TrustLevel
) -> None:
    pol = TrustPolicy.MANUAL if local is TrustLevel.PENDING else TrustPolicy.AUTO
    with TrustStore(home / "trust.db", pol) as s:
        s.verify_device(A, "laptop", K1, T0)
        if local is TrustLevel.VERIFIED:
            s.verify(A, T0)
        elif local is TrustLevel.REVOKED:
            s.revoke(A, T0)
        before = s.get(A)
        n_events = len(s.events())
        assert s.import_record(imported(A, K1, incoming), T0 + 1) == outcome
        got = s.get(A)
        assert got is not None
        assert got.trust is after
        assert before is not None
        # Only the level may change; the local history (times, counts, name) stays.
        assert (got.fingerprint, got.first_seen, got.last_seen, got.name) == (K1, T0, T0, "laptop")
        assert len(s.events()) == n_events + (1 if outcome == "updated" else 0)


@pytest.mark.parametrize("incoming", [TrustLevel.TOFU, TrustLevel.VERIFIED, TrustLevel.REVOKED])
def test_import_of_another_key_is_a_conflict_and_keeps_the_pin(store: TrustStore, incoming: TrustLevel) -> None:
    store.verify_device(A, "laptop", K1, T0)
    before = (store.get(A), store.events())
    assert store.import_record(imported(A, K2, incoming), T0 + 1) == "conflict"
    assert (store.get(A), store.events()) == before


def test_import_verifying_a_changed_device_drops_the_offered_key(store: TrustStore) -> None:
    store.verify_device(A, "laptop", K1, T0)
    store.verify_device(A, "laptop", K2, T0 + 1)
    assert store.import_record(imported(A, K1, TrustLevel.VERIFIED), T0 + 2) == "updated"
    got = store.get(A)
    assert got is not None
    assert (got.trust, got.fingerprint, got.pending_fingerprint) == (TrustLevel.VERIFIED, K1, None)
    # ... so a later retrust cannot swap in a key nobody verified.
    with pytest.raises(UserError):
        store.retrust(A, T0 + 3)


# -- the file -------------------------------------------------------------------------------------


def test_trust_db_is_private_whatever_the_umask(home: Path) -> None:
    old = os.umask(0o022)
    try:
        with TrustStore(home / "trust.db") as s:
            s.verify_device(A, "laptop", K1, T0)
    finally:
        os.umask(old)
    assert stat.S_IMODE((home / "trust.db").stat().st_mode) == 0o600


def test_an_existing_loose_trust_db_is_tightened(home: Path) -> None:
    path = home / "trust.db"
    TrustStore(path).close()
    path.chmod(0o644)
    TrustStore(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_store_uses_wal(home: Path) -> None:
    with TrustStore(home / "trust.db"):
        raw = sqlite3.connect(home / "trust.db")
        try:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            raw.close()


def test_a_file_that_is_not_a_database_is_a_trust_store_error(home: Path) -> None:
    path = home / "trust.db"
    path.write_bytes(b"this is not sqlite, just some text that is long enough " * 40)
    with pytest.raises(TrustStoreError, match=r"trust\.db"):
        TrustStore(path)


def test_a_missing_directory_is_a_trust_store_error(home: Path) -> None:
    with pytest.raises(TrustStoreError):
        TrustStore(home / "no" / "such" / "trust.db")


# -- several processes at once --------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from agent.trust.store import TrustStore

    path, device, key, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    store = TrustStore(Path(path))
    print("ready", flush=True)
    sys.stdin.readline()  # the start signal: every worker begins at once
    for i in range(n):
        decision = store.verify_device(device, "shared", key, 1000.0 + i)
        assert decision.may_sync, decision
        store.count_sync(device, 1000.0 + i)
    store.close()
    print("done", flush=True)
    """
)


def _run_workers(path: Path, jobs: list[tuple[str, str]], n: int) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(path), device, key, str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for device, key in jobs
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            assert out.strip() == "done"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_concurrent_writers_on_one_device_lose_nothing(home: Path) -> None:
    path = home / "trust.db"
    n, workers = 200, 3
    _run_workers(path, [(A, K1)] * workers, n)
    with TrustStore(path) as s:
        got = s.get(A)
        assert got is not None
        assert got.sync_count == n * workers
        assert got.trust is TrustLevel.TOFU
        assert got.last_seen == 1000.0 + n - 1
        events = s.events()
    # One first use; every later handshake was an ordinary reconnect (the row, not the log).
    assert [e.kind for e in events] == [EventKind.FIRST_USE]


def test_concurrent_writers_on_several_devices_lose_nothing(home: Path) -> None:
    path = home / "trust.db"
    n = 150
    _run_workers(path, [(A, K1), (B, K2), (C, K3)], n)
    with TrustStore(path) as s:
        assert {r.device_id: r.sync_count for r in s.all()} == {A: n, B: n, C: n}
        assert {r.device_id: r.last_seen for r in s.all()} == {A: 1000.0 + n - 1, B: 1000.0 + n - 1, C: 1000.0 + n - 1}
        for device in (A, B, C):
            assert [e.kind for e in s.events(device)] == [EventKind.FIRST_USE]
