"""An mDNS flood of hundreds of fake services, inside private network namespaces (never the root one).

Host 0 runs the victim agent, host 2 the flooder (tests/hostile/mdns_flood.py), host 1 a real agent
started after the flood. The victim has the lower device id, so it is the one that must dial.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.net.discovery import MAX_SERVICES
from testkit import ROOT
from testkit.agents import rss_kib, snapshot
from testkit.homes import configure, new_home
from testkit.lan import LanAgent, cleanup_all
from testkit.netns import Lan, netns_available
from testkit.wait import wait_for

pytestmark = [pytest.mark.lan, pytest.mark.slow]  # real agents in network namespaces

FLOOD = Path(__file__).with_name("mdns_flood.py")


@pytest.fixture(autouse=True)
def _needs_netns() -> None:
    reason = netns_available()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def lan() -> Iterator[Lan]:
    with Lan(3) as lan:
        yield lan


def _ordered_agents(lan: Lan) -> tuple[LanAgent, LanAgent]:
    """Victim on host 0 and peer on host 1, the victim with the lower device id (so it dials)."""
    one = LanAgent(lan, 0, "victim", home=configure(new_home()))
    two = LanAgent(lan, 1, "peer", home=configure(new_home()))
    if one.device_id > two.device_id:
        one.host, two.host = 1, 0
        one, two = two, one
        one.name, two.name = "victim", "peer"
    return one, two


class Flooder:
    def __init__(self, lan: Lan, host: int, count: int) -> None:
        self.proc = lan.popen(
            host,
            [sys.executable, str(FLOOD), "--count", str(count), "--address", lan.hosts[host].address],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
        self.rounds = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if json.loads(line).get("ev") == "sent":
                self.rounds += 1


def _advertised(agent: LanAgent) -> int:
    return sum(1 for p in agent.peers().values() if p["trust"] == "unknown")


def _flood_then_pair(lan: Lan, count: int) -> None:
    victim, peer = _ordered_agents(lan)
    try:
        victim.start()
        assert victim.proc is not None
        rss0 = rss_kib(victim.proc.pid)
        flooder = Flooder(lan, 2, count)
        expected = min(count, MAX_SERVICES)
        # All of them (or a full table): only then is the race with the real peer's advert decided.
        wait_for(lambda: _advertised(victim) >= expected, 30, f"the victim to see {expected} fakes")
        wait_for(lambda: flooder.rounds >= 3, 10, "three flood rounds")
        before = snapshot(victim.home)
        peer.start()
        victim.wait_peer(peer.device_id, connected=True, trust="tofu", timeout=15)
        peer.wait_peer(victim.device_id, connected=True, trust="tofu", timeout=5)
        growth = rss_kib(victim.proc.pid) - rss0
        print(f"FIGURE mdns flood {count}: victim saw {_advertised(victim)} fakes, paired; RSS +{growth // 1024} MiB")
        assert growth < 48 * 1024, f"RSS grew by {growth // 1024} MiB under the flood"
        after = snapshot(victim.home)
        assert set(after.peers) - set(before.peers) == {peer.device_id}, "a fake service got into the trust store"
        assert "Traceback" not in victim.log()
    finally:
        cleanup_all([victim, peer])


def test_mdns_flood_under_the_cap_then_a_real_peer_pairs(lan: Lan) -> None:
    """200 fake services re-announced every second: the real peer is still found and paired."""
    _flood_then_pair(lan, 200)


def test_mdns_flood_over_the_cap_then_a_real_peer_pairs(lan: Lan) -> None:
    """400 fakes: the victim's table is full (256) and it ignores any new advert, the real peer's too.

    Pairing still works because a starting agent dials every peer it sees before its own advert
    is out, and the victim answers its query at once while the flooder only announces. A flooder
    that also answered queries could fill the newcomer's table first (see docs/RELIABILITY.md).
    """
    _flood_then_pair(lan, 400)
