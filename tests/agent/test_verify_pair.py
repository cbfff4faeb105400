"""`verify`, `pair` and `trust add` with real processes on loopback (issue 6).

Pairing runs `tofu-agent pair --no-mdns --bind 127.0.0.1` (mDNS only ever runs in the namespaces of
tests/lan) and `tofu-agent pair CODE --peer 127.0.0.1:PORT`. Every wait has a deadline.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.from_thread import start_blocking_portal
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import ErrorCode
from agent.identity import keys as identity
from agent.identity.keys import Identity, new_device_id
from agent.net import transport
from agent.net.pairing_net import ClosedByPeer, PairLink
from agent.wire.handshake import Role
from testkit import ROOT
from testkit.agents import AgentProc, cli
from testkit.homes import new_home
from tests.agent.test_pairing import Relay

JOIN_TIMEOUT = "15"


def ident(home: Path) -> dict[str, str]:
    r = cli(home, "id", "--json")
    assert r.returncode == 0, r.stderr
    result: dict[str, str] = json.loads(r.stdout)
    return result


def peers(home: Path) -> dict[str, dict[str, Any]]:
    r = cli(home, "peers", "--json")
    assert r.returncode == 0, r.stderr
    return {p["device_id"]: p for p in json.loads(r.stdout)}


def uri(home: Path) -> str:
    r = cli(home, "id", "--uri")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def verify_json(home: Path, device: str, *extra: str) -> dict[str, Any]:
    r = cli(home, "verify", device, "--json", *extra)
    assert r.returncode == 0, r.stderr
    result: dict[str, Any] = json.loads(r.stdout)
    return result


def new_key(home: Path) -> None:
    """A reinstall (or an impersonator with the same device id): a new key for the same id."""
    (home / "data" / "identity" / "key.pem").unlink()
    (home / "data" / "identity" / "cert.pem").unlink()


def import_tofu(home: Path, other: Path) -> None:
    """Pin `other`'s current key in `home` as plain `tofu` (as first contact would)."""
    o = ident(other)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    doc = {"version": 1, "peers": {o["device_id"]: {"name": o["name"], "fingerprint": o["fingerprint"],
                                                    "first_seen": now, "last_seen": now, "trust": "tofu"}}}  # fmt: skip
    path = home / "import.json"
    path.write_text(json.dumps(doc))
    r = cli(home, "trust", "import", str(path))
    assert r.returncode == 0, r.stderr


# -- the waiting side -------------------------------------------------------------------------------


class Waiting:
    """`tofu-agent pair --json` as a process: its first line gives the code and the port."""

    def __init__(self, home: Path, timeout: float = 20.0, *extra: str) -> None:
        self.home = home
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "--home", str(home), "pair", "--json", "--no-mdns",
             "--bind", "127.0.0.1", "--timeout", str(timeout), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ),
        )  # fmt: skip
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        assert ready, "the waiting side printed nothing within 20 s"
        first = json.loads(self.proc.stdout.readline())
        self.code: str = first["code"]
        self.port: int = first["port"]
        assert first["expires_in"] == timeout

    def finish(self, timeout: float = 20.0) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)


def join(home: Path, code: str, port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli(home, "pair", code, "--peer", f"127.0.0.1:{port}", "--timeout", JOIN_TIMEOUT, *extra, timeout=40)


def wrong_code(code: str) -> str:
    """The same nameplate with other words (as a mistyped or guessed code would be)."""
    nameplate, words = code.split("-", 1)
    return f"{nameplate}-{'abandon-ability' if words != 'abandon-ability' else 'ability-abandon'}"


# -- safety numbers ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_safety_number_is_equal_on_both_sides_and_changes_with_either_key(homes: list[Path]) -> None:
    a, b = homes[0], homes[1]
    assert cli(a, "trust", "add", uri(b)).returncode == 0
    assert cli(b, "trust", "add", uri(a)).returncode == 0
    ida, idb = ident(a)["device_id"], ident(b)["device_id"]
    first = verify_json(a, idb)["safety_number"]
    assert first == verify_json(b, ida)["safety_number"]
    assert len(first) == 60 and first.isdigit()

    # b's key changes: b's own number changes at once; a still shows the pinned (old) key's number.
    new_key(b)
    b_side = verify_json(b, ida)["safety_number"]
    assert b_side != first
    assert verify_json(a, idb)["safety_number"] == first
    # a pins b's new key (forget + add the new URI): the two match again.
    assert cli(a, "trust", "forget", idb).returncode == 0
    assert cli(a, "trust", "add", uri(b)).returncode == 0
    assert verify_json(a, idb)["safety_number"] == b_side

    # And a's key: both halves count.
    new_key(a)
    a_side = verify_json(a, idb)["safety_number"]
    assert a_side not in (first, b_side)
    assert verify_json(b, ida)["safety_number"] == b_side


@pytest.mark.slow
def test_verify_json_changes_nothing_without_yes_and_yes_verifies(homes: list[Path]) -> None:
    a, b = homes[0], homes[1]
    import_tofu(a, b)
    idb = ident(b)["device_id"]
    shown = verify_json(a, idb[:6])
    assert shown["device_id"] == idb and shown["verified"] is False and shown["key"] == "pinned"
    assert peers(a)[idb]["trust"] == "tofu"
    # A person who says no (or just presses enter) changes nothing; the command says so and fails.
    r = cli(a, "verify", idb)
    assert r.returncode == 1 and "nothing changed" in r.stderr and "Traceback" not in r.stderr
    assert "Do the numbers match on both machines? [y/N]" in r.stdout
    assert peers(a)[idb]["trust"] == "tofu"
    before = len(json.loads(cli(a, "trust", "log", "--json").stdout))

    done = verify_json(a, idb, "--yes")
    assert done["verified"] is True and done["trust"] == "verified"
    assert done["safety_number"] == shown["safety_number"]
    assert peers(a)[idb]["trust"] == "verified"
    log = json.loads(cli(a, "trust", "log", idb, "--json").stdout)
    assert len(log) == before + 1 and log[0]["kind"] == "verified"


def test_verify_unknown_device_is_one_line(homes: list[Path]) -> None:
    r = cli(homes[0], "verify", "ZZZZZZ")
    assert r.returncode == 1
    assert r.stderr.startswith("tofu-agent: ") and r.stderr.count("\n") == 1


# -- pairing ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pairing_with_the_right_code_verifies_both(homes: list[Path]) -> None:
    a, b = homes[0], homes[1]
    w = Waiting(a)
    try:
        r = join(b, w.code, w.port)
        code, out, err = w.finish()
    finally:
        w.kill()
    assert r.returncode == 0, r.stderr
    assert code == 0, err
    ia, ib = ident(a), ident(b)
    assert peers(a)[ib["device_id"]]["trust"] == "verified"
    assert peers(a)[ib["device_id"]]["fingerprint"] == ib["fingerprint"]
    assert peers(b)[ia["device_id"]]["trust"] == "verified"
    assert peers(b)[ia["device_id"]]["fingerprint"] == ia["fingerprint"]
    assert "paired with" in r.stdout
    assert json.loads(out)["paired"] is True
    log = json.loads(cli(a, "trust", "log", "--json").stdout)
    assert log[0]["kind"] == "added" and "paired" in log[0]["detail"]
    # Both now show the same safety number, of course.
    assert verify_json(a, ib["device_id"])["safety_number"] == verify_json(b, ia["device_id"])["safety_number"]


@pytest.mark.slow
def test_wrong_code_fails_on_both_sides_and_burns_the_code(homes: list[Path]) -> None:
    a, b = homes[0], homes[1]
    w = Waiting(a)
    try:
        r = join(b, wrong_code(w.code), w.port)
        code, _, err = w.finish()
    finally:
        w.kill()
    for rc, stderr in ((r.returncode, r.stderr), (code, err)):
        assert rc == 1
        assert "pairing code was wrong" in stderr
        assert "Traceback" not in stderr
    assert peers(a) == {} and peers(b) == {}
    # The right code is no good now: nothing waits any more.
    again = join(b, w.code, w.port)
    assert again.returncode == 1 and "new code" in again.stderr
    assert peers(a) == {} and peers(b) == {}


@pytest.mark.slow
def test_the_code_expires(homes: list[Path]) -> None:
    a, b = homes[0], homes[1]
    w = Waiting(a, timeout=1.5)
    t0 = time.monotonic()
    try:
        code, _, err = w.finish(timeout=15)
    finally:
        w.kill()
    assert code == 1 and "expired" in err
    assert 1.0 < time.monotonic() - t0 < 10
    r = join(b, w.code, w.port)
    assert r.returncode == 1
    assert peers(a) == {} and peers(b) == {}


@pytest.mark.slow
def test_a_tls_relay_fails_and_does_not_burn_the_code(homes: list[Path]) -> None:
    a, b = homes[0], homes[1]
    w = Waiting(a)
    relay = Relay(w.port, homes[2])
    try:
        r = join(b, w.code, relay.port)
        assert r.returncode == 1
        assert "not end to end" in r.stderr
        assert relay.connections >= 1
        assert peers(b) == {}
        # Nothing secret reached the relay: the code still works directly.
        ok = join(b, w.code, w.port)
        code, _, err = w.finish()
    finally:
        relay.close()
        w.kill()
    assert ok.returncode == 0, ok.stderr
    assert code == 0, err
    assert "did not pair (the code is still good)" in err


class PakeRelay:
    """A relay that speaks the protocol: its own key towards each side, pairing messages forwarded as they are."""

    def __init__(self, target_port: int) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        device_id = new_device_id()
        cert = identity.make_certificate(key, device_id, dt.datetime.now(dt.UTC))
        self.identity = Identity(device_id, "relay", key, cert.public_bytes(serialization.Encoding.DER))
        self.home = new_home("ta-relay-")
        (self.home / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (self.home / "k.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        self.target_port = target_port
        self.forwarded: list[str] = []
        self.port = 0
        self._ready = threading.Event()
        self._portal_cm = start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        self._main: Future[None] = self._portal.start_task_soon(self._serve)
        assert self._ready.wait(10)

    async def _serve(self) -> None:
        ctx = transport.server_context(self.home / "c.pem", self.home / "k.pem")
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        self._ready.set()
        async with listener:
            await listener.serve(lambda tcp: self._one(tcp, ctx))

    async def _one(self, tcp: anyio.abc.SocketStream, ctx: Any) -> None:
        deadline = time.monotonic() + 20
        tls_in = await transport.wrap_server(tcp, ctx)
        async with transport.dial("127.0.0.1", self.target_port, transport.client_context()) as tls_out:
            fp = identity.fingerprint_of_cert(transport.peer_certificate(tls_out))
            inner = PairLink(tls_in, Role.SERVER, self.identity, deadline)
            outer = PairLink(tls_out, Role.CLIENT, self.identity, deadline, server_fp_tls=fp)
            await inner.open()
            await outer.open()

            async def pump(src: PairLink, dst: PairLink) -> None:
                try:
                    while True:
                        message = await src.receive()
                        self.forwarded.append(message.TYPE)
                        await dst.send([message])
                except ClosedByPeer as exc:
                    await dst.close(exc.code or ErrorCode.SHUTTING_DOWN, exc.reason)
                tg.cancel_scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(pump, inner, outer)
                tg.start_soon(pump, outer, inner)
        await transport.close_quietly(tls_in)

    def close(self) -> None:
        self._main.cancel()
        self._portal_cm.__exit__(None, None, None)
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.mark.slow
def test_a_relay_forwarding_the_pairing_messages_fails_on_both_sides(homes: list[Path]) -> None:
    a, b = homes[0], homes[1]
    w = Waiting(a)
    relay = PakeRelay(w.port)
    try:
        r = join(b, w.code, relay.port)
        code, _, err = w.finish()
    finally:
        relay.close()
        w.kill()
    # It knew nothing it could not forward, and forwarded all of it: the two sides hashed different
    # fingerprints (the relay's, where each expected the other's), so both confirmations failed.
    assert "pair_pake" in relay.forwarded and "pair_confirm" in relay.forwarded
    assert r.returncode == 1 and "pairing code was wrong" in r.stderr
    assert code == 1 and "pairing code was wrong" in err
    assert peers(a) == {} and peers(b) == {}


@pytest.mark.slow
def test_pairing_refuses_a_device_pinned_to_another_key(homes: list[Path]) -> None:
    a, b = homes[0], homes[1]
    assert cli(a, "trust", "add", uri(b)).returncode == 0
    new_key(b)
    w = Waiting(a)
    try:
        r = join(b, w.code, w.port)
        code, _, err = w.finish()
    finally:
        w.kill()
    assert code == 1 and "pinned to another key" in err and "trust forget" in err
    assert r.returncode == 1 and "pinned to another key" in r.stderr
    ib = ident(b)
    assert peers(a)[ib["device_id"]]["fingerprint"] != ib["fingerprint"]
    assert peers(b) == {}


def test_usage_mistakes_are_one_line(homes: list[Path]) -> None:
    for args in (
        ["pair", "--peer", "127.0.0.1:1"],
        ["pair", "7-not-acode"],
        ["pair", "1-abandon-ability", "--port", "5"],
    ):
        r = cli(homes[0], *args)
        assert r.returncode == 1, args
        assert r.stderr.startswith("tofu-agent: ") and r.stderr.count("\n") == 1, r.stderr


# -- with running agents ----------------------------------------------------------------------------


@pytest.fixture
def agents(homes: list[Path]) -> Iterator[list[AgentProc]]:
    procs = [AgentProc(homes[0], "alpha"), AgentProc(homes[1], "beta")]
    yield procs
    for p in procs:
        p.kill()


@pytest.mark.slow
def test_trust_add_prepins_then_key_change_then_verify_the_new_key(agents: list[AgentProc]) -> None:
    a, b = agents
    idb = b.identity()["device_id"]
    old_fp = b.identity()["fingerprint"]
    assert cli(a.home, "trust", "add", uri(b.home)).returncode == 0
    a.start(peers=[b])
    b.start(peers=[a])
    a.wait_peer(idb, trust="verified", connected=True)

    # Another key under the same id: key_changed, the old pin kept.
    b.stop()
    new_key(b.home)
    new_fp = b.identity()["fingerprint"]
    b.start(peers=[a])
    entry = a.wait_peer(idb, trust="key_changed", connected=False)
    assert entry["fingerprint"] == old_fp and entry["pending_fingerprint"] == new_fp

    # `verify` compares the NEW key, and says so; b's own number (from its new key) matches it.
    shown = verify_json(a.home, idb)
    assert shown["key"] == "pending" and shown["fingerprint"] == new_fp
    assert shown["safety_number"] == verify_json(b.home, a.identity()["device_id"])["safety_number"]
    human = cli(a.home, "verify", idb)
    assert "NEW key" in human.stdout and human.returncode == 1
    assert peers(a.home)[idb]["trust"] == "key_changed"

    # Confirming pins the new key as verified, and the running agent lets b in at once.
    done = verify_json(a.home, idb, "--yes")
    assert done["trust"] == "verified" and done["fingerprint"] == new_fp
    a.wait_peer(idb, trust="verified", connected=True, fingerprint=new_fp, timeout=20)
    log = json.loads(cli(a.home, "trust", "log", idb, "--json").stdout)
    verified = [e for e in log if e["kind"] == "verified"]
    assert verified[0]["fingerprint"] == new_fp and verified[0]["old_fingerprint"] == old_fp


@pytest.mark.slow
def test_code_policy_agent_admits_a_device_once_paired(agents: list[AgentProc]) -> None:
    a, b = agents
    idb = b.identity()["device_id"]
    a.start("--trust-policy", "code", peers=[b])
    b.start(peers=[a])
    a.wait_peer(idb, trust="pending", connected=False)
    # Pair while both agents run: the pairing commands use their own port and the same identities.
    w = Waiting(a.home)
    try:
        r = join(b.home, w.code, w.port)
        code, _, err = w.finish()
    finally:
        w.kill()
    assert r.returncode == 0, r.stderr
    assert code == 0, err
    a.wait_peer(idb, trust="verified", connected=True, timeout=20)
    b.wait_peer(a.identity()["device_id"], trust="verified", connected=True, timeout=20)
