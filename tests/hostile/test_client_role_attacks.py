"""Attacks on the agent as the dialling side: a hostile server it has as a static peer."""

from __future__ import annotations

import secrets
import ssl
from collections.abc import Callable

import pytest

from agent.errors import ErrorCode
from agent.identity.keys import Identity
from agent.wire.frames import PRE_AUTH_MAX_FRAME
from agent.wire.handshake import HANDSHAKE_TIMEOUT
from agent.wire.messages import Auth, Hello, Ping, Ready, WireMessage
from testkit.peer import agent_error, frame, message_frame, new_identity, read_messages
from testkit.wait import wait_for
from tests.hostile.conftest import Victim

pytestmark = pytest.mark.slow  # a real agent under attack per test (one victim pair per session)

Script = Callable[[ssl.SSLSocket, Identity], object]


def _hello(who: Identity, cert: bytes | None = None) -> Hello:
    return Hello((1,), who.device_id, who.name, cert or who.cert_der, secrets.token_bytes(32))


def _after_agent_hello(*send: bytes | Callable[[Identity], WireMessage]) -> Script:
    """A script: wait for the agent's HELLO, send each item (bytes, or a message built from our identity)."""

    def script(tls: ssl.SSLSocket, who: Identity) -> ErrorCode | None:
        got, _ = read_messages(tls, 5.0, stop=lambda m: isinstance(m, Hello))
        assert got and isinstance(got[-1], Hello), f"the agent sent {got} instead of HELLO"
        for item in send:
            tls.sendall(item if isinstance(item, bytes) else message_frame(item(who)))
        return agent_error(tls, HANDSHAKE_TIMEOUT + 3)

    return script


MALLORY = new_identity("mallory")

SCRIPTS: list[tuple[str, Script, ErrorCode]] = [
    ("AUTH from the server", _after_agent_hello(lambda w: Auth(b"\x30" * 70)), ErrorCode.UNEXPECTED_MESSAGE),
    ("READY before HELLO", _after_agent_hello(lambda w: Ready(1)), ErrorCode.UNEXPECTED_MESSAGE),
    ("PING before HELLO", _after_agent_hello(lambda w: Ping(1)), ErrorCode.UNEXPECTED_MESSAGE),
    ("HELLO twice", _after_agent_hello(_hello, _hello), ErrorCode.UNEXPECTED_MESSAGE),
    ("PING before READY", _after_agent_hello(_hello, lambda w: Ping(3)), ErrorCode.UNEXPECTED_MESSAGE),
    (
        "HELLO with another certificate than TLS showed",
        _after_agent_hello(lambda w: _hello(w, MALLORY.cert_der)),
        ErrorCode.CERT_MISMATCH,
    ),
    (
        "oversized pre-auth frame",
        _after_agent_hello((PRE_AUTH_MAX_FRAME + 1).to_bytes(4, "big")),
        ErrorCode.FRAME_TOO_LARGE,
    ),
    ("garbage frame", _after_agent_hello(frame(secrets.token_bytes(300))), ErrorCode.MALFORMED),
    ("nesting bomb", _after_agent_hello(frame(b"\x91" * (PRE_AUTH_MAX_FRAME - 1) + b"\xc0")), ErrorCode.MALFORMED),
    ("huge declared array", _after_agent_hello(frame(b"\xdd\xff\xff\xff\xff")), ErrorCode.MALFORMED),
    ("silence after TLS", _after_agent_hello(), ErrorCode.TIMEOUT),
]


def test_hostile_server_scripts(victim: Victim) -> None:
    """The agent dials a hostile server; every misbehaviour ends in the right ERROR and nothing else."""
    before = victim.before()
    server = victim.server
    pinned_before = server.who.device_id in before.trust.peers
    try:
        for label, script, expected in SCRIPTS:
            server.wait_idle(HANDSHAKE_TIMEOUT + 10)
            n = server.started
            server.script = script
            # A kick that lands while a dial is in progress is lost (the dial loop replaces its
            # event afterwards), so kick until the server sees a new connection.
            wait_for(_kicked(victim, n), 10, f"the agent to dial for {label!r}")
            results = server.wait_idle(HANDSHAKE_TIMEOUT + 10)[n:]
            assert results, label
            for result in results:
                if isinstance(result, Exception):
                    raise AssertionError(f"{label}: {result!r}")
                assert result is expected, f"{label}: the agent answered {result}, expected {expected}"
    finally:
        server.script = None
    # A server that proves its key in HELLO is a stranger pinned on first use (then misbehaves).
    events: tuple[tuple[str, str], ...] = () if pinned_before else ((server.who.device_id, "first_use"),)
    victim.check_after(before, expected_events=events, changed=frozenset({server.who.device_id}))


def _kicked(victim: Victim, started: int) -> Callable[[], bool]:
    def check() -> bool:
        victim.redial()
        return victim.server.started > started

    return check
