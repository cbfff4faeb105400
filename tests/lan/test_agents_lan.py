"""Real `tofu-agent run` processes in private network namespaces, finding each other over mDNS.

Three hosts on one bridge, each agent with mDNS on and no static peer: all pairs connect with
`tofu` trust, one connection per pair; departures are noticed (SIGTERM: at once, by the goodbye
on the link; SIGKILL or a pulled cable: by keepalives, made quick through config.toml); and a
forged advert with a wrong fingerprint is recorded as an anomaly without touching trust.
Every wait is a condition with a deadline; the namespaces and processes go away on failure too.
"""

from __future__ import annotations

import json
import secrets
import signal
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from agent.config import DEFAULT_PORT
from testkit.lan import ForgedAdvert, LanAgent, cleanup_all, established, pairs
from testkit.netns import Lan
from testkit.wait import wait_for

pytestmark = [pytest.mark.lan, pytest.mark.timeout(90), pytest.mark.slow]  # real agents in network namespaces

# Keepalive ping after 1 s idle, link closed 1 s after a missed pong: a dead peer shows in ~2-3 s.
QUICK = {"keepalive_idle": 1.0, "keepalive_timeout": 1.0}
PAIR_DEADLINE = 15.0
LEAVE_DEADLINE = 3.0  # SIGTERM: the leaver closes its links itself
KEEPALIVE_DEADLINE = 6.0  # idle + timeout + a ping in flight + polling, with room for a slow CI box


@pytest.fixture
def agents(lan3: Lan) -> Iterator[list[LanAgent]]:
    """One agent (not started) per host, quick keepalives; killed and their homes deleted afterwards."""
    made = [LanAgent(lan3, i, f"host{i}", config=QUICK) for i in range(3)]
    yield made
    cleanup_all(made)


def connect_all(agents: list[LanAgent]) -> None:
    """Start every agent and wait until each pair is connected with `tofu` trust on both sides."""
    for a in agents:
        a.spawn()
    for a, b in pairs(agents):
        a.wait_peer(b.device_id, PAIR_DEADLINE, connected=True, trust="tofu", fingerprint=b.fingerprint)
        b.wait_peer(a.device_id, PAIR_DEADLINE, connected=True, trust="tofu", fingerprint=a.fingerprint)


def one_connection_per_pair(lan: Lan, agents: list[LanAgent]) -> dict[tuple[str, str], int] | None:
    """None unless every pair has exactly one established TCP connection (seen from both ends)."""
    counts: dict[tuple[str, str], int] = {}
    for a in agents:
        for _local, remote in established(lan, a.host, DEFAULT_PORT):
            counts[(a.address, remote)] = counts.get((a.address, remote), 0) + 1
    want = {(a.address, b.address) for a in agents for b in agents if a is not b}
    return counts if set(counts) == want and all(n == 1 for n in counts.values()) else None


def noticed_gone(watchers: list[LanAgent], gone: LanAgent, deadline: float) -> float:
    """Wait until every watcher shows `gone` as not connected; the seconds it took."""
    t0 = time.monotonic()
    for w in watchers:
        w.wait_peer(gone.device_id, max(0.1, deadline - (time.monotonic() - t0)), connected=False)
    return time.monotonic() - t0


def saw_goodbye(watcher: LanAgent, leaver: LanAgent) -> bool:
    """`watcher` logged the mDNS goodbye of `leaver`."""
    return watcher.count_log(f"{leaver.device_id} withdrew") >= 1


def test_three_agents_discover_and_pair(lan3: Lan, agents: list[LanAgent]) -> None:
    connect_all(agents)
    # Exactly one connection per pair survives, in the kernel's socket table. (Agents started together
    # should not even open a second one, but if a slow machine makes both dial, the duplicate rule
    # closing one is correct; the strict no-second-link check is in the newcomer test below.)
    wait_for(lambda: one_connection_per_pair(lan3, agents), 5, "one TCP connection per pair")
    duplicates = sum(a.count_log("duplicate_connection") for a in agents)
    # The CLI path (a fresh process in the root namespace) reports the same.
    st = agents[0].status()
    assert st is not None and st["running"] is True
    by_id = {p["device_id"]: p for p in st["peers"]}
    for other in agents[1:]:
        assert by_id[other.device_id]["connected"] is True
        assert by_id[other.device_id]["trust"] == "tofu"
        assert by_id[other.device_id]["anomalies"] == []

    # One leaves cleanly: the others notice at once (no keepalive needed) and it exits within 5 s.
    leaver, stay = agents[2], agents[:2]
    took = leaver.stop(signal.SIGTERM)
    assert leaver.returncode() == 0, leaver.log()
    assert took < 5.0, f"SIGTERM took {took:.1f} s"
    noticed = noticed_gone(stay, leaver, LEAVE_DEADLINE)
    for w in stay:
        # Trust outlives the connection; its mDNS goodbye reached the others too.
        assert w.sees(leaver.device_id, trust="tofu", connected=False)
        wait_for(partial(saw_goodbye, w, leaver), 5, f"{w.name} to see {leaver.name}'s mDNS goodbye")
    a, b = stay
    assert a.sees(b.device_id, connected=True) and b.sees(a.device_id, connected=True)
    print(f"SIGTERM: stopped in {took:.2f} s, noticed by both others in {noticed:.2f} s; duplicates {duplicates}")


@pytest.mark.parametrize("how", ["sigkill", "sigstop", "link_cut"])
def test_silent_departure_is_noticed(lan3: Lan, agents: list[LanAgent], how: str) -> None:
    connect_all(agents)
    victim, stay = agents[2], agents[:2]
    assert victim.proc is not None
    if how == "sigkill":
        # No goodbye on the links or on mDNS (its record lingers); its kernel still sends FIN.
        victim.kill()
    elif how == "sigstop":
        # A hung process: sockets stay open, nothing answers; only keepalives can tell.
        victim.proc.send_signal(signal.SIGSTOP)
    else:
        lan3.disconnect(victim.host)  # no RST, no FIN: packets just vanish; only keepalives can tell
    noticed = noticed_gone(stay, victim, KEEPALIVE_DEADLINE)
    a, b = stay
    assert a.sees(b.device_id, connected=True) and b.sees(a.device_id, connected=True)
    if how == "link_cut":
        # The cut-off agent is alive and notices the same about both others.
        noticed_gone([victim], a, KEEPALIVE_DEADLINE)
        noticed_gone([victim], b, KEEPALIVE_DEADLINE)
        # Cable back in: the pairs that lost each other find their way back (dial retries with backoff).
        lan3.reconnect(victim.host)
        for w in stay:
            w.wait_peer(victim.device_id, 40, connected=True, trust="tofu")
            victim.wait_peer(w.device_id, 40, connected=True, trust="tofu")
    print(f"{how}: noticed by both others in {noticed:.2f} s")


def test_newcomer_dials_before_its_own_advert_is_out(lan3: Lan, agents: list[LanAgent]) -> None:
    # The newcomer has the higher device id, so by the usual rule it would wait to be dialled, which
    # cannot happen before its advert is out (~1.2 s of probing). It dials at once instead.
    first, newcomer = sorted(agents[:2], key=lambda a: a.device_id)
    first.start()
    wait_for(lambda: first.count_log("advertising") >= 1, 10, f"{first.name}'s advert")
    newcomer.start()
    newcomer.wait_peer(first.device_id, PAIR_DEADLINE, connected=True, trust="tofu")
    first.wait_peer(newcomer.device_id, 5, connected=True, trust="tofu")
    wait_for(lambda: newcomer.count_log("advertising") >= 1, 10, f"{newcomer.name}'s advert")
    log = newcomer.log()
    assert "before our advert is out; dialling" in log, log
    assert log.index(f"connected to {first.name}") < log.index("advertising"), log
    # Once the newcomer is visible, the first agent (lower id) sees it but does not dial a second link.
    wait_for(lambda: first.count_log(f"found {newcomer.name}") >= 1, 10, f"{first.name} to see the advert")
    wait_for(lambda: one_connection_per_pair(lan3, agents[:2]), 5, "one TCP connection")
    for a, b in ((first, newcomer), (newcomer, first)):
        assert a.count_log(f"connected to {b.name} ({b.device_id})") == 1, a.log()
        assert "duplicate" not in a.log().lower(), a.log()


def test_forged_advert_fingerprint_is_an_anomaly_not_a_pin(lan3: Lan, agents: list[LanAgent], tmp_path: Path) -> None:
    # The lower device id dials: it is the one that acts on the (forged) advert.
    dialler, target = sorted(agents[:2], key=lambda a: a.device_id)
    wrong = secrets.token_hex(32)
    assert wrong != target.fingerprint
    # The target does not advertise itself; the only record for its id is the forged one, published
    # from its own host so the address is right, and only the fingerprint lies.
    target.start("--no-mdns")
    forged = ForgedAdvert(
        lan3,
        target.host,
        [
            {
                "instance": f"forged ({target.device_id[:6]})",
                "port": DEFAULT_PORT,
                "props": {"v": "1", "id": target.device_id, "fp": wrong, "name": target.name},
            }
        ],
        tmp_path,
    )
    try:
        forged.wait_advertised()
        dialler.start()
        seen = dialler.wait_peer(target.device_id, PAIR_DEADLINE, connected=True)
        # Trust comes from the handshake: the proven key is pinned, the advertised one is not.
        assert seen["trust"] == "tofu"
        assert seen["fingerprint"] == target.fingerprint
        assert target.wait_peer(dialler.device_id, 5, connected=True, trust="tofu")["fingerprint"] == (
            dialler.fingerprint
        )
        mismatches = [x for x in seen["anomalies"] if x["code"] == "advert_mismatch"]
        assert len(mismatches) == 1, seen
        # Both keys are named in the evidence: what the record claimed, and what was proven.
        evidence = json.dumps(mismatches[0])
        assert wrong in evidence and target.fingerprint in evidence, mismatches[0]
        assert "ANOMALY advert_mismatch" in dialler.log()
        assert "BLOCKED" not in dialler.log()
        # The CLI shows it too, and a fresh `status` still has the real pin.
        st = dialler.status()
        assert st is not None
        entry = next(p for p in st["peers"] if p["device_id"] == target.device_id)
        assert entry["trust"] == "tofu" and entry["fingerprint"] == target.fingerprint
        assert any(x["code"] == "advert_mismatch" for x in entry["anomalies"])
    finally:
        forged.stop()
