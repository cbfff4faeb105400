"""The `window` trust policy: strangers are pinned as pending unless the pairing window is open."""

from __future__ import annotations

from pathlib import Path

from agent.trust import policy, window
from agent.trust.model import EventKind, TrustLevel, TrustPolicy
from agent.trust.store import TrustStore

NOW = 1_800_000_000.0
FP_A, FP_B = "aa" * 32, "bb" * 32


def dev(i: int) -> str:
    return f"{i:032d}"


def test_a_new_device_inside_the_window_is_trusted_and_says_how_it_came_in() -> None:
    d = policy.decide(None, dev(1), "laptop", FP_A, NOW, TrustPolicy.WINDOW, window_open=True)
    assert d.level is TrustLevel.TOFU and d.event is EventKind.FIRST_USE
    assert "via=window" in d.detail


def test_a_new_device_outside_the_window_is_pinned_but_pending() -> None:
    d = policy.decide(None, dev(1), "guest", FP_A, NOW, TrustPolicy.WINDOW, window_open=False)
    assert d.level is TrustLevel.PENDING and d.record.fingerprint == FP_A
    assert "pairing window is closed" in d.record.notes and "via=window" not in d.detail
    # its key is remembered: another key later is a key change, not a new stranger
    again = policy.decide(d.record, dev(1), "guest", FP_B, NOW + 1, TrustPolicy.WINDOW, window_open=True)
    assert again.level is TrustLevel.KEY_CHANGED
    # and opening the window later does not admit a device that already waits: a person decides
    same = policy.decide(d.record, dev(1), "guest", FP_A, NOW + 2, TrustPolicy.WINDOW, window_open=True)
    assert same.level is TrustLevel.PENDING


def test_auto_still_trusts_every_stranger_and_manual_never_does() -> None:
    assert policy.decide(None, dev(1), "x", FP_A, NOW, TrustPolicy.AUTO).level is TrustLevel.TOFU
    assert policy.decide(None, dev(1), "x", FP_A, NOW, TrustPolicy.MANUAL, window_open=True).level is TrustLevel.PENDING


def test_the_store_logs_first_use_via_window(tmp_path: Path) -> None:
    with TrustStore(tmp_path / "t.db", TrustPolicy.WINDOW) as store:
        store.handshake(dev(1), "laptop", FP_A, NOW, "192.0.2.1", window_open=True)
        (first,) = store.events(dev(1))
        assert first.kind is EventKind.FIRST_USE and "via=window" in first.detail


def test_a_flood_of_strangers_keeps_at_most_64_pending_requests(tmp_path: Path) -> None:
    with TrustStore(tmp_path / "t.db", TrustPolicy.WINDOW) as store:
        store.handshake(dev(0), "desktop", FP_A, NOW, window_open=True)
        for i in range(1, window.MAX_PENDING + 11):
            store.handshake(dev(i), f"s{i}", f"{i:064x}", NOW + i)
        pending = [r for r in store.all() if r.trust is TrustLevel.PENDING]
        assert len(pending) == window.MAX_PENDING
        assert {r.device_id for r in pending} == {dev(i) for i in range(11, window.MAX_PENDING + 11)}
        assert store.get(dev(0)) is not None  # a trusted device is never dropped
        dropped = [e for e in store.events() if e.kind is EventKind.FORGOTTEN]
        assert len(dropped) == 10 and all("pending request dropped" in e.detail for e in dropped)


def test_pending_requests_expire_after_thirty_days(tmp_path: Path) -> None:
    with TrustStore(tmp_path / "t.db", TrustPolicy.WINDOW) as store:
        store.handshake(dev(1), "old", FP_A, NOW)
        store.handshake(dev(2), "new", FP_B, NOW + window.PENDING_MAX_AGE)
        assert store.expire_pending(NOW + window.PENDING_MAX_AGE + 10) == [dev(1)]
        assert store.get(dev(1)) is None and store.get(dev(2)) is not None
