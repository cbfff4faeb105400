"""Anomaly rules: each rule at its edges, acknowledgement, blocking policy and output contract."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

import pytest

from agent.errors import ConfigError
from agent.trust.anomaly import (
    AdvertObservation,
    Anomaly,
    AnomalyCode,
    AnomalyConfig,
    LiveConnection,
    NameSighting,
    Observation,
    Severity,
    acknowledged,
    evaluate,
    should_block,
    to_block,
    unreported,
)
from agent.trust.model import DeviceRecord, EventKind, TrustEvent, TrustLevel

V = "VVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVV"
W = "WWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWW"
X = "XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"
A, B, C, D, E = ("a" * 64, "b" * 64, "c" * 64, "d" * 64, "e" * 64)
DAY = 86400.0
NOW = 1_000_000.0
CFG = AnomalyConfig()


class Log:
    """Builds a trust event log with increasing sequence numbers."""

    def __init__(self) -> None:
        self.events: list[TrustEvent] = []

    def add(
        self,
        t: float,
        kind: EventKind,
        fp: str | None = None,
        old: str | None = None,
        dev: str = V,
        detail: str = "",
    ) -> Log:
        self.events.append(TrustEvent(len(self.events) + 1, t, dev, kind, fp, old, None, detail))
        return self


def record(
    dev: str, fp: str, name: str = "laptop", first: float = 0.0, last: float = 0.0, **kw: object
) -> DeviceRecord:
    return DeviceRecord(dev, name, fp, TrustLevel.TOFU, first, last, **kw)  # type: ignore[arg-type]


def run(
    events: Sequence[TrustEvent] = (),
    records: Sequence[DeviceRecord] = (),
    live: Sequence[LiveConnection] = (),
    observations: Sequence[Observation] = (),
    config: AnomalyConfig = CFG,
    now: float = NOW,
) -> list[Anomaly]:
    return evaluate(events, records, live, observations, config, now)


def codes(found: Sequence[Anomaly]) -> list[tuple[str, AnomalyCode]]:
    return [(a.device_id, a.code) for a in found]


def key_changes(*times_fps: tuple[float, str]) -> Log:
    log = Log().add(0.0, EventKind.FIRST_USE, A)
    for t, fp in times_fps:
        log.add(t, EventKind.KEY_CHANGED, fp, A)
    return log


# -- repeated_key_change --------------------------------------------------------------------------


def test_two_new_keys_are_not_repeated_but_three_are() -> None:
    two = key_changes((NOW - 10, B), (NOW - 5, C)).events
    assert run(two) == []
    three = key_changes((NOW - 10, B), (NOW - 5, C), (NOW - 1, D)).events
    [a] = run(three)
    assert (a.code, a.severity, a.device_id) == (AnomalyCode.REPEATED_KEY_CHANGE, Severity.CRITICAL, V)
    assert dict(a.evidence)["fingerprints"] == (B, C, D)
    assert (a.first_seen, a.last_seen) == (NOW - 10, NOW - 1)


def test_the_same_new_key_again_is_one_key() -> None:
    events = key_changes((NOW - 3, B), (NOW - 2, B), (NOW - 1, B)).events
    assert run(events) == []


def test_window_edges() -> None:
    inside = key_changes((NOW - DAY, B), (NOW - 5, C), (NOW - 1, D)).events
    assert codes(run(inside)) == [(V, AnomalyCode.REPEATED_KEY_CHANGE)]
    outside = key_changes((NOW - DAY - 0.001, B), (NOW - 5, C), (NOW - 1, D)).events
    assert run(outside) == []


def test_threshold_and_window_are_configurable() -> None:
    events = key_changes((NOW - 7200, B), (NOW - 1, C)).events
    assert codes(run(events, config=AnomalyConfig(repeated_key_change_threshold=2)))
    assert run(events, config=AnomalyConfig(repeated_key_change_threshold=2, window_seconds=3600)) == []


def test_signed_rotations_never_count() -> None:
    log = key_changes((NOW - 10, B))
    log.add(NOW - 5, EventKind.ROTATED, C, A).add(NOW - 4, EventKind.ROTATED, D, C).add(
        NOW - 3, EventKind.ROTATED, E, D
    )
    assert AnomalyCode.REPEATED_KEY_CHANGE not in [a.code for a in run(log.events)]


def test_devices_are_counted_apart() -> None:
    log = key_changes((NOW - 3, B), (NOW - 2, C))
    log.add(NOW - 1, EventKind.KEY_CHANGED, D, A, dev=W)
    assert run(log.events) == []


def test_impersonator_with_three_new_keys_is_blocked_and_the_victim_flip_flops() -> None:
    # What the store logs: the victim pinned with A; an impostor keeps V's id with new keys B, C, D;
    # the real device then reconnects with A and is refused while V sits in key_changed.
    log = Log().add(NOW - 100, EventKind.FIRST_USE, A).add(NOW - 90, EventKind.MATCH, A)
    for i, fp in enumerate((B, C, D)):
        log.add(NOW - 50 + i, EventKind.KEY_CHANGED, fp, A)
    log.add(NOW - 10, EventKind.REFUSED, A)
    found = run(log.events)
    assert codes(found) == [(V, AnomalyCode.KEY_FLIP_FLOP), (V, AnomalyCode.REPEATED_KEY_CHANGE)]
    assert [should_block(a, CFG) for a in found] == [False, True]
    assert to_block(found, log.events, CFG) == [V]


# -- key_flip_flop --------------------------------------------------------------------------------


def test_old_key_after_retrust_is_a_flip_flop() -> None:
    log = Log().add(1, EventKind.FIRST_USE, A).add(2, EventKind.KEY_CHANGED, B, A).add(3, EventKind.RETRUSTED, B, A)
    assert run(log.events) == []
    log.add(4, EventKind.KEY_CHANGED, A, B)
    [a] = run(log.events)
    assert a.code is AnomalyCode.KEY_FLIP_FLOP and a.severity is Severity.WARNING
    assert dict(a.evidence) == {"returned": (A,), "keys": (A, B), "flips": 1}
    assert (a.first_seen, a.last_seen) == (4, 4)


def test_forward_changes_and_rotations_are_not_flip_flops() -> None:
    log = Log().add(1, EventKind.FIRST_USE, A).add(2, EventKind.ROTATED, B, A).add(3, EventKind.MATCH, B)
    log.add(4, EventKind.KEY_CHANGED, C, B).add(5, EventKind.KEY_CHANGED, D, B)
    assert run(log.events) == []


def test_flip_flops_aggregate_and_order_by_seq_not_list_order() -> None:
    log = Log().add(1, EventKind.FIRST_USE, A)
    for t in (10, 20, 30):
        log.add(t, EventKind.KEY_CHANGED, B, A).add(t + 1, EventKind.REFUSED, A)
    events = list(reversed(log.events))
    [a] = run(events)
    assert dict(a.evidence)["flips"] == 5  # A comes back 3 times, B twice
    assert (a.first_seen, a.last_seen) == (11, 31)


def test_log_starting_mid_history_uses_the_old_fingerprint() -> None:
    log = Log().add(1, EventKind.KEY_CHANGED, B, A).add(2, EventKind.REFUSED, A)
    assert codes(run(log.events)) == [(V, AnomalyCode.KEY_FLIP_FLOP)]


# -- advert_mismatch ------------------------------------------------------------------------------


def test_advert_mismatch_is_about_the_device_the_record_names() -> None:
    ok = AdvertObservation(V, A, A, "10.0.0.2", 5)
    assert run(observations=[ok]) == []
    bad = [AdvertObservation(W, B, A, "10.0.0.9", 7), AdvertObservation(W, C, A, "10.0.0.8", 9)]
    [a] = run(records=[record(V, A)], observations=[ok, *bad])
    assert (a.device_id, a.code, a.severity) == (W, AnomalyCode.ADVERT_MISMATCH, Severity.WARNING)
    assert dict(a.evidence) == {"advertised": (B, C), "proven": (A,), "addresses": ("10.0.0.9", "10.0.0.8")}
    assert (a.first_seen, a.last_seen) == (7, 9)
    assert not should_block(a, CFG)


# -- cloned_key -----------------------------------------------------------------------------------


def test_one_key_under_two_device_ids() -> None:
    records = [record(V, A, "a", 10, 50), record(W, A, "b", 20, 40), record(X, B, "c")]
    found = run(records=records)
    assert codes(found) == [(V, AnomalyCode.CLONED_KEY), (W, AnomalyCode.CLONED_KEY)]
    assert dict(found[0].evidence) == {"fingerprints": (A,), "other_devices": (W,)}
    assert (found[0].first_seen, found[0].last_seen) == (20, 50)
    assert all(should_block(a, CFG) for a in found)


def test_pending_key_counts_as_proven() -> None:
    records = [record(V, A, "a"), record(W, B, "b", pending_fingerprint=A)]
    assert codes(run(records=records)) == [(V, AnomalyCode.CLONED_KEY), (W, AnomalyCode.CLONED_KEY)]


def test_one_device_live_with_two_keys_at_once() -> None:
    live = [LiveConnection(V, A, "10.0.0.2", 100), LiveConnection(V, B, "10.0.0.66", 200)]
    [a] = run(live=live)
    assert a.code is AnomalyCode.CLONED_KEY
    assert dict(a.evidence) == {"fingerprints": (A, B), "addresses": ("10.0.0.2", "10.0.0.66")}
    assert (a.first_seen, a.last_seen) == (200, NOW)
    assert run(live=live[:1]) == []


def test_rotation_overlap_is_not_a_clone() -> None:
    log = Log().add(1, EventKind.FIRST_USE, A).add(2, EventKind.ROTATED, B, A).add(3, EventKind.ROTATED, C, B)
    live = [LiveConnection(V, A, "10.0.0.2", 1), LiveConnection(V, C, "10.0.0.2", 3)]
    assert run(log.events, live=live) == []


def test_one_key_live_under_two_ids_merges_with_records() -> None:
    live = [LiveConnection(V, A, "10.0.0.2", 100), LiveConnection(W, A, "10.0.0.3", 150)]
    records = [record(V, A, "a", 10, 90), record(W, A, "b", 20, 95)]
    found = run(records=records, live=live)
    assert codes(found) == [(V, AnomalyCode.CLONED_KEY), (W, AnomalyCode.CLONED_KEY)]
    assert (found[0].first_seen, found[0].last_seen) == (20, NOW)


# -- new_device_same_name -------------------------------------------------------------------------


def test_later_device_with_a_known_name_is_flagged() -> None:
    records = [record(W, B, "  LAPTOP ", first=50), record(V, A, "laptop", first=10), record(X, C, "desk")]
    [a] = run(records=records)
    assert (a.device_id, a.code, a.severity) == (W, AnomalyCode.NEW_DEVICE_SAME_NAME, Severity.INFO)
    assert dict(a.evidence) == {"name": "  LAPTOP ", "known_devices": (V,)}
    assert (a.first_seen, a.last_seen) == (50, 50)


def test_placeholder_names_are_not_compared() -> None:
    assert run(records=[record(V, A, "unnamed", first=1), record(W, B, "Unnamed", first=2)]) == []


def test_sighting_raises_only_about_the_unknown_id_it_claims() -> None:
    records = [record(V, A, "Laptop", first=1)]
    sightings: list[Observation] = [
        NameSighting(W, "laptop", "10.0.0.9", 30),
        NameSighting(W, "LAPTOP", "10.0.0.9", 40),
        NameSighting(V, "laptop", "10.0.0.2", 40),  # the known device itself
        NameSighting(X, "desk", "10.0.0.7", 40),
    ]
    [a] = run(records=records, observations=sightings)
    assert (a.device_id, a.code) == (W, AnomalyCode.NEW_DEVICE_SAME_NAME)
    assert dict(a.evidence)["addresses"] == ("10.0.0.9",)
    assert (a.first_seen, a.last_seen) == (30, 40)


# -- acknowledgement, blocking, reporting ---------------------------------------------------------


def flipping() -> Log:
    return Log().add(1, EventKind.FIRST_USE, A).add(2, EventKind.KEY_CHANGED, B, A).add(3, EventKind.REFUSED, A)


def test_clear_hides_old_evidence_and_new_evidence_raises_again() -> None:
    log = flipping().add(3, EventKind.ANOMALY_CLEARED)  # evidence at the clear's own time is acknowledged
    assert run(log.events) == []
    log.add(4, EventKind.KEY_CHANGED, B, A)
    assert codes(run(log.events)) == [(V, AnomalyCode.KEY_FLIP_FLOP)]


def test_clear_for_one_code_or_another_device() -> None:
    log = flipping().add(5, EventKind.ANOMALY_CLEARED, detail="cloned_key").add(5, EventKind.ANOMALY_CLEARED, dev=W)
    assert codes(run(log.events)) == [(V, AnomalyCode.KEY_FLIP_FLOP)]
    log.add(6, EventKind.ANOMALY_CLEARED, detail="key_flip_flop")
    assert run(log.events) == []


def test_acknowledged_is_usable_alone() -> None:
    found = run(flipping().events)
    assert acknowledged(found, Log().add(2.5, EventKind.ANOMALY_CLEARED).events) == found


def test_block_policy() -> None:
    custom = AnomalyConfig(block_on=frozenset({AnomalyCode.KEY_FLIP_FLOP}))
    [a] = run(flipping().events)
    assert not should_block(a, CFG) and should_block(a, custom)
    assert to_block([a], flipping().events, custom) == [V]


def test_a_person_retrusting_is_not_undone_until_new_evidence() -> None:
    log = key_changes((NOW - 30, B), (NOW - 20, C), (NOW - 10, D))
    log.add(NOW - 5, EventKind.RETRUSTED, D, A)
    found = run(log.events)
    assert codes(found) == [(V, AnomalyCode.REPEATED_KEY_CHANGE)]
    assert to_block(found, log.events, CFG) == []
    log.add(NOW - 1, EventKind.KEY_CHANGED, E, D)
    assert to_block(run(log.events), log.events, CFG) == [V]


def test_unreported_until_logged() -> None:
    log = flipping()
    [a] = run(log.events)
    assert unreported([a], log.events) == [a]
    log.add(3, EventKind.ANOMALY, A, detail=a.event_detail())
    assert unreported(run(log.events), log.events) == []
    log.add(9, EventKind.KEY_CHANGED, B, A)
    assert codes(unreported(run(log.events), log.events)) == [(V, AnomalyCode.KEY_FLIP_FLOP)]


def test_output_is_sorted_deduplicated_and_independent_of_input_order() -> None:
    log = key_changes((NOW - 3, B), (NOW - 2, C), (NOW - 1, D)).add(NOW, EventKind.REFUSED, A)
    records = [record(V, A, "laptop", 1), record(W, A, "Laptop", 2), record(X, E, "x", 3)]
    live = [LiveConnection(X, E, "10.0.0.4", 1), LiveConnection(X, B, "10.0.0.5", 2)]
    obs: list[Observation] = [AdvertObservation(X, C, E, "10.0.0.4", 5)]
    first = run(log.events, records, live, obs)
    assert sorted(codes(first)) == codes(first)
    assert len(set(codes(first))) == len(first)
    rng = random.Random(1)
    for _ in range(5):
        ev, rec = list(log.events), list(records)
        rng.shuffle(ev)
        rng.shuffle(rec)
        assert run(ev, rec, list(reversed(live)), obs) == first


def test_to_json_is_json() -> None:
    found = run(key_changes((NOW - 3, B), (NOW - 2, C), (NOW - 1, D)).events)
    doc = json.loads(json.dumps([a.to_json() for a in found]))
    assert doc[0]["code"] == "repeated_key_change"
    assert doc[0]["severity"] == "critical"
    assert doc[0]["evidence"]["fingerprints"] == [B, C, D]
    assert "\n" not in doc[0]["summary"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"repeated_key_change_threshold": 1},
        {"window_seconds": 0.0},
        {"window_seconds": float("nan")},
        {"block_on": frozenset({"no_such_code"})},
    ],
)
def test_config_is_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        AnomalyConfig(**kwargs)  # type: ignore[arg-type]
