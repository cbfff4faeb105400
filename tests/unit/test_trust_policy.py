"""Every transition of the trust table, as pure functions and through the store.

The table in `agent/trust/policy.py` is restated here as data (`DECIDE_TABLE`), so a change to one
without the other fails a test; a hypothesis state machine then drives random sequences of
handshakes and people's decisions through a real store and checks the invariants that make TOFU
worth having.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from agent.errors import UnknownDeviceError, UserError
from agent.trust import policy
from agent.trust.model import DeviceRecord, EventKind, TrustLevel, TrustPolicy
from agent.trust.store import TrustStore
from testkit.homes import new_home

DEV = "AAAABBBBCCCCDDDDEEEEFFFFGGGGHHHH"
T0 = 1_700_000_000.0


def fp(seed: str | bytes) -> str:
    """A fingerprint-shaped string: SHA-256 of `seed`."""
    data = seed.encode() if isinstance(seed, str) else seed
    return hashlib.sha256(data).hexdigest()


OLD = fp("old key")
NEW = fp("new key")
THIRD = fp("third key")


def rec(trust: TrustLevel, *, pending: str | None = None, addresses: tuple[str, ...] = ()) -> DeviceRecord:
    return DeviceRecord(
        device_id=DEV,
        name="laptop",
        fingerprint=OLD,
        trust=trust,
        first_seen=T0,
        last_seen=T0,
        sync_count=5,
        addresses=addresses,
        pending_fingerprint=pending,
    )


KNOWN_LEVELS = [lv for lv in TrustLevel if lv is not TrustLevel.UNKNOWN]


# -- the seed's key-change test -------------------------------------------------------------------


def test_key_change_detection(home: Path) -> None:
    """The second seed design's test: first connection, then another key gives KeyChanged."""
    key1 = b"original_key"
    key2 = b"different_key"
    with TrustStore(home / "trust.db") as store:
        first = store.verify_device("device", "Test", fp(key1), T0)
        assert first.level is TrustLevel.TOFU

        second = store.verify_device("device", "Test", fp(key2), T0 + 1)
        assert second.level is TrustLevel.KEY_CHANGED
        assert not second.may_sync
        # The old pin is kept; the new key waits as the pending fingerprint.
        stored = store.get("device")
        assert stored is not None
        assert stored.trust is TrustLevel.KEY_CHANGED
        assert stored.fingerprint == fp(key1)
        assert stored.pending_fingerprint == fp(key2)


# -- first sight ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pol", "level"),
    [
        (TrustPolicy.AUTO, TrustLevel.TOFU),
        (TrustPolicy.MANUAL, TrustLevel.PENDING),
        (TrustPolicy.CODE, TrustLevel.PENDING),
    ],
)
def test_first_sight_under_each_policy(pol: TrustPolicy, level: TrustLevel) -> None:
    d = policy.decide(None, DEV, "laptop", OLD, T0, pol, "10.0.0.5")
    assert d.level is level
    assert d.event is EventKind.FIRST_USE
    assert d.previous is None
    assert d.may_sync is (level is TrustLevel.TOFU)
    assert d.record == DeviceRecord(
        device_id=DEV,
        name="laptop",
        fingerprint=OLD,
        trust=level,
        first_seen=T0,
        last_seen=T0,
        sync_count=0,
        addresses=("10.0.0.5",),
        notes=d.record.notes,
        pending_fingerprint=None,
    )
    if level is TrustLevel.PENDING:
        assert pol.value in d.record.notes
    else:
        assert d.record.notes == ""


def test_first_sight_without_address_stores_none() -> None:
    d = policy.decide(None, DEV, "laptop", OLD, T0, TrustPolicy.AUTO)
    assert d.record.addresses == ()


def test_a_record_at_level_unknown_is_first_sight() -> None:
    d = policy.decide(rec(TrustLevel.UNKNOWN), DEV, "laptop", NEW, T0 + 5, TrustPolicy.AUTO)
    assert d.event is EventKind.FIRST_USE
    assert d.level is TrustLevel.TOFU
    assert d.record.fingerprint == NEW


# -- a known device proves a key: the whole table -------------------------------------------------

# (level before, pending before, key shown) -> (level after, event, pending after)
DECIDE_TABLE: list[tuple[TrustLevel, str | None, str, TrustLevel, EventKind, str | None]] = [
    (TrustLevel.TOFU, None, OLD, TrustLevel.TOFU, EventKind.MATCH, None),
    (TrustLevel.TOFU, None, NEW, TrustLevel.KEY_CHANGED, EventKind.KEY_CHANGED, NEW),
    (TrustLevel.VERIFIED, None, OLD, TrustLevel.VERIFIED, EventKind.MATCH, None),
    (TrustLevel.VERIFIED, None, NEW, TrustLevel.KEY_CHANGED, EventKind.KEY_CHANGED, NEW),
    (TrustLevel.PENDING, None, OLD, TrustLevel.PENDING, EventKind.REFUSED, None),
    (TrustLevel.PENDING, None, NEW, TrustLevel.KEY_CHANGED, EventKind.KEY_CHANGED, NEW),
    # key_changed: the pinned key again re-admits the device (as OpenSSH's known_hosts would) and
    # drops the offered key; another new key updates pending.
    (TrustLevel.KEY_CHANGED, NEW, OLD, TrustLevel.TOFU, EventKind.MATCH, None),
    (TrustLevel.KEY_CHANGED, NEW, NEW, TrustLevel.KEY_CHANGED, EventKind.KEY_CHANGED, NEW),
    (TrustLevel.KEY_CHANGED, NEW, THIRD, TrustLevel.KEY_CHANGED, EventKind.KEY_CHANGED, THIRD),
    # revoked stays revoked whatever key is shown, and the offered key is not even recorded.
    (TrustLevel.REVOKED, None, OLD, TrustLevel.REVOKED, EventKind.REFUSED, None),
    (TrustLevel.REVOKED, None, NEW, TrustLevel.REVOKED, EventKind.REFUSED, None),
    (TrustLevel.REVOKED, NEW, THIRD, TrustLevel.REVOKED, EventKind.REFUSED, NEW),
]


@pytest.mark.parametrize("pol", list(TrustPolicy))
@pytest.mark.parametrize(("before", "pending", "key", "after", "event", "pending_after"), DECIDE_TABLE)
def test_decide_table(
    pol: TrustPolicy,
    before: TrustLevel,
    pending: str | None,
    key: str,
    after: TrustLevel,
    event: EventKind,
    pending_after: str | None,
) -> None:
    old = rec(before, pending=pending)
    d = policy.decide(old, DEV, "laptop", key, T0 + 10, pol)
    assert (d.level, d.event) == (after, event)
    assert d.record.trust is after
    assert d.record.fingerprint == OLD, "the pin never moves in a handshake"
    assert d.record.pending_fingerprint == pending_after
    assert d.previous == old
    assert d.may_sync is (after in (TrustLevel.TOFU, TrustLevel.VERIFIED))
    # Only the pinned key lets a device sync.
    if d.may_sync:
        assert key == d.record.fingerprint
    # What a handshake never touches.
    assert (d.record.first_seen, d.record.sync_count, d.record.device_id) == (T0, 5, DEV)
    assert d.record.last_seen == T0 + 10


def test_decide_table_covers_every_known_level() -> None:
    assert {row[0] for row in DECIDE_TABLE} == set(KNOWN_LEVELS)


def test_match_updates_name_but_an_empty_name_keeps_the_old_one() -> None:
    d = policy.decide(rec(TrustLevel.TOFU), DEV, "new name", OLD, T0 + 1, TrustPolicy.AUTO)
    assert d.record.name == "new name"
    d = policy.decide(rec(TrustLevel.TOFU), DEV, "", OLD, T0 + 1, TrustPolicy.AUTO)
    assert d.record.name == "laptop"


def test_last_seen_never_goes_backwards() -> None:
    d = policy.decide(rec(TrustLevel.TOFU), DEV, "laptop", OLD, T0 - 100, TrustPolicy.AUTO)
    assert d.record.last_seen == T0


def test_may_sync_only_for_tofu_and_verified() -> None:
    assert {lv for lv in TrustLevel if lv.may_sync} == {TrustLevel.TOFU, TrustLevel.VERIFIED}


# -- addresses ------------------------------------------------------------------------------------


def test_addresses_are_most_recent_first_and_bounded() -> None:
    r = rec(TrustLevel.TOFU)
    for i in range(policy.MAX_ADDRESSES + 4):
        r = policy.decide(r, DEV, "laptop", OLD, T0 + i, TrustPolicy.AUTO, f"10.0.0.{i}").record
    expected = tuple(f"10.0.0.{i}" for i in reversed(range(4, policy.MAX_ADDRESSES + 4)))
    assert r.addresses == expected
    assert len(r.addresses) == policy.MAX_ADDRESSES


def test_an_address_seen_again_moves_to_the_front_without_duplicates() -> None:
    r = rec(TrustLevel.TOFU, addresses=("10.0.0.2", "10.0.0.1"))
    r = policy.decide(r, DEV, "laptop", OLD, T0 + 1, TrustPolicy.AUTO, "10.0.0.1").record
    assert r.addresses == ("10.0.0.1", "10.0.0.2")


def test_no_address_leaves_the_list_alone() -> None:
    r = rec(TrustLevel.TOFU, addresses=("10.0.0.2",))
    r = policy.decide(r, DEV, "laptop", OLD, T0 + 1, TrustPolicy.AUTO, None).record
    assert r.addresses == ("10.0.0.2",)


@pytest.mark.parametrize("level", [TrustLevel.REVOKED, TrustLevel.KEY_CHANGED, TrustLevel.PENDING])
def test_refused_devices_still_record_where_they_came_from(level: TrustLevel) -> None:
    pending = NEW if level is TrustLevel.KEY_CHANGED else None
    key = THIRD if level is TrustLevel.KEY_CHANGED else OLD  # the pinned key would re-admit it
    d = policy.decide(rec(level, pending=pending), DEV, "laptop", key, T0 + 1, TrustPolicy.AUTO, "10.9.9.9")
    assert not d.may_sync
    assert d.record.addresses == ("10.9.9.9",)


# -- a person's decisions, from every level -------------------------------------------------------


def _pending_for(level: TrustLevel) -> str | None:
    return NEW if level is TrustLevel.KEY_CHANGED else None


@pytest.mark.parametrize("level", KNOWN_LEVELS)
def test_verify_from_every_level(level: TrustLevel) -> None:
    new, kind = policy.verify(replace(rec(level, pending=_pending_for(level)), notes="x"))
    assert kind is EventKind.VERIFIED
    assert new.trust is TrustLevel.VERIFIED
    assert new.fingerprint == OLD, "verify confirms the pinned key, never the offered one"
    assert new.pending_fingerprint is None
    assert new.notes == ""


@pytest.mark.parametrize("level", KNOWN_LEVELS)
def test_revoke_from_every_level(level: TrustLevel) -> None:
    old = rec(level, pending=_pending_for(level))
    new, kind = policy.revoke(old, "lost laptop")
    assert kind is EventKind.REVOKED
    assert new.trust is TrustLevel.REVOKED
    assert new.fingerprint == OLD
    assert new.pending_fingerprint == old.pending_fingerprint
    assert new.notes == "lost laptop"


@pytest.mark.parametrize("level", [TrustLevel.KEY_CHANGED, TrustLevel.REVOKED])
def test_retrust_pins_the_pending_key(level: TrustLevel) -> None:
    new, kind = policy.retrust(rec(level, pending=NEW))
    assert kind is EventKind.RETRUSTED
    assert (new.trust, new.fingerprint, new.pending_fingerprint) == (TrustLevel.TOFU, NEW, None)


def test_retrust_lifts_a_block_with_nothing_pending() -> None:
    new, kind = policy.retrust(replace(rec(TrustLevel.REVOKED), notes="revoked by user"))
    assert kind is EventKind.RETRUSTED
    assert (new.trust, new.fingerprint, new.notes) == (TrustLevel.TOFU, OLD, "")


@pytest.mark.parametrize("level", [TrustLevel.TOFU, TrustLevel.VERIFIED, TrustLevel.PENDING])
def test_retrust_with_nothing_pending_is_a_user_error(level: TrustLevel) -> None:
    with pytest.raises(UserError, match=rf"{DEV}.*no changed key.*{level.value}"):
        policy.retrust(rec(level))


def test_accept_admits_a_pending_device() -> None:
    new, kind = policy.accept(replace(rec(TrustLevel.PENDING), notes="waiting"))
    assert kind is EventKind.ACCEPTED
    assert (new.trust, new.fingerprint, new.notes) == (TrustLevel.TOFU, OLD, "")


@pytest.mark.parametrize("level", [lv for lv in KNOWN_LEVELS if lv is not TrustLevel.PENDING])
def test_accept_on_a_device_that_is_not_pending_is_a_user_error(level: TrustLevel) -> None:
    with pytest.raises(UserError, match=rf"{DEV}.*not waiting for approval.*{level.value}"):
        policy.accept(rec(level, pending=_pending_for(level)))


# -- through the store: random sequences keep the invariants ---------------------------------------

DEVICES = ["AAAA" + c * 28 for c in "BCD"]
KEYS = [fp(f"key {i}") for i in range(4)]
IMPORTABLE = [TrustLevel.TOFU, TrustLevel.VERIFIED, TrustLevel.REVOKED, TrustLevel.PENDING]


class TrustMachine(RuleBasedStateMachine):
    """Handshakes and people's decisions in any order, against a real store.

    The model keeps only what the invariants need: the pin each device should have (it moves only
    by retrust or a handshake along a rotation chain; first sight, add and import set it on a new
    device), which devices should be revoked (left only by verify, retrust, add or forget), and how
    many events the log should hold (one per decision, except that a refusal already logged since
    the device's last other decision is not logged again, and an ordinary reconnect, a match that
    changes no level, is not logged at all).
    """

    def __init__(self) -> None:
        super().__init__()
        self.dir = new_home()
        self.store = TrustStore(self.dir / "trust.db")
        self.now = T0
        self.pins: dict[str, str] = {}
        self.revoked: set[str] = set()
        self.events = 0

    def tick(self) -> float:
        self.now += 1.0
        return self.now

    @initialize(pol=st.sampled_from(list(TrustPolicy)))
    def choose_policy(self, pol: TrustPolicy) -> None:
        self.store.policy = pol

    @rule(device=st.sampled_from(DEVICES), key=st.sampled_from(KEYS), addr=st.sampled_from([None, "10.0.0.1"]))
    def handshake(self, device: str, key: str, addr: str | None) -> None:
        before = self.store.get(device)
        # Refusals logged since the device's last other decision: a refusal already among them
        # (a peer retrying, an impersonator alternating keys) is logged once.
        since: list[tuple[EventKind, str | None]] = []
        for e in self.store.events(device):
            if e.kind not in (EventKind.REFUSED, EventKind.KEY_CHANGED, EventKind.ANOMALY):
                break
            since.append((e.kind, e.fingerprint))
        d = self.store.verify_device(device, "name", key, self.tick(), addr)
        repeat = d.event in (EventKind.REFUSED, EventKind.KEY_CHANGED) and (d.event, key) in since
        ordinary = d.event is EventKind.MATCH and before is not None and before.trust is d.level
        self.events += 0 if repeat or ordinary else 1
        assert self.store.get(device) == d.record
        assert d.record.last_seen == self.now
        if before is None:
            assert d.event is EventKind.FIRST_USE
            self.pins[device] = key
            expected = TrustLevel.TOFU if self.store.policy is TrustPolicy.AUTO else TrustLevel.PENDING
            assert d.level is expected
            return
        if d.may_sync:
            assert key == self.pins[device], "a device may only sync with its pinned key"
        if key != before.fingerprint:
            assert not d.may_sync
        if before.trust is TrustLevel.KEY_CHANGED:
            if key == before.fingerprint:
                # The pinned key again: re-admitted, and the offered key is dropped.
                assert d.may_sync and d.record.pending_fingerprint is None
            else:
                assert d.level is TrustLevel.KEY_CHANGED and d.record.pending_fingerprint == key
        if device in self.revoked:
            assert d.level is TrustLevel.REVOKED

    @rule(device=st.sampled_from(DEVICES))
    def verify(self, device: str) -> None:
        if device not in self.pins:
            with pytest.raises(UnknownDeviceError):
                self.store.verify(device, self.tick())
            return
        new = self.store.verify(device, self.tick())
        self.events += 1
        self.revoked.discard(device)
        assert new.trust is TrustLevel.VERIFIED

    @rule(device=st.sampled_from(DEVICES))
    def revoke(self, device: str) -> None:
        if device not in self.pins:
            with pytest.raises(UnknownDeviceError):
                self.store.revoke(device, self.tick())
            return
        self.store.revoke(device, self.tick())
        self.events += 1
        self.revoked.add(device)

    @rule(device=st.sampled_from(DEVICES))
    def retrust(self, device: str) -> None:
        before = self.store.get(device)
        if before is None:
            with pytest.raises(UnknownDeviceError):
                self.store.retrust(device, self.tick())
            return
        if before.pending_fingerprint is None and before.trust not in (TrustLevel.REVOKED, TrustLevel.KEY_CHANGED):
            with pytest.raises(UserError):
                self.store.retrust(device, self.tick())
            return
        new = self.store.retrust(device, self.tick())
        self.events += 1
        self.revoked.discard(device)
        self.pins[device] = before.pending_fingerprint or before.fingerprint
        assert new.trust is TrustLevel.TOFU

    @rule(device=st.sampled_from(DEVICES))
    def accept(self, device: str) -> None:
        before = self.store.get(device)
        if before is None or before.trust is not TrustLevel.PENDING:
            with pytest.raises(UserError):
                self.store.accept(device, self.tick())
            return
        assert self.store.accept(device, self.tick()).trust is TrustLevel.TOFU
        self.events += 1

    @rule(device=st.sampled_from(DEVICES))
    def forget(self, device: str) -> None:
        if device not in self.pins:
            with pytest.raises(UnknownDeviceError):
                self.store.forget(device, self.tick())
            return
        self.store.forget(device, self.tick())
        self.events += 1
        del self.pins[device]
        self.revoked.discard(device)

    @rule(device=st.sampled_from(DEVICES), key=st.sampled_from(KEYS))
    def add(self, device: str, key: str) -> None:
        if device in self.pins and self.pins[device] != key:
            with pytest.raises(UserError):
                self.store.add(device, "added", key, self.tick())
            return
        assert self.store.add(device, "added", key, self.tick()).trust is TrustLevel.VERIFIED
        self.events += 1
        self.pins[device] = key
        self.revoked.discard(device)  # a person scanned the device's own URI: as good as verify

    @rule(device=st.sampled_from(DEVICES), key=st.sampled_from(KEYS))
    def rotate(self, device: str, key: str) -> None:
        """A handshake with `key` and a (pretend-verified) chain from whatever the pin is to it."""
        before = self.store.get(device)
        d = self.store.verify_device(device, "name", key, self.tick(), follow=lambda pin: (pin, key))
        if before is None:
            assert d.event is EventKind.FIRST_USE
            self.pins[device] = key
            self.events += 1
            return
        if before.trust.may_sync and key != before.fingerprint:
            # The pin moves and the level stays, in one decision with one log entry.
            assert (d.event, d.level, d.record.fingerprint) == (EventKind.ROTATED, before.trust, key)
            self.pins[device] = key
            self.events += 1
            return
        # Anything else is decided as if there were no chain: a chain never lifts a refusal.
        assert d.event is not EventKind.ROTATED
        assert d.record.fingerprint == before.fingerprint
        if key != before.fingerprint:
            assert not d.may_sync
        self.events = len(self.store.events())  # the handshake rule checks the logging itself

    @rule(device=st.sampled_from(DEVICES), key=st.sampled_from(KEYS), level=st.sampled_from(IMPORTABLE))
    def import_record(self, device: str, key: str, level: TrustLevel) -> None:
        before = self.store.get(device)
        record = DeviceRecord(device, "imported", key, level, T0, T0, pending_fingerprint=KEYS[0])
        outcome = self.store.import_record(record, self.tick())
        if before is None:
            assert outcome == "added"
            self.pins[device] = key
        elif before.fingerprint != key:
            assert outcome == "conflict"
            assert self.store.get(device) == before
            return
        else:
            assert outcome in ("updated", "kept")
            after = self.store.get(device)
            assert after is not None
            if outcome == "kept":
                assert after == before
                return
            assert after.trust is level
            assert level in (TrustLevel.VERIFIED, TrustLevel.REVOKED)
            assert before.trust is not TrustLevel.REVOKED, "an import never lowers a revoked device"
        self.events += 1
        if level is TrustLevel.REVOKED:
            self.revoked.add(device)

    @rule(device=st.sampled_from(DEVICES))
    def count_sync(self, device: str) -> None:
        before = self.store.get(device)
        self.store.count_sync(device, self.tick())
        after = self.store.get(device)
        if before is None:
            assert after is None
        else:
            assert after is not None
            assert after.sync_count == before.sync_count + 1

    @invariant()
    def store_matches_model(self) -> None:
        records = {r.device_id: r for r in self.store.all()}
        assert set(records) == set(self.pins)
        for device_id, r in records.items():
            assert r.fingerprint == self.pins[device_id], "the pin moved without retrust or rotate"
            assert (r.trust is TrustLevel.REVOKED) == (device_id in self.revoked)
            assert r.trust is not TrustLevel.UNKNOWN
            assert r.pending_fingerprint != r.fingerprint
            if r.trust.may_sync:
                assert r.pending_fingerprint is None, "a device that may sync has no unresolved key"

    @invariant()
    def every_decision_is_logged(self) -> None:
        assert len(self.store.events()) == self.events

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TrustMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_trust_machine = pytest.mark.slow(TrustMachine.TestCase)  # 40 steps, many examples
