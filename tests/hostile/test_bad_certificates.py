"""HELLO certificates that the X.509 parser rejects with exceptions outside ValueError.

`cryptography` raises `InvalidVersion` (a plain Exception) for an X.509 version it does not know;
`agent.identity.load_certificate` only translates ValueError, TypeError and UnsupportedAlgorithm.
Found by tests/unit/test_fuzz_handshake.py (one flipped bit in a HELLO certificate).
"""

from __future__ import annotations

import secrets
import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.app import control
from agent.errors import ErrorCode
from agent.host.paths import resolve_paths
from agent.identity.keys import Identity
from agent.wire.messages import Hello
from testkit.agents import AgentProc
from testkit.homes import configure, new_home
from testkit.peer import (
    HostileClient,
    HostileServer,
    ProtocolClient,
    agent_error,
    message_frame,
    new_identity,
    read_messages,
)
from testkit.wait import wait_for


def bad_version_cert(who: Identity) -> bytes:
    """`who`'s certificate with its X.509 version field set to 4 (v5), which cryptography refuses."""
    der = bytearray(who.cert_der)
    marker = bytes.fromhex("a003020102")  # [0] EXPLICIT INTEGER 2 (v3)
    at = der.index(marker)
    der[at + 4] = 0x03
    return bytes(der)


@pytest.fixture
def lone_agent() -> Iterator[tuple[AgentProc, HostileServer, Path]]:
    home = configure(new_home("ta-b-"))
    server = HostileServer(new_identity("evil-server"), home)
    agent = AgentProc(home, "lone")
    agent.start(peers=[AgentProc(home, "evil", server.port)])
    try:
        yield agent, server, home
    finally:
        server.close()
        agent.kill()
        shutil.rmtree(home, ignore_errors=True)


def test_client_hello_with_unparsable_certificate_is_auth_failed(
    lone_agent: tuple[AgentProc, HostileServer, Path],
) -> None:
    agent, _server, _home = lone_agent
    me = new_identity("x")
    with HostileClient(agent.port, source="127.0.0.71") as c:
        c.hello(me, cert=bad_version_cert(me))
        assert c.error_code() is ErrorCode.AUTH_FAILED
    assert "Traceback" not in agent.log()


def test_server_hello_with_unparsable_certificate_does_not_kill_the_dialler(
    lone_agent: tuple[AgentProc, HostileServer, Path],
) -> None:
    agent, server, home = lone_agent

    def script(tls: ssl.SSLSocket, who: Identity) -> ErrorCode | None:
        read_messages(tls, 5.0, stop=lambda m: isinstance(m, Hello))
        tls.sendall(message_frame(Hello((1,), who.device_id, who.name, bad_version_cert(who), secrets.token_bytes(32))))
        return agent_error(tls, 5.0)

    server.script = script
    path = resolve_paths(home).control_socket
    n = server.started
    wait_for(
        lambda: server.started > n or _kick(path) or (agent.proc is not None and agent.proc.poll() is not None),
        10,
        "a dial",
    )
    results = server.wait_idle(10)
    assert results[-1] is ErrorCode.CERT_MISMATCH, f"no ERROR(cert_mismatch):\n{agent.log()[-2500:]}"
    with ProtocolClient(agent.port, new_identity("after"), source="127.0.0.72") as after:
        assert after.handshake(), "the agent no longer serves others"
    assert agent.proc is not None and agent.proc.poll() is None


def _kick(path: Path) -> bool:
    try:
        control.request(path, "trust_changed", {"device_id": "KICK"})
    except Exception:  # the agent may be gone; the caller checks
        return False
    return False
