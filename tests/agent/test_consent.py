"""Consent before data: the pairing window (the default trust policy) and pending requests.

Real agents on loopback with fresh homes and the default policy (`window`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from agent.host.paths import resolve_paths
from testkit.agents import AgentProc, cli
from testkit.homes import new_home
from testkit.wait import wait_for


def _json(home: Path, *args: str) -> Any:
    r = cli(home, *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.slow
def test_fresh_installs_pair_inside_the_window_and_a_later_stranger_waits_for_approval() -> None:
    ha, hb, hc = new_home(), new_home(), new_home()
    fa, fb, fc = ha / "f", hb / "f", hc / "f"
    a, b, c = AgentProc(ha, "alpha"), AgentProc(hb, "beta"), AgentProc(hc, "guest")
    try:
        a.start("--folder", str(fa))
        b.start("--folder", str(fb), peers=[a])
        ida, idb = a.identity()["device_id"], b.identity()["device_id"]
        # two fresh installs: both windows are open, they pair with no command
        st = a.status()
        assert st is not None and st["trust_policy"] == "window"
        assert st["pairing_window"]["open"] and st["pairing_window"]["reason"] == "fresh install"
        a.wait_peer(idb, connected=True, trust="tofu", timeout=20)
        b.wait_peer(ida, connected=True, trust="tofu", timeout=20)
        (first,) = [e for e in _json(ha, "trust", "log", idb) if e["kind"] == "first_use"]
        assert "via=window" in first["detail"]
        (fa / "secret.txt").write_text("for the household only")
        wait_for(lambda: (fb / "secret.txt").exists(), 20, "beta to receive the file")

        # the window is closed now: a new machine that turns up is pinned as pending, gets nothing
        assert _json(ha, "window", "close")["open"] is False
        c.start("--folder", str(fc), peers=[a])
        idc = c.identity()["device_id"]
        a.wait_peer(idc, trust="pending", connected=False, timeout=20)
        (asking,) = _json(ha, "pending")
        assert asking["device_id"] == idc and asking["fingerprint"] == c.identity()["fingerprint"]
        c.wait_peer(ida, refused_us="waiting for approval on alpha", timeout=20)
        human = cli(hc, "status")
        assert "waiting for approval on alpha" in human.stdout
        assert not (fc / "secret.txt").exists()

        # a person accepts it: it connects within about a second (only it knows the address) and syncs
        r = cli(ha, "trust", "accept", idc, "--json")
        assert r.returncode == 0, r.stderr
        took = _seconds_until_connected(a, idc)
        assert took < 3.0, f"connected {took:.1f} s after the accept"
        wait_for(lambda: (fc / "secret.txt").exists(), 20, "the accepted machine to receive the file")
    finally:
        for p in (a, b, c):
            p.kill()


def _seconds_until_connected(agent: AgentProc, device_id: str) -> float:
    t0 = time.monotonic()
    agent.wait_peer(device_id, connected=True, timeout=20)
    took = time.monotonic() - t0
    print(f"connected {took:.2f} s after the decision")
    return took


@pytest.mark.slow
def test_a_retrust_after_a_key_change_connects_within_seconds() -> None:
    """B is reinstalled (new key, no rotation statement): A refuses it as key_changed; B, which
    alone knows A's address, asks again every second; A's `trust retrust` lets it in at once."""
    ha, hb = new_home(), new_home()
    a, b = AgentProc(ha, "alpha"), AgentProc(hb, "beta")
    try:
        a.start("--folder", str(ha / "f"))
        b.start("--folder", str(hb / "f"), peers=[a])
        idb = b.identity()["device_id"]
        a.wait_peer(idb, connected=True, timeout=20)
        b.stop()
        for name in ("key.pem", "cert.pem"):
            (resolve_paths(hb).identity_dir / name).unlink()
        b.start("--folder", str(hb / "f"), peers=[a])
        a.wait_peer(idb, trust="key_changed", timeout=20)
        ida = a.identity()["device_id"]
        b.wait_peer(ida, refused_us="our key is refused by alpha until a person there re-trusts it", timeout=20)
        assert cli(ha, "trust", "retrust", idb).returncode == 0
        took = _seconds_until_connected(a, idb)
        assert took < 3.0, f"connected {took:.1f} s after the retrust"
    finally:
        a.kill()
        b.kill()


def test_window_commands_need_a_running_agent_and_check_the_duration() -> None:
    home = new_home()
    r = cli(home, "window", "open", "10m")
    assert r.returncode == 1 and "no agent is running" in r.stderr
    r = cli(home, "window", "open", "2h")
    assert r.returncode == 1 and "1 second to 60 minutes" in r.stderr
