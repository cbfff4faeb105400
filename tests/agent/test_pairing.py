"""Real agents on loopback with static peers: pairing, restart, key change, retrust, revoke, relay."""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity import keys as identity
from testkit.agents import AgentProc, cli, free_port
from testkit.homes import new_home
from testkit.wait import wait_for

pytestmark = pytest.mark.slow  # agent processes: many starts, restarts and handshakes


@pytest.fixture
def homes() -> Iterator[list[Path]]:
    made: list[Path] = []

    def make() -> Path:
        made.append(new_home())
        return made[-1]

    yield [make(), make(), make()]
    for h in made:
        shutil.rmtree(h, ignore_errors=True)


@pytest.fixture
def agents(homes: list[Path]) -> Iterator[list[AgentProc]]:
    procs = [AgentProc(homes[0], "alpha"), AgentProc(homes[1], "beta")]
    yield procs
    for p in procs:
        p.kill()


def pair(a: AgentProc, b: AgentProc) -> tuple[str, str]:
    """Start both (each a static peer of the other) and wait until both show the other connected."""
    a.start(peers=[b])
    b.start(peers=[a])
    ida, idb = a.identity()["device_id"], b.identity()["device_id"]
    a.wait_peer(idb, trust="tofu", connected=True)
    b.wait_peer(ida, trust="tofu", connected=True)
    return ida, idb


def test_two_agents_pair_on_first_use(agents: list[AgentProc]) -> None:
    a, b = agents
    ida, idb = pair(a, b)
    pa, pb = a.peer(idb), b.peer(ida)
    assert pa is not None and pb is not None
    assert pa["fingerprint"] == b.identity()["fingerprint"]
    assert pb["fingerprint"] == a.identity()["fingerprint"]
    assert pa["name"] == "beta" and pb["name"] == "alpha"
    # Exactly one connection survives even though both dial.
    assert a.log().count("connected to beta") >= 1
    log = cli(a.home, "trust", "log", "--json")
    assert '"first_use"' in log.stdout


def test_restart_reconnects_to_the_same_pin(agents: list[AgentProc]) -> None:
    a, b = agents
    _ida, idb = pair(a, b)
    pinned = a.peer(idb)
    assert pinned is not None
    elapsed = b.stop()
    assert elapsed < 5.0, f"clean stop took {elapsed:.1f} s"
    a.wait_peer(idb, connected=False)
    b.start(peers=[a])
    again = a.wait_peer(idb, connected=True, trust="tofu")
    assert again["fingerprint"] == pinned["fingerprint"]
    assert "KEY CHANGED" not in a.log()


def test_replaced_key_is_refused_then_retrust_lets_it_in(agents: list[AgentProc]) -> None:
    a, b = agents
    _ida, idb = pair(a, b)
    old_fp = b.identity()["fingerprint"]
    b.stop()
    # A reinstall, or an impersonator that copied the device id: new key, same id.
    (b.home / "data" / "identity" / "key.pem").unlink()
    (b.home / "data" / "identity" / "cert.pem").unlink()
    new_fp = b.identity()["fingerprint"]
    assert new_fp != old_fp
    b.start(peers=[a])
    entry = a.wait_peer(idb, trust="key_changed", connected=False)
    assert entry["fingerprint"] == old_fp, "the old pin must be kept"
    assert entry["pending_fingerprint"] == new_fp
    warning = wait_for(lambda: "KEY CHANGED" in a.log(), 5, "the key-change warning")
    assert warning
    assert f"trust retrust {idb}" in a.log()
    assert new_fp[:4] in a.log() and old_fp[:4] in a.log()
    # b is told why.
    wait_for(lambda: "key_changed" in b.log(), 10, "b to be told key_changed")

    r = cli(a.home, "trust", "retrust", idb[:8])
    assert r.returncode == 0, r.stderr
    again = a.wait_peer(idb, trust="tofu", connected=True, timeout=20)
    assert again["fingerprint"] == new_fp


def test_revoke_drops_a_connected_peer_at_once(agents: list[AgentProc]) -> None:
    a, b = agents
    ida, idb = pair(a, b)
    r = cli(a.home, "trust", "revoke", idb)
    assert r.returncode == 0, r.stderr
    a.wait_peer(idb, trust="revoked", connected=False, timeout=5)
    b.wait_peer(ida, connected=False, timeout=5)
    wait_for(lambda: "revoked" in b.log(), 5, "b to be told it is revoked")


# -- the relay --------------------------------------------------------------------------------------


class Relay:
    """An attacker between two agents: terminates TLS with its own key on each side and forwards."""

    def __init__(self, target_port: int, home: Path) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = identity.make_certificate(key, "RELAY", dt.datetime.now(dt.UTC))
        (home / "relay.pem").write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        self.server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_ctx.load_cert_chain(home / "relay.pem")
        self.client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.client_ctx.check_hostname = False
        self.client_ctx.verify_mode = ssl.CERT_NONE
        self.target_port = target_port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self.forwarded = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(raw,), daemon=True).start()

    def _relay(self, raw: socket.socket) -> None:
        try:
            inner = self.server_ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            inner.close()
            return
        try:
            outer = self.client_ctx.wrap_socket(upstream)
        except (OSError, ssl.SSLError):
            upstream.close()
            inner.close()
            return
        self.connections += 1

        def pump(src: ssl.SSLSocket, dst: ssl.SSLSocket) -> None:
            try:
                while data := src.recv(65536):
                    self.forwarded += len(data)
                    dst.sendall(data)
            except (OSError, ssl.SSLError):
                pass
            # Wake the other direction's reader with a TCP shutdown. Closing an SSL socket that
            # another thread is reading can crash the interpreter, so only this relay thread
            # closes, once both directions stopped.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(dst, socket.SHUT_RDWR)

        back = threading.Thread(target=pump, args=(outer, inner), daemon=True)
        back.start()
        pump(inner, outer)
        back.join(timeout=30)
        if not back.is_alive():
            for s in (inner, outer):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.mark.parametrize("dialler", ["alpha", "beta"])
def test_relay_between_pinned_agents_fails(agents: list[AgentProc], homes: list[Path], dialler: str) -> None:
    a, b = agents
    ida, idb = pair(a, b)
    fp_a, fp_b = a.identity()["fingerprint"], b.identity()["fingerprint"]
    a.stop()
    b.stop()
    # Now only the relay knows the way: the dialler reaches the other side through it.
    src, dst = (a, b) if dialler == "alpha" else (b, a)
    dst.port = free_port()
    dst.start()
    relay = Relay(dst.port, homes[2])
    try:
        src.start(peers=[AgentProc(homes[2], "relay", relay.port)])
        wait_for(lambda: relay.connections >= 1 and relay.forwarded > 0, 15, "traffic through the relay")
        # The dialler pins dst's key: it sees the relay's TLS key and refuses (cert_mismatch), and
        # dst never accepts an AUTH signed over the relay's fingerprint (auth_failed).
        wait_for(lambda: "cert_mismatch" in src.log() or "auth_failed" in dst.log(), 15, "the relay to be detected")
    finally:
        relay.close()
    for agent, other, fp in ((a, idb, fp_b), (b, ida, fp_a)):
        entry = agent.peer(other) or {}
        assert entry.get("connected") is False
        assert entry.get("trust") == "tofu", "a relay must not change trust"
        assert entry.get("fingerprint") == fp
    log_a = cli(a.home, "trust", "log", "--json").stdout
    assert "key_changed" not in log_a
