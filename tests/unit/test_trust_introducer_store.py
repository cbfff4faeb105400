"""Household introductions in the trust store: the introducer flag, its migration, and applying one."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.trust import policy, window
from agent.trust.introduction import Introduce, make
from agent.trust.model import EventKind, TrustLevel, TrustPolicy
from agent.trust.store import SCHEMA_VERSION, TrustStore
from tests.unit.test_handshake import make_identity

NOW = 1_800_000_000.0
DESKTOP = make_identity("desktop")  # the introducer
NEW_ID, NEW_FP, OTHER_FP = "N" * 32, "ab" * 32, "cd" * 32


def store_with_introducer(
    tmp_path: Path, *, introducer: bool = True, level: TrustLevel = TrustLevel.TOFU
) -> TrustStore:
    store = TrustStore(tmp_path / "trust.db", TrustPolicy.WINDOW)
    store.handshake(DESKTOP.device_id, "desktop", DESKTOP.fingerprint, NOW, window_open=True)
    if introducer:
        store.set_introducer(DESKTOP.device_id, True, NOW)
    if level is TrustLevel.REVOKED:
        store.revoke(DESKTOP.device_id, NOW)
    return store


def intro(fp: str = NEW_FP) -> Introduce:
    return make(DESKTOP, NEW_ID, "laptop", fp, int(NOW))


def test_a_fresh_install_window_admits_as_introducer_and_a_window_opened_later_does_not() -> None:
    fresh = policy.decide(
        None, "A" * 32, "a", NEW_FP, NOW, TrustPolicy.WINDOW, window_open=True, window_reason=window.FRESH_INSTALL
    )
    assert fresh.record.introducer and "via=window" in fresh.detail and "introducer=on" in fresh.detail
    later = policy.decide(
        None, "A" * 32, "a", NEW_FP, NOW, TrustPolicy.WINDOW, window_open=True, window_reason=window.OPENED
    )
    assert later.level is TrustLevel.TOFU and not later.record.introducer
    closed = policy.decide(
        None, "A" * 32, "a", NEW_FP, NOW, TrustPolicy.WINDOW, window_open=False, window_reason=window.FRESH_INSTALL
    )
    assert closed.level is TrustLevel.PENDING and not closed.record.introducer


def test_pairing_makes_an_introducer_for_a_new_and_a_known_device() -> None:
    new, _ = policy.pair(None, NEW_ID, "laptop", NEW_FP, NOW)
    assert new.introducer and new.trust is TrustLevel.VERIFIED
    known = policy.decide(None, NEW_ID, "laptop", NEW_FP, NOW, TrustPolicy.AUTO).record
    assert not known.introducer
    paired, _ = policy.pair(known, NEW_ID, "laptop", NEW_FP, NOW)
    assert paired.introducer


def test_the_flag_is_stored_logged_and_survives_other_transitions(tmp_path: Path) -> None:
    with store_with_introducer(tmp_path, introducer=False) as store:
        assert store.get(DESKTOP.device_id).introducer is False  # type: ignore[union-attr]
        on = store.set_introducer(DESKTOP.device_id[:6], True, NOW + 1)
        assert on.introducer and store.get(DESKTOP.device_id) == on
        assert store.events(DESKTOP.device_id, 1)[0].kind is EventKind.INTRODUCER_ON
        assert store.verify(DESKTOP.device_id, NOW + 2).introducer  # a level change keeps it
        off = store.set_introducer(DESKTOP.device_id, False, NOW + 3)
        assert not off.introducer and store.events(DESKTOP.device_id, 1)[0].kind is EventKind.INTRODUCER_OFF


def test_an_introduction_pins_an_unknown_device_with_who_vouched_in_the_log(tmp_path: Path) -> None:
    with store_with_introducer(tmp_path) as store:
        done = store.introduce(intro(), "desktop", NOW + 5, introducer_fingerprint=DESKTOP.fingerprint)
        assert done is not None and done.event is EventKind.FIRST_USE
        record = store.get(NEW_ID)
        assert record is not None and record.trust is TrustLevel.TOFU and record.fingerprint == NEW_FP
        assert not record.introducer  # an introduced device does not introduce until a person says so
        (entry,) = store.events(NEW_ID)
        assert entry.kind is EventKind.FIRST_USE and entry.trust_after is TrustLevel.TOFU
        assert entry.detail == f"via=introduced by desktop ({DESKTOP.device_id[:8]})"
        # the same introduction again changes nothing and logs nothing
        assert store.introduce(intro(), "desktop", NOW + 6) is None
        assert len(store.events(NEW_ID)) == 1
        # revoking the introducer does not revoke whom it introduced
        store.revoke(DESKTOP.device_id, NOW + 7)
        assert store.get(NEW_ID).trust is TrustLevel.TOFU  # type: ignore[union-attr]


def test_an_introduction_naming_another_key_than_the_pin_is_a_key_change(tmp_path: Path) -> None:
    with store_with_introducer(tmp_path) as store:
        store.handshake(NEW_ID, "laptop", OTHER_FP, NOW, window_open=True)
        done = store.introduce(intro(NEW_FP), "desktop", NOW + 5)
        assert done is not None and done.event is EventKind.KEY_CHANGED
        record = store.get(NEW_ID)
        assert record is not None and record.trust is TrustLevel.KEY_CHANGED
        assert record.fingerprint == OTHER_FP and record.pending_fingerprint == NEW_FP  # the pin did not move
        entry = store.events(NEW_ID, 1)[0]
        assert entry.kind is EventKind.KEY_CHANGED and entry.old_fingerprint == OTHER_FP
        assert entry.fingerprint == NEW_FP and "introduced by desktop" in entry.detail


def test_a_pending_device_is_admitted_by_an_introduction(tmp_path: Path) -> None:
    with store_with_introducer(tmp_path) as store:
        store.handshake(NEW_ID, "laptop", NEW_FP, NOW)  # window closed: pending
        assert store.get(NEW_ID).trust is TrustLevel.PENDING  # type: ignore[union-attr]
        done = store.introduce(intro(), "desktop", NOW + 5)
        assert done is not None and done.event is EventKind.ACCEPTED
        assert store.get(NEW_ID).trust is TrustLevel.TOFU  # type: ignore[union-attr]


@pytest.mark.parametrize("case", ["not marked", "revoked", "other key", "unknown"])
def test_nothing_unmarked_or_untrusted_can_introduce(tmp_path: Path, case: str) -> None:
    level = TrustLevel.REVOKED if case == "revoked" else TrustLevel.TOFU
    with store_with_introducer(tmp_path, introducer=case != "not marked", level=level) as store:
        if case == "unknown":
            store.forget(DESKTOP.device_id, NOW)
        fp = OTHER_FP if case == "other key" else DESKTOP.fingerprint
        assert store.introduce(intro(), "desktop", NOW + 5, introducer_fingerprint=fp) is None
        assert store.get(NEW_ID) is None and store.events(NEW_ID) == []


def test_a_version_1_store_gains_the_column_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "trust.db"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE devices (device_id TEXT PRIMARY KEY, name TEXT NOT NULL, fingerprint TEXT NOT NULL,
            trust TEXT NOT NULL, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
            sync_count INTEGER NOT NULL DEFAULT 0, addresses TEXT NOT NULL DEFAULT '[]',
            notes TEXT NOT NULL DEFAULT '', pending_fingerprint TEXT);
        PRAGMA user_version=1;
        """
    )
    db.execute(
        "INSERT INTO devices (device_id, name, fingerprint, trust, first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?)",
        (NEW_ID, "laptop", NEW_FP, "verified", NOW, NOW),
    )
    db.commit()
    db.close()
    with TrustStore(path) as store:
        record = store.get(NEW_ID)
        assert record is not None and record.trust is TrustLevel.VERIFIED and not record.introducer
        assert store.set_introducer(NEW_ID, True, NOW).introducer
    with TrustStore(path) as again:  # opening a migrated store again changes nothing
        assert again.get(NEW_ID).introducer  # type: ignore[union-attr]
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    check.close()
