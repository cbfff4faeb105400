"""Real agents on loopback: signed key rotation keeps pairings; repeated key changes get blocked."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest

from testkit.agents import AgentProc, cli
from testkit.homes import new_home
from testkit.wait import wait_for

pytestmark = pytest.mark.slow  # agent processes: many starts, restarts and handshakes


@pytest.fixture
def agents() -> Iterator[list[AgentProc]]:
    homes = [new_home(), new_home()]
    procs = [AgentProc(homes[0], "alpha"), AgentProc(homes[1], "beta")]
    yield procs
    for p in procs:
        p.kill()
    for h in homes:
        shutil.rmtree(h, ignore_errors=True)


def pair(a: AgentProc, b: AgentProc) -> tuple[str, str]:
    a.start(peers=[b])
    b.start(peers=[a])
    ida, idb = a.identity()["device_id"], b.identity()["device_id"]
    a.wait_peer(idb, trust="tofu", connected=True)
    b.wait_peer(ida, trust="tofu", connected=True)
    return ida, idb


def trust_log(agent: AgentProc) -> list[dict[str, object]]:
    r = cli(agent.home, "trust", "log", "--json")
    assert r.returncode == 0, r.stderr
    entries: list[dict[str, object]] = json.loads(r.stdout)
    return entries


def test_rotate_key_on_a_running_agent_keeps_its_pairings(agents: list[AgentProc]) -> None:
    a, b = agents
    _ida, idb = pair(a, b)
    r = cli(a.home, "trust", "verify", idb)
    assert r.returncode == 0, r.stderr
    old = b.identity()["fingerprint"]
    r = cli(b.home, "rotate-key", "--json")
    assert r.returncode == 0, r.stderr
    new = json.loads(r.stdout)["fingerprint"]
    assert new != old and b.identity()["fingerprint"] == new
    # a moves its pin along the signed statement, silently, and keeps `verified`.
    entry = a.wait_peer(idb, fingerprint=new, connected=True, trust="verified", timeout=20)
    assert entry["pending_fingerprint"] is None
    kinds = [e["kind"] for e in trust_log(a)]
    assert "rotated" in kinds and "key_changed" not in kinds
    # The pin moved and the decision was made in one step, one entry; reconnects add none.
    assert kinds.count("rotated") == 1 and "match" not in kinds, kinds
    assert "KEY CHANGED" not in a.log()


def test_a_peer_offline_during_two_rotations_follows_the_chain(agents: list[AgentProc]) -> None:
    a, b = agents
    _ida, idb = pair(a, b)
    a.stop()
    for _ in range(2):
        r = cli(b.home, "rotate-key", "--json")
        assert r.returncode == 0, r.stderr
    newest = b.identity()["fingerprint"]
    a.start(peers=[b])
    a.wait_peer(idb, fingerprint=newest, connected=True, trust="tofu", timeout=20)
    assert "key_changed" not in [e["kind"] for e in trust_log(a)]


def replace_key(agent: AgentProc) -> str:
    """Delete the key files (device id kept), as an impersonator or a reinstall would."""
    ident = agent.home / "data" / "identity"
    for name in ("key.pem", "cert.pem"):
        (ident / name).unlink()
    return agent.identity()["fingerprint"]


def test_three_new_keys_for_one_device_id_are_flagged_and_blocked(agents: list[AgentProc]) -> None:
    a, b = agents
    _ida, idb = pair(a, b)
    seen: list[str] = []
    for i in range(3):
        b.stop()
        seen.append(replace_key(b))
        b.start(peers=[a])
        a.wait_peer(idb, pending_fingerprint=seen[-1], connected=False, timeout=20)
        if i < 2:
            # Not yet blocked: still key_changed, waiting for a person.
            assert (a.peer(idb) or {}).get("trust") == "key_changed"
    entry = a.wait_peer(idb, trust="revoked", timeout=10)
    codes = {x["code"] for x in entry["anomalies"]}
    assert "repeated_key_change" in codes
    r = cli(a.home, "anomalies", "--json")
    assert r.returncode == 0
    assert any(x["code"] == "repeated_key_change" and x["device_id"] == idb for x in json.loads(r.stdout))
    wait_for(lambda: "BLOCKED" in a.log(), 5, "the block to be logged")
    # Only a person lets it back.
    r = cli(a.home, "trust", "retrust", idb)
    assert r.returncode == 0, r.stderr
    a.wait_peer(idb, trust="tofu", connected=True, fingerprint=seen[-1], timeout=90)


def test_anomalies_clear_is_logged(agents: list[AgentProc]) -> None:
    a, b = agents
    _ida, idb = pair(a, b)
    r = cli(a.home, "anomalies", "clear", idb[:6])
    assert r.returncode == 0, r.stderr
    assert "anomaly_cleared" in [e["kind"] for e in trust_log(a)]
    r = cli(a.home, "anomalies", "clear", idb, "--code", "bogus")
    assert r.returncode == 1 and "unknown anomaly code" in r.stderr
