"""Fuzz the connection machine beyond test_handshake.py: garbage after a valid prefix, and a hostile link.

test_handshake.py feeds random bytes and plausible frames from the start. Here an honest peer's
exact bytes are cut at any point (frame boundary or not) and followed by garbage, or mutated in
flight (bit flips, deleted, duplicated or swapped spans), fed whole and byte by byte, in both roles.
The invariants are stronger than "parsed or RemoteProtocolError":

- only RemoteProtocolError escapes, and then the machine is in ERROR;
- a `PeerAuthenticated` always names the honest peer's key: no mutation diverts authentication;
  on the server side also its device id (the client signs it); a client may see a bent server
  device id, but then the server refuses the AUTH, so the pair never both reach OPEN with it;
- two honest ends over a mutating link either both open with each other's true identity, or at
  least one side fails or closes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent.errors import RemoteProtocolError
from agent.identity import keys as ident
from agent.identity.keys import Identity
from agent.wire.frames import FrameDecoder
from agent.wire.handshake import (
    Connection,
    ConnectionTerminated,
    Event,
    HandshakeComplete,
    PeerAuthenticated,
    PeerClosed,
    Role,
    State,
)
from agent.wire.messages import Hello, Ping, Ready, encode_message

# Bugs this fuzz found and that are still open are tolerated here (reported as hypothesis events)
# so it can look further; each must have a strict xfail test. None is open: the InvalidVersion
# escape it found is fixed and pinned by test_unknown_x509_version_is_a_protocol_error.
KNOWN_BUGS: tuple[type[Exception], ...] = ()

T0 = 500.0
C_NONCE, S_NONCE = b"C" * 32, b"S" * 32


def _identity(name: str) -> Identity:
    key = ec.generate_private_key(ec.SECP256R1())
    device_id = ident.new_device_id()
    cert = ident.make_certificate(key, device_id, dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    return Identity(device_id, name, key, cert.public_bytes(serialization.Encoding.DER))


CLIENT, SERVER = _identity("client"), _identity("server")


def _client() -> Connection:
    return Connection(Role.CLIENT, CLIENT, C_NONCE, server_fp_tls=SERVER.fingerprint)


def _server() -> Connection:
    return Connection(Role.SERVER, SERVER, S_NONCE)


def _frame_ends(data: bytes) -> list[int]:
    ends, pos = [], 0
    while pos + 4 <= len(data):
        pos += 4 + int.from_bytes(data[pos : pos + 4], "big")
        ends.append(pos)
    return ends


@dataclass(frozen=True)
class Honest:
    """What each honest side sends in a full handshake, then one PING once open."""

    client_bytes: bytes  # HELLO, AUTH, READY, PING
    server_bytes: bytes  # HELLO, READY, PING


def _honest() -> Honest:
    c, s = _client(), _server()
    c.initiate(T0)
    s.initiate(T0)
    c_out, s_out = bytearray(), bytearray()
    for _ in range(4):  # a few rounds of an in-memory link settle the handshake
        cd, sd = c.data_to_send(), s.data_to_send()
        c_out += cd
        s_out += sd
        if sd:
            c.receive_data(sd, T0)
        if cd:
            s.receive_data(cd, T0)
        for conn in (c, s):
            while (ev := conn.next_event()) is not None:
                if isinstance(ev, PeerAuthenticated):
                    conn.accept(T0)
    assert c.state is State.OPEN and s.state is State.OPEN
    ping = len(encode_message(Ping(1))).to_bytes(4, "big") + encode_message(Ping(1))
    return Honest(bytes(c_out) + ping, bytes(s_out) + ping)


HONEST = _honest()
_frame = len(encode_message(Ready(1))).to_bytes(4, "big") + encode_message(Ready(1))


def _feed(conn: Connection, chunks: list[bytes]) -> list[Event]:
    """Feed like the link does (accepting every authenticated peer); the events, or the error state."""
    events: list[Event] = []
    conn.initiate(T0)
    try:
        for chunk in [*chunks, b""]:
            conn.receive_data(chunk, T0)
            while (ev := conn.next_event()) is not None:
                events.append(ev)
                if isinstance(ev, PeerAuthenticated):
                    conn.accept(T0)
        assert isinstance(events[-1], ConnectionTerminated)
        event(f"survived in {conn.state.name}")
    except RemoteProtocolError as exc:
        assert conn.state is State.ERROR
        event(f"error {exc.code}")
    except KNOWN_BUGS as exc:
        event(f"known bug {type(exc).__name__}")
    return events


def _check_authentication(role: Role, events: list[Event]) -> None:
    honest_peer = CLIENT if role is Role.SERVER else SERVER
    for ev in events:
        if isinstance(ev, PeerAuthenticated):
            assert ev.fingerprint == honest_peer.fingerprint, "authentication was diverted to another key"
            if role is Role.SERVER:
                # Only the key is the identity: the rest of the certificate (e.g. its names) is not
                # signed by anything the server checks, so cert_der itself may differ.
                assert ev.device_id == CLIENT.device_id


def _peer_bytes(role: Role) -> bytes:
    return HONEST.client_bytes if role is Role.SERVER else HONEST.server_bytes


@st.composite
def _prefix_then_garbage(draw: st.DrawFn) -> tuple[Role, bytes]:
    role = draw(st.sampled_from(Role))
    honest = _peer_bytes(role)
    cut = draw(st.sampled_from([0, *_frame_ends(honest)]) | st.integers(0, len(honest)))
    garbage = draw(
        st.binary(min_size=1, max_size=64)
        | st.lists(
            st.binary(min_size=1, max_size=40).map(lambda b: len(b).to_bytes(4, "big") + b), min_size=1, max_size=3
        ).map(b"".join)
        | st.sampled_from([_frame, honest[:cut] or b"\x00", b"\xff\xff\xff\xff", b"\x00\x00\x00\x00"])
    )
    return role, honest[:cut] + garbage


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_prefix_then_garbage())
def test_garbage_after_a_valid_prefix_whole_and_byte_by_byte(case: tuple[Role, bytes]) -> None:
    role, wire = case
    for chunks in ([wire], [wire[i : i + 1] for i in range(len(wire))]):
        conn = _client() if role is Role.CLIENT else _server()
        _check_authentication(role, _feed(conn, chunks))


@st.composite
def _mutated(draw: st.DrawFn) -> tuple[Role, bytes]:
    role = draw(st.sampled_from(Role))
    data = bytearray(_peer_bytes(role))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "delete", "duplicate", "swap", "insert"]))
        i = draw(st.integers(0, len(data) - 1))
        j = min(len(data), i + draw(st.integers(1, 40)))
        if kind == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "delete":
            del data[i:j]
        elif kind == "duplicate":
            data[i:i] = data[i:j]
        elif kind == "swap" and j < len(data):
            k = min(len(data), j + (j - i))
            data[i:k] = data[j:k] + data[i:j]
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        if not data:
            data = bytearray(b"\x00")
    return role, bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_mutated())
def test_mutated_honest_stream_never_diverts_authentication(case: tuple[Role, bytes]) -> None:
    role, wire = case
    conn = _client() if role is Role.CLIENT else _server()
    _check_authentication(role, _feed(conn, [wire]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    direction=st.sampled_from(["c2s", "s2c"]),
    offset=st.integers(0, 400),
    bit=st.integers(0, 7),
    chunk=st.integers(1, 97),
)
def test_pair_over_a_link_that_flips_one_bit(direction: str, offset: int, bit: int, chunk: int) -> None:
    """Two honest ends; the link flips one bit once. Both OPEN only with each other's true identity."""
    c, s = _client(), _server()
    c.initiate(T0)
    s.initiate(T0)
    sent = {"c2s": 0, "s2c": 0}
    failed = False
    events: dict[str, list[Event]] = {"c": [], "s": []}
    for _ in range(12):
        moved = False
        for name, src, dst, key in (("s", c, s, "c2s"), ("c", s, c, "s2c")):
            data = bytearray(src.data_to_send())
            if not data:
                continue
            moved = True
            if key == direction and sent[key] <= offset < sent[key] + len(data):
                data[offset - sent[key]] ^= 1 << bit
            sent[key] += len(data)
            try:
                for i in range(0, len(data), chunk):
                    dst.receive_data(bytes(data[i : i + chunk]), T0)
                    while (ev := dst.next_event()) is not None:
                        events[name].append(ev)
                        if isinstance(ev, PeerAuthenticated):
                            dst.accept(T0)
            except RemoteProtocolError:
                failed = True
            except KNOWN_BUGS as exc:
                event(f"known bug {type(exc).__name__}")
                failed = True
        if failed or not moved:
            break
    _check_authentication(Role.CLIENT, events["c"])
    _check_authentication(Role.SERVER, events["s"])
    both_open = c.state is State.OPEN and s.state is State.OPEN
    if both_open:
        assert c.peer is not None and s.peer is not None
        assert (c.peer.device_id, c.peer.fingerprint) == (SERVER.device_id, SERVER.fingerprint)
        assert (s.peer.device_id, s.peer.fingerprint) == (CLIENT.device_id, CLIENT.fingerprint)
        event("both open")
    else:
        assert (
            failed
            or any(isinstance(e, PeerClosed) for e in events["c"] + events["s"])
            or not any(isinstance(e, HandshakeComplete) for e in events["c"] + events["s"])
        )
        event("not both open")


def test_frame_decoder_resumes_exactly_at_frame_boundaries() -> None:
    """The honest streams split into the frames the machine expects (a guard for the fuzz above)."""
    for data in (HONEST.client_bytes, HONEST.server_bytes):
        decoder = FrameDecoder(len(data))
        decoder.feed(data)
        n = 0
        while decoder.next_frame() is not None:
            n += 1
        assert n == len(_frame_ends(data)) and decoder.buffered == 0


@pytest.mark.parametrize("role", list(Role))
def test_unknown_x509_version_is_a_protocol_error(role: Role) -> None:
    peer = CLIENT if role is Role.SERVER else SERVER
    der = bytearray(peer.cert_der)
    at = der.index(bytes.fromhex("a003020102"))
    der[at + 4] = 0x03
    hello = Hello((1,), peer.device_id, peer.name, bytes(der), b"N" * 32)
    body = encode_message(hello)
    conn = _client() if role is Role.CLIENT else _server()
    conn.initiate(T0)
    conn.receive_data(len(body).to_bytes(4, "big") + body, T0)
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.state is State.ERROR
