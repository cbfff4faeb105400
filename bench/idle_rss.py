"""Idle memory of a paired agent (goal: under 45 MB RSS), with mDNS on and off.

Two real `tofu-agent run` processes, each syncing an empty folder, paired and connected, then left
alone for `--settle` seconds; prints each one's VmRSS in MB (10^6 bytes, as `sync_bench.py`).
- mDNS on: in network namespaces built by `testkit/netns.py` (needs root and `ip netns`; nothing
  runs in the root namespace), found over mDNS as a user's agents would be.
- mDNS off: on 127.0.0.1 with static peers (`--no-mdns`), as `sync_bench.py` runs them.
Run from the repository root:

    sudo .venv/bin/python -m bench.idle_rss
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/X.py` as well as `python -m bench.X`

from testkit.agents import AgentProc, rss_kib  # noqa: E402
from testkit.homes import new_home  # noqa: E402
from testkit.lan import LanAgent  # noqa: E402
from testkit.netns import Lan, netns_available  # noqa: E402
from testkit.wait import wait_for  # noqa: E402

GOAL_MB = 45.0


def rss_mb(pid: int) -> float:
    """VmRSS of `pid` in MB."""
    return rss_kib(pid) * 1024 / 1e6


def with_mdns(settle: float) -> list[float]:
    """RSS of two agents paired over mDNS in namespaces."""
    with Lan(2) as lan:
        agents = [LanAgent(lan, i, name) for i, name in enumerate(("alpha", "beta"))]
        try:
            for a in agents:
                (a.home / "folder").mkdir()
                a.start("--folder", str(a.home / "folder"))
            agents[0].wait_peer(agents[1].device_id, connected=True)
            agents[1].wait_peer(agents[0].device_id, connected=True)
            time.sleep(settle)  # the figure is what it holds after start-up work, not a sync point
            return [rss_mb(a.proc.pid) for a in agents if a.proc is not None]
        finally:
            for a in agents:
                a.stop()
                shutil.rmtree(a.home, ignore_errors=True)


def without_mdns(settle: float) -> list[float]:
    """RSS of two agents paired by static address on loopback."""
    homes = [new_home("ta-idle-"), new_home("ta-idle-")]
    agents = [AgentProc(homes[0], "alpha"), AgentProc(homes[1], "beta")]
    try:
        for h in homes:
            (h / "folder").mkdir()
        agents[0].start("--folder", str(homes[0] / "folder"), peers=[agents[1]])
        agents[1].start("--folder", str(homes[1] / "folder"), peers=[agents[0]])
        for me, other in ((agents[0], agents[1]), (agents[1], agents[0])):
            peer = other.identity()["device_id"]

            def connected(me: AgentProc = me, peer: str = peer) -> bool:
                return any(p["device_id"] == peer and p["connected"] for p in (me.status() or {}).get("peers", []))

            wait_for(connected, 20, f"{me.name} to connect")
        time.sleep(settle)
        return [rss_mb(a.proc.pid) for a in agents if a.proc is not None]
    finally:
        for a in agents:
            a.kill()
        for h in homes:
            shutil.rmtree(h, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settle", type=float, default=5.0, help="seconds idle before measuring")
    args = p.parse_args()
    off = without_mdns(args.settle)
    print(f"mDNS off (loopback, static peers): {' / '.join(f'{x:.1f}' for x in off)} MB RSS (goal < {GOAL_MB:.0f})")
    why = netns_available()
    if why is not None:
        print(f"mDNS on: skipped ({why})")
        return 0
    on = with_mdns(args.settle)
    print(f"mDNS on (namespaces, found over mDNS): {' / '.join(f'{x:.1f}' for x in on)} MB RSS (goal < {GOAL_MB:.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
