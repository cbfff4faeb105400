"""The web page served by a real agent: `tofu-agent ui` logs a browser in, the page shows the
agent's own status, and an action on it reaches the running agent at once."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from agent.host.paths import resolve_paths
from testkit.agents import AgentProc, cli
from testkit.homes import new_home


def _home_with_ui() -> Path:
    home = new_home()
    paths = resolve_paths(home)
    paths.ensure()
    paths.config_file.write_text("[ui]\nport = 0\n[notify]\nenabled = false\n")
    return home


@pytest.mark.slow
def test_login_then_accept_a_pending_device_from_the_page() -> None:
    ha, hc = _home_with_ui(), new_home()
    a, c = AgentProc(ha, "alpha"), AgentProc(hc, "guest")
    try:
        a.start("--folder", str(ha / "f"))
        assert cli(ha, "window", "close").returncode == 0
        c.start("--folder", str(hc / "f"), peers=[a])
        idc = c.identity()["device_id"]
        a.wait_peer(idc, trust="pending", timeout=20)

        r = cli(ha, "ui", "--no-open", "--json")
        assert r.returncode == 0, r.stderr
        url = json.loads(r.stdout)["url"]
        base = url.split("/login")[0]
        assert base.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=base, follow_redirects=False, timeout=10) as web:
            login = web.get(url)
            assert login.status_code == 303 and "token" not in login.headers["location"]
            assert web.get(url).status_code != 303, "a login address works once"
            page = web.get("/")
            assert page.status_code == 200 and "guest" in page.text, page.text
            device = web.get(f"/device/{idc}")
            csrf = re.search(r'name="csrf" value="([^"]+)"', device.text)
            assert csrf is not None, device.text[:2000]
            fp = c.identity()["fingerprint"]
            form = {"csrf": csrf.group(1), "action": "accept", "device": idc, "fingerprint": fp, "confirmed": "yes"}
            done = web.post("/act", data=form, headers={"Origin": base, "Sec-Fetch-Site": "same-origin"})
            assert done.status_code == 303, done.text[:2000]
            assert "is now tofu" in web.get(done.headers["location"]).text
        a.wait_peer(idc, trust="tofu", connected=True, timeout=20)
    finally:
        a.kill()
        c.kill()


def _logged_in(home: Path) -> tuple[httpx.Client, str]:
    r = cli(home, "ui", "--no-open", "--json")
    assert r.returncode == 0, r.stderr
    url = json.loads(r.stdout)["url"]
    base = url.split("/login")[0]
    web = httpx.Client(base_url=base, follow_redirects=False, timeout=10)
    assert web.get(url).status_code == 303
    return web, base


@pytest.mark.slow
def test_a_code_pairing_started_on_the_page_pairs_with_a_machine_that_types_the_code() -> None:
    ha, hb = _home_with_ui(), new_home()
    a, b = AgentProc(ha, "alpha"), AgentProc(hb, "beta")
    try:
        a.start("--folder", str(ha / "f"))
        b.start("--folder", str(hb / "f"))
        idb = b.identity()["device_id"]
        web, base = _logged_in(ha)
        try:
            page = web.get("/this")
            csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert csrf is not None
            form = {"csrf": csrf.group(1), "action": "pair_start", "confirmed": "yes", "back": "/this"}
            done = web.post("/act", data=form, headers={"Origin": base, "Sec-Fetch-Site": "same-origin"})
            assert done.status_code == 303
            shown = web.get(done.headers["location"]).text
            m = re.search(r"pairing code (\d+-[a-z]+-[a-z]+) \(port (\d+)\)", shown)
            assert m is not None, shown[:3000]
        finally:
            web.close()
        joined = cli(hb, "pair", m.group(1), "--peer", f"127.0.0.1:{m.group(2)}", "--json", timeout=60)
        assert joined.returncode == 0, joined.stderr
        assert json.loads(joined.stdout)["trust"] == "verified"
        a.wait_peer(idb, trust="verified", timeout=20)
    finally:
        a.kill()
        b.kill()
