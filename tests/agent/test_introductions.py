"""Household introductions: a machine admitted on one introducer is trusted by the household.

The first test runs real agents on loopback with fresh homes and the default policy (`window`); the
second drives one agent's message hook in-process with introductions from a fake link.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any, cast

import anyio
import pytest

from agent.app.daemon import Agent
from agent.config import Config
from agent.errors import ErrorCode, RemoteProtocolError
from agent.host.paths import resolve_paths
from agent.identity import keys
from agent.identity.crypto import Identity
from agent.net.link import PeerLink
from agent.trust import window
from agent.trust.introduction import Introduce, make
from agent.trust.model import EventKind, TrustLevel, TrustPolicy
from agent.trust.store import TrustStore
from agent.wire.session import PeerAuthenticated
from testkit.agents import AgentProc, cli
from testkit.homes import new_home
from tests.unit.test_handshake import make_identity


def _json(home: Path, *args: str) -> Any:
    r = cli(home, *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _record(home: Path, device_id: str) -> dict[str, Any]:
    (found,) = [p for p in _json(home, "peers") if p["device_id"] == device_id]
    return dict(found)


@pytest.mark.slow
def test_a_machine_accepted_on_an_introducer_is_trusted_by_the_household_with_no_command() -> None:
    ha, hb, hc = new_home(), new_home(), new_home()
    a, b, c = AgentProc(ha, "alpha"), AgentProc(hb, "beta"), AgentProc(hc, "guest")
    try:
        a.start()
        b.start(peers=[a])
        ida, idb = a.identity()["device_id"], b.identity()["device_id"]
        # two fresh installs pair inside their windows, and each is the other's introducer
        a.wait_peer(idb, connected=True, trust="tofu", timeout=20)
        b.wait_peer(ida, connected=True, trust="tofu", timeout=20)
        assert _record(ha, idb)["introducer"] and _record(hb, ida)["introducer"]

        # the windows close; a third machine turns up at alpha only and waits there
        assert _json(ha, "window", "close")["open"] is False
        assert _json(hb, "window", "close")["open"] is False
        c.start(peers=[a])
        idc = c.identity()["device_id"]
        a.wait_peer(idc, trust="pending", connected=False, timeout=20)
        assert b.peer(idc) is None

        # one approval on alpha: beta trusts it too, with no command on beta
        r = cli(ha, "trust", "accept", idc, "--json")
        assert r.returncode == 0, r.stderr
        a.wait_peer(idc, connected=True, trust="tofu", timeout=20)
        b.wait_peer(idc, trust="tofu", timeout=20)
        on_b = _record(hb, idc)
        assert on_b["fingerprint"] == c.identity()["fingerprint"] and on_b["introducer"] is False
        (first,) = [e for e in _json(hb, "trust", "log", idc) if e["kind"] == "first_use"]
        assert f"via=introduced by alpha ({ida[:8]})" == first["detail"]
        assert "learned device guest" in b.log()
        # the newcomer marked alpha as its introducer in its own fresh-install window: it learns beta
        c.wait_peer(idb, trust="tofu", timeout=20)

        # unmarking alpha on beta is logged, and whom it introduced stays trusted
        off = _json(hb, "trust", "introducer", ida, "off")
        assert off["introducer"] is False
        assert _json(hb, "trust", "log", ida)[0]["kind"] == "introducer_off"
        assert _record(hb, idc)["trust"] == "tofu"
    finally:
        for p in (a, b, c):
            p.kill()


class _FakeLink:
    """What the message hook reads of a link: the peer it authenticated."""

    def __init__(self, ident: Identity) -> None:
        self.peer = PeerAuthenticated(ident.device_id, ident.name, ident.fingerprint, ident.cert_der, (), 1)
        self.address = "192.0.2.7"
        self.is_open = True


def _link(ident: Identity) -> PeerLink:
    return cast(PeerLink, _FakeLink(ident))


def test_introductions_reach_the_store_only_from_a_marked_introducer_and_never_move_a_pin(tmp_path: Path) -> None:
    alpha, mallory = make_identity("alpha"), make_identity("mallory")
    guest_id, pinned_fp, other_fp = "G" * 32, "ab" * 32, "cd" * 32
    now = 1_800_000_000.0

    async def main() -> None:
        paths = resolve_paths(tmp_path / "beta")
        paths.ensure()
        ident = keys.load_or_create(paths, "beta", dt.datetime.now(dt.UTC))
        store = TrustStore(paths.trust_db, TrustPolicy.WINDOW)
        fresh = window.FRESH_INSTALL  # alpha came in through a fresh install's window: an introducer
        store.handshake(alpha.device_id, "alpha", alpha.fingerprint, now, window_open=True, window_reason=fresh)
        store.handshake(mallory.device_id, "mallory", mallory.fingerprint, now, window_open=True)  # not marked
        store.handshake(guest_id, "guest", pinned_fp, now, window_open=True)
        beta = Agent(paths, Config(mdns=False, ui_enabled=False, notify_enabled=False), ident, store)

        # an introduction that names another key than the pinned one: key_changed, the pin stays
        await beta.message(_link(alpha), make(alpha, guest_id, "guest", other_fp, int(now)))
        guest = store.get(guest_id)
        assert guest is not None and guest.trust is TrustLevel.KEY_CHANGED
        assert guest.fingerprint == pinned_fp and guest.pending_fingerprint == other_fp
        assert store.events(guest_id, 1)[0].kind is EventKind.KEY_CHANGED

        # a device we trust but did not mark introduces: ignored, not an error (older peers do it)
        newcomer = "N" * 32
        await beta.message(_link(mallory), make(mallory, newcomer, "newcomer", other_fp, int(now)))
        assert store.get(newcomer) is None
        # an introduction signed by someone else than the link's peer: ignored
        await beta.message(_link(alpha), make(mallory, newcomer, "newcomer", other_fp, int(now)))
        assert store.get(newcomer) is None
        # a bad signature from a marked introducer ends the connection
        forged = Introduce(alpha.device_id, newcomer, "newcomer", other_fp, int(now), b"\x30\x06" + b"\x00" * 6)
        with pytest.raises(RemoteProtocolError) as raised:
            await beta.message(_link(alpha), forged)
        assert raised.value.code is ErrorCode.AUTH_FAILED and store.get(newcomer) is None
        # and a good one pins the newcomer as tofu, saying who vouched
        await beta.message(_link(alpha), make(alpha, newcomer, "newcomer", other_fp, int(now)))
        learned = store.get(newcomer)
        assert learned is not None and learned.trust is TrustLevel.TOFU and learned.fingerprint == other_fp
        assert "introduced by alpha" in store.events(newcomer, 1)[0].detail
        store.close()

    anyio.run(main)
