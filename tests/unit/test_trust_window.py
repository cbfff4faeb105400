"""The pairing window (pure): when it is open, for how long, and which pending requests go."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import UserError
from agent.trust import window
from agent.trust.model import DeviceRecord, TrustLevel

WALL = 1_800_000_000.0


def rec(i: int, level: TrustLevel, last_seen: float = WALL) -> DeviceRecord:
    return DeviceRecord(f"{i:032d}", f"dev{i}", f"{i:064x}", level, last_seen, last_seen)


def test_a_fresh_install_opens_for_fifteen_minutes_and_then_closes() -> None:
    w = window.at_start([], now=100.0, wall=WALL)
    assert w.is_open(100.0) and w.is_open(100.0 + 15 * 60 - 0.001)
    assert not w.is_open(100.0 + 15 * 60)
    assert w.view(100.0) == {"open": True, "until": WALL + 15 * 60, "reason": window.FRESH_INSTALL}
    assert w.view(100.0 + 15 * 60)["open"] is False


@pytest.mark.parametrize("level", [TrustLevel.TOFU, TrustLevel.VERIFIED])
def test_an_agent_that_trusts_a_device_starts_closed(level: TrustLevel) -> None:
    assert not window.at_start([rec(1, TrustLevel.PENDING), rec(2, level)], 0.0, WALL).is_open(0.0)


def test_pending_or_revoked_devices_only_still_count_as_a_fresh_install() -> None:
    assert window.at_start([rec(1, TrustLevel.PENDING), rec(2, TrustLevel.REVOKED)], 0.0, WALL).is_open(0.0)


def test_open_on_demand_and_close_early() -> None:
    w = window.open_window(50.0, WALL)
    assert w.remaining(50.0) == window.DEFAULT_SECONDS and w.reason == window.OPENED
    assert not window.close_window().is_open(50.0)
    with pytest.raises(UserError):
        window.open_window(0.0, WALL, window.MAX_SECONDS + 1)
    with pytest.raises(UserError):
        window.open_window(0.0, WALL, 0.0)


@pytest.mark.parametrize(("text", "seconds"), [("10m", 600.0), ("1h", 3600.0), ("90s", 90.0), ("5", 300.0)])
def test_durations(text: str, seconds: float) -> None:
    assert window.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "2h", "-5m", "nan", "inf", "0", "ten"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(UserError):
        window.parse_duration(text)


def test_pending_requests_expire_after_thirty_days_and_the_oldest_go_past_the_cap() -> None:
    old = rec(0, TrustLevel.PENDING, WALL - window.PENDING_MAX_AGE - 1)
    recent = [rec(i, TrustLevel.PENDING, WALL - 1000 + i) for i in range(1, window.MAX_PENDING + 3)]
    trusted = rec(999, TrustLevel.TOFU, WALL - 10**9)
    drop = window.pending_to_drop([trusted, *reversed(recent), old], WALL)
    assert drop == [old.device_id, recent[0].device_id, recent[1].device_id]


@given(st.lists(st.floats(min_value=0, max_value=WALL, allow_nan=False), max_size=200))
def test_at_most_max_pending_are_ever_kept(seen: list[float]) -> None:
    records = [rec(i, TrustLevel.PENDING, t) for i, t in enumerate(seen)]
    drop = set(window.pending_to_drop(records, WALL))
    kept = [r for r in records if r.device_id not in drop]
    assert len(kept) <= window.MAX_PENDING
    assert all(WALL - r.last_seen <= window.PENDING_MAX_AGE for r in kept)
    assert not math.isnan(sum(r.last_seen for r in kept))
