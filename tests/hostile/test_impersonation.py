"""A HELLO claiming a known device id with another key (an impersonator who read the id off mDNS)."""

from __future__ import annotations

import pytest

from agent.errors import ErrorCode
from agent.identity.keys import Identity
from testkit.agents import AgentProc, fast_peer, rss_kib, snapshot
from testkit.peer import HostileClient, ProtocolClient, new_identity
from tests.hostile.conftest import Victim, wait_connected

pytestmark = pytest.mark.slow  # a real agent under attack per test (one victim pair per session)

Pair = tuple[AgentProc, AgentProc, str, str]


def _attempt(port: int, mallory: Identity) -> None:
    """Mallory completes a valid handshake with her own key while claiming her identity's device id."""
    with HostileClient(port, source="127.0.0.66") as c:
        c.hello(mallory)
        c.auth(mallory, c.server_hello())
        assert c.error_code() is ErrorCode.KEY_CHANGED


def test_impersonating_hello_is_refused_as_key_changed(fresh_pair: Pair) -> None:
    """Refused with key_changed; the pin kept; exactly one event; the real device keeps working.

    Mallory's key is stored as pending until the real device proves the pinned key again, which
    re-admits it (as OpenSSH accepts the key in known_hosts) and drops the offered key, so a
    `trust retrust` can never pin the attacker's key by mistake.
    """
    a, _b, ida, idb = fresh_pair
    assert a.proc is not None
    before, rss = snapshot(a.home), rss_kib(a.proc.pid)
    legit_fp = before.peers[idb]["fingerprint"]
    mallory = new_identity("legit", device_id=idb)
    _attempt(a.port, mallory)
    after = snapshot(a.home)
    record = after.peers[idb]
    assert record["fingerprint"] == legit_fp, "the pin must be kept"
    # key_changed with Mallory's key pending, unless the real device reconnected meanwhile.
    assert (record["trust"], record["pending_fingerprint"]) in (("key_changed", mallory.fingerprint), ("tofu", None))
    new = after.new_events(before)
    assert (idb, "key_changed", mallory.fingerprint) in [(e["device_id"], e["kind"], e["fingerprint"]) for e in new]
    assert [e for e in new if e["kind"] not in ("key_changed", "match", "anomaly")] == []
    assert {d: p for d, p in after.peers.items() if d != idb} == {d: p for d, p in before.peers.items() if d != idb}
    assert "KEY CHANGED" in a.log() and "127.0.0.66" in a.log()
    assert rss_kib(a.proc.pid) - rss < 8 * 1024
    # The live link of the real device is not torn down by the attempt (unless a keepalive on this
    # loaded machine happens to drop it meanwhile, which is not the attack's doing)...
    entry = fast_peer(a, idb)
    assert entry is not None
    if not entry["connected"]:
        assert "disconnected from legit" in a.log(), "the attempt dropped the real device's live link"
    with ProtocolClient(a.port, new_identity("x"), source="127.0.0.67") as other:
        assert other.handshake()  # the agent itself still serves others
    assert ida


def test_legit_device_still_reconnects_after_an_impersonation_attempt(fresh_pair: Pair) -> None:
    a, b, ida, idb = fresh_pair
    _attempt(a.port, new_identity("legit", device_id=idb))
    b.stop()
    b.start(peers=[a])
    wait_connected(b, ida, 6)
    entry = fast_peer(a, idb)
    assert entry is not None and entry["trust"] == "tofu" and entry["pending_fingerprint"] is None
    # ...and the flip back to the pinned key is flagged for a person to look at.
    codes = {x["code"] for x in entry["anomalies"]}
    assert "key_flip_flop" in codes


def _pinned_target(victim: Victim) -> Identity:
    """A throw-away device pinned on the victim, for an attacker to impersonate."""
    target = new_identity("target")
    with ProtocolClient(victim.port, target, source="127.0.0.65") as c:
        assert c.handshake()
    return target


def test_impersonation_retries_with_one_key_are_logged_once(victim: Victim) -> None:
    target = _pinned_target(victim)
    before = victim.before()
    mallory = new_identity("target", device_id=target.device_id)
    for _ in range(5):
        _attempt(victim.port, mallory)
    victim.check_after(
        before, expected_events=((target.device_id, "key_changed"),), changed=frozenset({target.device_id})
    )


def test_impersonation_with_alternating_keys_does_not_grow_the_log_without_bound(victim: Victim) -> None:
    target = _pinned_target(victim)
    before = victim.before()
    keys = [new_identity("target", device_id=target.device_id) for _ in range(2)]
    for i in range(10):
        _attempt(victim.port, keys[i % 2])
    new = snapshot(victim.agent.home).new_events(before.trust)
    assert len([e for e in new if e["device_id"] == target.device_id]) <= 2, f"{len(new)} events for 10 attempts"
