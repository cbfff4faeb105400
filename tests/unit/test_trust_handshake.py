"""A handshake's trust decision through the daemon's `_decide` with a real store on disk: rotation,
level and anomaly rules in one transaction, one read of the log, and no log entry per reconnect."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.app.daemon import Agent
from agent.identity import rotation
from agent.identity.keys import fingerprint_of_public_key
from agent.trust import policy
from agent.trust.anomaly import AnomalyConfig
from agent.trust.model import Decision, DeviceRecord, EventKind, TrustEvent, TrustLevel
from agent.trust.store import TrustStore
from agent.wire.session import PeerAuthenticated

DEV = "AAAABBBBCCCCDDDDEEEEFFFFGGGGHHHH"
T0 = 1_700_000_000.0


@pytest.fixture
def store(home: Path) -> Iterator[TrustStore]:
    with TrustStore(home / "trust.db") as s:
        yield s


@pytest.fixture(scope="module")
def keys() -> list[ec.EllipticCurvePrivateKey]:
    return [ec.generate_private_key(ec.SECP256R1()) for _ in range(5)]


def fp(k: ec.EllipticCurvePrivateKey) -> str:
    return fingerprint_of_public_key(k.public_key())


def peer(key: ec.EllipticCurvePrivateKey, rotations: tuple[bytes, ...] = ()) -> PeerAuthenticated:
    return PeerAuthenticated(DEV, "laptop", fp(key), b"", rotations, 1)


def decide(store: TrustStore, who: PeerAuthenticated, now: float) -> tuple[Decision, bool]:
    """The daemon's decision path, as `Agent.authenticated` runs it in a worker thread."""
    agent = cast(Agent, SimpleNamespace(store=store, config=SimpleNamespace(anomaly=AnomalyConfig())))
    decision, blocked, _sighting = Agent._decide(agent, who, "10.0.0.9", now, [], [])
    return decision, blocked


def state(store: TrustStore) -> tuple[DeviceRecord | None, list[TrustEvent]]:
    return store.get(DEV), store.events()


class Crash(Exception):
    pass


# -- rotation is one decision ---------------------------------------------------------------------


@pytest.mark.parametrize("where", ["deciding", "logging"])
def test_a_crash_during_a_rotation_moves_neither_pin_nor_log(
    store: TrustStore, keys: list[ec.EllipticCurvePrivateKey], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Before, the pin moved in one transaction and the decision ran in another: a crash between
    them left a moved pin (and its `rotated` entry) with no decision. Now both or neither."""
    old, new = keys[0], keys[1]
    decide(store, peer(old), T0)
    before = state(store)
    statement = rotation.encode(rotation.make_statement(old, new.public_key(), DEV, 1000))
    rotated = peer(new, (statement,))

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise Crash(where)

    with monkeypatch.context() as m:
        if where == "deciding":
            m.setattr(policy, "decide", crash)
        else:
            real_log = TrustStore._log

            def log_then_crash(self: TrustStore, *args: Any, **kwargs: Any) -> None:
                real_log(self, *args, **kwargs)  # the entry is written, then the process dies
                raise Crash(where)

            m.setattr(TrustStore, "_log", log_then_crash)
        with pytest.raises(Crash):
            decide(store, rotated, T0 + 1)
    assert state(store) == before
    # Retried without the crash: the pin moves, the level stays, one `rotated` entry says so.
    decision, blocked = decide(store, rotated, T0 + 2)
    assert (decision.event, decision.level, blocked) == (EventKind.ROTATED, TrustLevel.TOFU, False)
    record, events = state(store)
    assert record is not None and record.fingerprint == fp(new)
    assert [(e.kind, e.old_fingerprint, e.fingerprint, e.trust_after) for e in reversed(events)] == [
        (EventKind.FIRST_USE, None, fp(old), TrustLevel.TOFU),
        (EventKind.ROTATED, fp(old), fp(new), TrustLevel.TOFU),
    ]


# -- one read of the log --------------------------------------------------------------------------


def _log_reads(store: TrustStore) -> list[str]:
    statements: list[str] = []

    def trace(sql: str) -> None:
        if "FROM events" in sql and sql.lstrip().upper().startswith("SELECT"):
            statements.append(sql)

    store._db.set_trace_callback(trace)
    return statements


@pytest.mark.parametrize("case", ["reconnect", "key_changed", "key_changed_again", "back_to_pin", "rotation"])
def test_a_handshake_reads_the_trust_log_once(
    store: TrustStore, keys: list[ec.EllipticCurvePrivateKey], case: str
) -> None:
    old, new = keys[0], keys[1]
    decide(store, peer(old), T0)
    who = peer(old)
    if case in ("key_changed_again", "back_to_pin"):
        decide(store, peer(new), T0 + 1)
        who = peer(new) if case == "key_changed_again" else peer(old)
    elif case == "key_changed":
        who = peer(new)
    elif case == "rotation":
        who = peer(new, (rotation.encode(rotation.make_statement(old, new.public_key(), DEV, 1000)),))
    reads = _log_reads(store)
    decide(store, who, T0 + 2)
    assert len(reads) == 1, reads


# -- an ordinary reconnect does not grow the log --------------------------------------------------


def test_ordinary_reconnects_move_last_seen_not_the_log(
    store: TrustStore, keys: list[ec.EllipticCurvePrivateKey]
) -> None:
    decide(store, peer(keys[0]), T0)
    for i in range(1, 301):
        decision, _ = decide(store, peer(keys[0]), T0 + i)
        assert (decision.event, decision.level) == (EventKind.MATCH, TrustLevel.TOFU)
    record, events = state(store)
    assert record is not None and record.last_seen == T0 + 300
    assert [e.kind for e in events] == [EventKind.FIRST_USE]


def test_what_the_anomaly_rules_need_is_still_logged(store: TrustStore, keys: list[ec.EllipticCurvePrivateKey]) -> None:
    """A flip back to the pinned key is a `match` that changes the level: logged, and flagged."""
    k1, k2 = keys[0], keys[1]
    decide(store, peer(k1), T0)
    decide(store, peer(k2), T0 + 1)  # key_changed
    decision, blocked = decide(store, peer(k1), T0 + 2)  # the pinned key again: re-admitted
    assert (decision.event, decision.level, blocked) == (EventKind.MATCH, TrustLevel.TOFU, False)
    decide(store, peer(k1), T0 + 3)  # an ordinary reconnect after that: not logged
    kinds = [(e.kind, e.detail.partition(":")[0]) for e in reversed(store.events())]
    assert kinds == [
        (EventKind.FIRST_USE, "name=laptop"),
        (EventKind.KEY_CHANGED, ""),
        (EventKind.MATCH, ""),
        (EventKind.ANOMALY, "key_flip_flop"),
    ]


def test_a_blocking_anomaly_revokes_in_the_same_decision(
    store: TrustStore, keys: list[ec.EllipticCurvePrivateKey]
) -> None:
    decide(store, peer(keys[0]), T0)
    decide(store, peer(keys[1]), T0 + 1)
    decide(store, peer(keys[2]), T0 + 2)
    decision, blocked = decide(store, peer(keys[3]), T0 + 3)  # the third new key: repeated_key_change
    assert blocked and not decision.may_sync
    record, events = state(store)
    assert record is not None and record.trust is TrustLevel.REVOKED
    newest = [(e.kind, e.detail.partition(":")[0]) for e in events[:3]]
    assert newest == [
        (EventKind.REVOKED, "blocked automatically"),
        (EventKind.ANOMALY, "repeated_key_change"),
        (EventKind.KEY_CHANGED, ""),
    ]
    # A person lifts the block: the same evidence does not block again at the next handshake.
    store.retrust(DEV, T0 + 4)
    decision, blocked = decide(store, peer(keys[3]), T0 + 5)
    assert (decision.level, blocked) == (TrustLevel.TOFU, False)
