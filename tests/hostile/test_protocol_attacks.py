"""Attacks in the protocol, against the agent as server: limits, order, forged and replayed AUTH."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from agent.errors import ErrorCode
from agent.identity.keys import Identity
from agent.wire.frames import MAX_FRAME, PRE_AUTH_MAX_FRAME
from agent.wire.messages import Auth, Hello, Ping, Pong, Ready
from testkit.peer import HostileClient, ProtocolClient, frame, new_identity, source_address
from tests.hostile.conftest import Victim

pytestmark = pytest.mark.slow  # a real agent under attack per test (one victim pair per session)

SRC = source_address(10)


def _hello_auth(c: HostileClient, who: Identity) -> Hello:
    """An honest HELLO and AUTH as `who`; the agent's HELLO is returned."""
    c.hello(who)
    server = c.server_hello()
    c.auth(who, server)
    return server


# -- frames over every limit ----------------------------------------------------------------------


PRE_AUTH_TOO_LARGE: list[tuple[str, Callable[[HostileClient, Identity], object]]] = [
    ("header over the pre-auth limit", lambda c, who: c.send_raw((PRE_AUTH_MAX_FRAME + 1).to_bytes(4, "big"))),
    ("header of 4 GiB", lambda c, who: c.send_raw(b"\xff\xff\xff\xff")),
    (
        "pre-auth frame after HELLO",
        lambda c, who: (c.hello(who), c.send_raw(frame(b"\xc0" * (PRE_AUTH_MAX_FRAME + 1)))),
    ),
    ("post-auth-size frame before READY", lambda c, who: (_hello_auth(c, who), c.send_raw(b"\x00\x10\x00\x00"))),
]


def test_frames_over_the_pre_auth_limit(victim: Victim) -> None:
    before = victim.before()
    for label, attack in PRE_AUTH_TOO_LARGE:
        with HostileClient(victim.port, source=SRC) as c:
            attack(c, victim.probe)
            assert c.error_code() is ErrorCode.FRAME_TOO_LARGE, label
    victim.check_after(before)


def test_frame_at_the_pre_auth_limit_is_parsed_not_refused(victim: Victim) -> None:
    """Garbage up to the pre-auth limit (8 KiB) is read and refused as malformed, not as too large."""
    before = victim.before()
    for size in (PRE_AUTH_MAX_FRAME // 2, PRE_AUTH_MAX_FRAME):
        with HostileClient(victim.port, source=SRC) as c:
            c.send_raw(frame(b"\xc1" * size))  # 0xc1 is never valid msgpack
            assert c.error_code() is ErrorCode.MALFORMED
    victim.check_after(before)


def test_frames_over_the_post_auth_limit(victim: Victim) -> None:
    """An authenticated, trusted peer announcing a frame over 4 MiB is cut off; one at 4 MiB is parsed."""
    before = victim.before()
    with ProtocolClient(victim.port, victim.probe, source=SRC) as c:
        assert c.handshake()
        c.send_raw((MAX_FRAME + 1).to_bytes(4, "big"))
        assert c.wait_closed() is ErrorCode.FRAME_TOO_LARGE
    with ProtocolClient(victim.port, victim.probe, source=SRC) as c:
        assert c.handshake()
        c.send_raw(frame(b"\xc1" * MAX_FRAME))
        assert c.wait_closed() is ErrorCode.MALFORMED
    victim.check_after(before)


# -- valid frames out of order --------------------------------------------------------------------

OUT_OF_ORDER: list[tuple[str, Callable[[HostileClient, Identity], object]]] = [
    ("AUTH before HELLO", lambda c, who: c.send(Auth(b"\x30" * 70))),
    ("READY before HELLO", lambda c, who: c.send(Ready(1))),
    ("PING before HELLO", lambda c, who: c.send(Ping(1))),
    ("PONG before HELLO", lambda c, who: c.send(Pong(1))),
    ("READY before AUTH", lambda c, who: (c.hello(who), c.server_hello(), c.send(Ready(1)))),
    ("a second HELLO", lambda c, who: (c.hello(who), c.server_hello(), c.hello(who))),
    ("PING after HELLO", lambda c, who: (c.hello(who), c.server_hello(), c.send(Ping(7)))),
    ("HELLO after AUTH", lambda c, who: (_hello_auth(c, who), c.hello(who))),
    ("PING before READY", lambda c, who: (_hello_auth(c, who), c.send(Ping(7)))),
    ("a second AUTH", lambda c, who: c.auth(who, _hello_auth(c, who))),
]


def test_valid_frames_out_of_order(victim: Victim) -> None:
    before = victim.before()
    for label, attack in OUT_OF_ORDER:
        with HostileClient(victim.port, source=SRC) as c:
            attack(c, victim.probe)
            assert c.error_code() is ErrorCode.UNEXPECTED_MESSAGE, label
    victim.check_after(before)


def test_ready_for_another_version_and_hello_without_common_version(victim: Victim) -> None:
    before = victim.before()
    with HostileClient(victim.port, source=SRC) as c:
        c.hello(victim.probe, versions=(7, 9))
        assert c.error_code() is ErrorCode.VERSION_MISMATCH
    with HostileClient(victim.port, source=SRC) as c:
        _hello_auth(c, victim.probe)
        c.send(Ready(2))
        assert c.error_code() is ErrorCode.VERSION_MISMATCH
    victim.check_after(before)


# -- forged and replayed AUTH ---------------------------------------------------------------------


def test_forged_auth_is_refused_and_changes_no_trust(victim: Victim) -> None:
    """Claiming a pinned device: garbage signature, another key's signature, a relay's transcript."""
    before = victim.before()
    mallory = new_identity("mallory")
    probe = victim.probe
    with HostileClient(victim.port, source=SRC) as c:  # a random "signature"
        c.hello(probe)
        c.server_hello()
        c.send(Auth(b"\x30\x44" + b"\x02\x20" + b"\x11" * 32 + b"\x02\x20" + b"\x22" * 32))
        assert c.error_code() is ErrorCode.AUTH_FAILED
    with HostileClient(victim.port, source=SRC) as c:  # the right transcript, signed by Mallory
        c.hello(probe)
        c.auth(mallory, c.server_hello(), client_fp=probe.fingerprint, device_id=probe.device_id)
        assert c.error_code() is ErrorCode.AUTH_FAILED
    with HostileClient(victim.port, source=SRC) as c:  # the probe's key, but over another server key (a relay)
        c.hello(probe)
        server = c.server_hello()
        c.server_fp = mallory.fingerprint
        c.auth(probe, server)
        assert c.error_code() is ErrorCode.AUTH_FAILED
    with HostileClient(victim.port, source=SRC) as c:  # Mallory's certificate, signed by nobody valid
        c.hello(mallory, device_id=probe.device_id)
        c.server_hello()
        c.send(Auth(b"\x00" * 64))
        assert c.error_code() is ErrorCode.AUTH_FAILED
    victim.check_after(before)


def test_auth_replayed_from_another_session_fails(victim: Victim) -> None:
    """An attacker recorded a whole honest client session (HELLO, AUTH, READY) and plays it back."""
    before = victim.before()
    with ProtocolClient(victim.port, victim.probe, source=SRC) as honest:
        assert honest.handshake()
        recorded = bytes(honest.log.sent)
    for _ in range(3):
        with HostileClient(victim.port, source=SRC) as c:
            c.send_raw(recorded)
            assert c.error_code() is ErrorCode.AUTH_FAILED
    victim.check_after(before)
