"""The connection machine: two ends joined in memory, real ECDSA keys, explicit time."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from agent.identity import keys as ident
from agent.identity.keys import Identity
from agent.wire.frames import MAX_FRAME, PRE_AUTH_MAX_FRAME, FrameDecoder, encode_frame
from agent.wire.handshake import (
    TRANSITIONS,
    Connection,
    ConnectionTerminated,
    Event,
    HandshakeComplete,
    MessageReceived,
    PeerAuthenticated,
    PeerClosed,
    Role,
    State,
    auth_transcript,
)
from agent.wire.messages import (
    Auth,
    Error,
    Hello,
    Ping,
    Pong,
    Ready,
    WireMessage,
    decode_message,
    encode_message,
    field_bytes,
    register,
)

T0 = 1000.0
C_NONCE, S_NONCE = b"c" * 32, b"s" * 32


@register("test_blob")
@dataclass(frozen=True, slots=True)
class Blob(WireMessage):
    """An application message, standing in for the sync layer's."""

    data: bytes

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> Blob:
        return cls(data=field_bytes(fields, "data"))


def make_identity(name: str) -> Identity:
    key = ec.generate_private_key(ec.SECP256R1())
    device_id = ident.new_device_id()
    cert = ident.make_certificate(key, device_id, dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    return Identity(device_id, name, key, cert.public_bytes(serialization.Encoding.DER))


class Ids:
    """Three devices with real keys (a plain class, so failure reports stay short)."""

    def __init__(self) -> None:
        self.alice = make_identity("alice")  # the client
        self.bob = make_identity("bob")  # the server
        self.mallory = make_identity("mallory")  # an attacker with her own key

    def __repr__(self) -> str:
        return "Ids(alice, bob, mallory)"


@pytest.fixture(scope="module")
def ids() -> Ids:
    return Ids()


def drain(conn: Connection) -> list[Event]:
    events = []
    while (event := conn.next_event()) is not None:
        events.append(event)
    return events


def frames_of(data: bytes) -> list[WireMessage]:
    decoder = FrameDecoder(MAX_FRAME)
    decoder.feed(data)
    out = []
    while (body := decoder.next_frame()) is not None:
        out.append(decode_message(body))
    return out


class Pair:
    """A client and a server joined by a perfect in-memory link (h11's ConnectionPair)."""

    def __init__(self, client: Connection, server: Connection) -> None:
        self.client, self.server = client, server
        self.now = T0

    @classmethod
    def of(cls, ids: Ids, *, keepalive_idle: float = 15.0, keepalive_timeout: float = 10.0) -> Pair:
        idle, timeout = keepalive_idle, keepalive_timeout
        client = Connection(
            Role.CLIENT,
            ids.alice,
            C_NONCE,
            server_fp_tls=ids.bob.fingerprint,
            keepalive_idle=idle,
            keepalive_timeout=timeout,
        )
        server = Connection(Role.SERVER, ids.bob, S_NONCE, keepalive_idle=idle, keepalive_timeout=timeout)
        return cls(client, server)

    def start(self) -> None:
        self.client.initiate(self.now)
        self.server.initiate(self.now)

    def pump(self) -> tuple[list[Event], list[Event]]:
        """Deliver bytes both ways until quiet; the events each side saw (client, server)."""
        seen: tuple[list[Event], list[Event]] = ([], [])
        moved = True
        while moved:
            moved = False
            for src, dst, events in ((self.client, self.server, seen[1]), (self.server, self.client, seen[0])):
                data = src.data_to_send()
                if data:
                    moved = True
                    dst.receive_data(data, self.now)
                events.extend(drain(dst))
        return seen

    def authenticate(self) -> None:
        self.start()
        c_events, s_events = self.pump()
        assert [type(e) for e in c_events] == [PeerAuthenticated]
        assert [type(e) for e in s_events] == [PeerAuthenticated]

    def open(self) -> None:
        self.authenticate()
        self.client.accept(self.now)
        self.server.accept(self.now)
        assert self.pump() == ([HandshakeComplete(1)], [HandshakeComplete(1)])


@pytest.mark.parametrize("order", ["client_first", "server_first", "server_first_unpumped"])
def test_successful_handshake(ids: Ids, order: str) -> None:
    pair = Pair.of(ids)
    pair.start()
    c_events, s_events = pair.pump()
    assert c_events == [PeerAuthenticated(ids.bob.device_id, "bob", ids.bob.fingerprint, ids.bob.cert_der, (), 1)]
    assert s_events == [
        PeerAuthenticated(ids.alice.device_id, "alice", ids.alice.fingerprint, ids.alice.cert_der, (), 1)
    ]
    first, second = (pair.client, pair.server) if order == "client_first" else (pair.server, pair.client)
    first.accept(pair.now)
    if order != "server_first_unpumped":
        pair.pump()  # the first READY arrives while the other side still decides
        assert second.state is State.AWAIT_DECISION_PEER_READY
        assert first.state is State.EXPECT_READY
    second.accept(pair.now)
    c_events, s_events = pair.pump()
    assert c_events == s_events == [HandshakeComplete(1)]
    assert pair.client.state is pair.server.state is State.OPEN
    assert pair.client.peer is not None and pair.client.peer.device_id == ids.bob.device_id


def test_open_connection_carries_large_app_messages_and_answers_ping(ids: Ids) -> None:
    pair = Pair.of(ids)
    pair.open()
    big = Blob(bytes(MAX_FRAME - 100))  # far over the pre-auth limit
    pair.client.send(big)
    pair.server.send(Blob(b"small"))
    assert pair.pump() == ([MessageReceived(Blob(b"small"))], [MessageReceived(big)])
    pair.server.receive_data(encode_frame(encode_message(Ping(42))), pair.now)
    assert drain(pair.server) == []
    assert frames_of(pair.server.data_to_send()) == [Pong(42)]


def test_rotations_reach_the_peer(ids: Ids) -> None:
    client = Connection(Role.CLIENT, ids.alice, C_NONCE, server_fp_tls=ids.bob.fingerprint)
    server = Connection(Role.SERVER, ids.bob, S_NONCE, rotations=(b"stmt-1", b"stmt-2"))
    pair = Pair(client, server)
    pair.start()
    c_events, _ = pair.pump()
    assert isinstance(c_events[0], PeerAuthenticated) and c_events[0].rotations == (b"stmt-1", b"stmt-2")


@pytest.mark.parametrize("code", [ErrorCode.KEY_CHANGED, ErrorCode.REVOKED, ErrorCode.PENDING])
@pytest.mark.parametrize("refuser", ["client", "server"])
def test_refusal_reaches_the_peer_with_its_code(ids: Ids, code: ErrorCode, refuser: str) -> None:
    pair = Pair.of(ids)
    pair.authenticate()
    me, peer = (pair.client, pair.server) if refuser == "client" else (pair.server, pair.client)
    peer.accept(pair.now)  # the other side already trusts us: its READY is in flight
    me.refuse(code, "why \x07 it was refused", pair.now)
    assert me.state is State.CLOSED
    c_events, s_events = pair.pump()
    peer_events = s_events if refuser == "client" else c_events
    assert peer_events == [PeerClosed(code, "why ? it was refused")]
    assert peer.state is State.CLOSED and me.get_timer() is None and peer.get_timer() is None
    peer.receive_data(b"", pair.now)
    assert drain(peer) == [ConnectionTerminated(graceful=True)]


def test_close_when_open_reaches_the_peer(ids: Ids) -> None:
    pair = Pair.of(ids)
    pair.open()
    pair.server.close()
    pair.client.send(Blob(b"crossed in flight"))  # ignored by the server, which already closed
    assert pair.pump() == ([PeerClosed(ErrorCode.SHUTTING_DOWN, "")], [])


def _relay_hello(server_out: bytes, cert: bytes) -> bytes:
    (hello,) = frames_of(server_out)
    assert isinstance(hello, Hello)
    return encode_frame(encode_message(replace(hello, cert=cert)))


def test_relay_with_its_own_tls_key_fails_auth_at_the_server(ids: Ids) -> None:
    # Mallory terminates TLS on both sides with her key: the client's TLS shows her fingerprint,
    # and she rewrites the server's HELLO to carry her certificate so the client's check passes.
    client = Connection(Role.CLIENT, ids.alice, C_NONCE, server_fp_tls=ids.mallory.fingerprint)
    server = Connection(Role.SERVER, ids.bob, S_NONCE)
    client.initiate(T0)
    server.initiate(T0)
    client.receive_data(_relay_hello(server.data_to_send(), ids.mallory.cert_der), T0)
    (event,) = drain(client)
    # The client sees bob's device id with mallory's key: the trust layer reports key_changed.
    assert isinstance(event, PeerAuthenticated) and event.fingerprint == ids.mallory.fingerprint
    server.receive_data(client.data_to_send(), T0)  # HELLO and AUTH, forwarded unchanged
    with pytest.raises(RemoteProtocolError) as info:
        drain(server)
    assert info.value.code is ErrorCode.AUTH_FAILED
    assert frames_of(server.data_to_send()) == [Error(ErrorCode.AUTH_FAILED, str(info.value))]
    assert server.state is State.ERROR


def test_relay_showing_the_real_server_hello_is_a_cert_mismatch(ids: Ids) -> None:
    client = Connection(Role.CLIENT, ids.alice, C_NONCE, server_fp_tls=ids.mallory.fingerprint)
    server = Connection(Role.SERVER, ids.bob, S_NONCE)
    client.initiate(T0)
    server.initiate(T0)
    client.receive_data(server.data_to_send(), T0)
    with pytest.raises(RemoteProtocolError) as info:
        drain(client)
    assert info.value.code is ErrorCode.CERT_MISMATCH
    assert [type(m) for m in frames_of(client.data_to_send())] == [Hello, Error]  # no AUTH was sent


@dataclass(frozen=True)
class Impostor:
    """Shows someone else's certificate but can only sign with its own key."""

    real: Identity
    key: ec.EllipticCurvePrivateKey

    @property
    def device_id(self) -> str:
        return self.real.device_id

    @property
    def name(self) -> str:
        return self.real.name

    @property
    def cert_der(self) -> bytes:
        return self.real.cert_der

    @property
    def fingerprint(self) -> str:
        return self.real.fingerprint

    def sign(self, data: bytes) -> bytes:
        return ident.sign(self.key, data)


def _server_verdict(server: Connection, wire: bytes) -> RemoteProtocolError:
    server.initiate(T0)
    server.receive_data(wire, T0)
    with pytest.raises(RemoteProtocolError) as info:
        drain(server)
    return info.value


def test_forged_auth_fails(ids: Ids) -> None:
    impostor = Impostor(ids.alice, ids.mallory.key)
    client = Connection(Role.CLIENT, impostor, C_NONCE, server_fp_tls=ids.bob.fingerprint)
    pair = Pair(client, Connection(Role.SERVER, ids.bob, S_NONCE))
    pair.start()
    with pytest.raises(RemoteProtocolError) as info:
        pair.pump()
    assert info.value.code is ErrorCode.AUTH_FAILED


def test_auth_replayed_from_another_session_fails(ids: Ids) -> None:
    recorded = _client_hello_and_auth(ids)  # alice's HELLO and AUTH for server nonce S_NONCE
    control = Connection(Role.SERVER, ids.bob, S_NONCE)
    control.initiate(T0)
    control.receive_data(recorded, T0)
    assert [type(e) for e in drain(control)] == [PeerAuthenticated]  # valid in its own session
    verdict = _server_verdict(Connection(Role.SERVER, ids.bob, b"n" * 32), recorded)
    assert verdict.code is ErrorCode.AUTH_FAILED


def _client_hello_and_auth(ids: Ids) -> bytes:
    client = Connection(Role.CLIENT, ids.alice, C_NONCE, server_fp_tls=ids.bob.fingerprint)
    server = Connection(Role.SERVER, ids.bob, S_NONCE)
    client.initiate(T0)
    server.initiate(T0)
    client.receive_data(server.data_to_send(), T0)
    drain(client)
    return client.data_to_send()


def test_transcript_is_what_the_client_signs(ids: Ids) -> None:
    wire = _client_hello_and_auth(ids)
    _hello, auth = frames_of(wire)
    assert isinstance(auth, Auth)
    transcript = auth_transcript(
        version=1,
        server_fingerprint=ids.bob.fingerprint,
        client_fingerprint=ids.alice.fingerprint,
        client_nonce=C_NONCE,
        server_nonce=S_NONCE,
        client_device_id=ids.alice.device_id,
        server_device_id=ids.bob.device_id,
    )
    assert transcript.startswith(b"tofu-agent/v1/auth\x00\x00\x00\x02\x00\x01\x00\x00\x00\x20")
    assert len(transcript) == 18 + 7 * 4 + 2 + 32 + 32 + 32 + 32 + 32 + 32
    assert ident.verify_signature(ids.alice.key.public_key(), auth.signature, transcript)


@pytest.mark.parametrize(
    ("client_versions", "server_versions", "chosen"), [((1, 2, 3), (2, 3, 4), 3), ((5,), (1, 5), 5)]
)
def test_highest_common_version_is_chosen(
    ids: Ids, client_versions: tuple[int, ...], server_versions: tuple[int, ...], chosen: int
) -> None:
    client = Connection(Role.CLIENT, ids.alice, C_NONCE, server_fp_tls=ids.bob.fingerprint, versions=client_versions)
    pair = Pair(client, Connection(Role.SERVER, ids.bob, S_NONCE, versions=server_versions))
    pair.start()
    c_events, s_events = pair.pump()
    assert [e.version for e in c_events + s_events if isinstance(e, PeerAuthenticated)] == [chosen, chosen]
    pair.client.accept(pair.now)
    pair.server.accept(pair.now)
    assert pair.pump() == ([HandshakeComplete(chosen)], [HandshakeComplete(chosen)])


@pytest.mark.parametrize("side", ["client", "server"])
def test_no_common_version(ids: Ids, side: str) -> None:
    client = Connection(Role.CLIENT, ids.alice, C_NONCE, server_fp_tls=ids.bob.fingerprint, versions=(2,))
    server = Connection(Role.SERVER, ids.bob, S_NONCE)
    client.initiate(T0)
    server.initiate(T0)
    me, peer = (client, server) if side == "client" else (server, client)
    me.receive_data(peer.data_to_send(), T0)
    with pytest.raises(RemoteProtocolError) as info:
        drain(me)
    assert info.value.code is ErrorCode.VERSION_MISMATCH


def _bent_certs(cert: bytes) -> list[bytes]:
    """`cert` with an unknown key algorithm, an unknown curve, a bad point, and no DER at all."""
    alg, curve = bytes.fromhex("06072A8648CE3D0201"), bytes.fromhex("06082A8648CE3D030107")
    return [
        cert.replace(alg, bytes.fromhex("06072A8648CE3D0209")),
        cert.replace(curve, bytes.fromhex("06082A8648CE3D030109")),
        cert.replace(b"\x03\x42\x00\x04", b"\x03\x42\x00\x05"),
        b"not a certificate",
    ]


@pytest.mark.parametrize("variant", range(4))
@pytest.mark.parametrize(
    ("role", "code"), [(Role.CLIENT, ErrorCode.CERT_MISMATCH), (Role.SERVER, ErrorCode.AUTH_FAILED)]
)
def test_unusable_hello_certificate(ids: Ids, variant: int, role: Role, code: ErrorCode) -> None:
    peer = ids.bob if role is Role.CLIENT else ids.alice
    cert = _bent_certs(peer.cert_der)[variant]
    conn = _fresh(ids, role)
    conn.receive_data(_frames(Hello((1,), peer.device_id, peer.name, cert, b"p" * 32)), T0)
    with pytest.raises(RemoteProtocolError) as info:
        drain(conn)
    assert info.value.code is code


@pytest.mark.parametrize("side", ["client", "server"])
def test_self_connection(ids: Ids, side: str) -> None:
    client = Connection(Role.CLIENT, ids.alice, C_NONCE, server_fp_tls=ids.alice.fingerprint)
    server = Connection(Role.SERVER, ids.alice, S_NONCE)
    client.initiate(T0)
    server.initiate(T0)
    me, peer = (client, server) if side == "client" else (server, client)
    me.receive_data(peer.data_to_send(), T0)
    with pytest.raises(RemoteProtocolError) as info:
        drain(me)
    assert info.value.code is ErrorCode.SELF_CONNECTION


def _frames(*messages: WireMessage) -> bytes:
    return b"".join(encode_frame(encode_message(m)) for m in messages)


@pytest.mark.parametrize(
    ("role", "script"),
    [
        (Role.SERVER, [Auth(b"sig")]),  # AUTH before HELLO
        (Role.SERVER, [Ready(1)]),
        (Role.SERVER, [Ping(1)]),  # keepalive only once open
        (Role.SERVER, [Blob(b"app data before the handshake")]),
        (Role.SERVER, ["hello", "hello"]),
        (Role.SERVER, ["hello", Ready(1)]),  # READY before AUTH
        (Role.CLIENT, [Auth(b"sig")]),
        (Role.CLIENT, ["hello", Auth(b"servers never send AUTH")]),
        (Role.CLIENT, ["hello", "hello"]),
    ],
)
def test_out_of_order_messages(ids: Ids, role: Role, script: list[WireMessage | str]) -> None:
    peer_id = ids.alice if role is Role.SERVER else ids.bob
    peer_hello = Hello((1,), peer_id.device_id, peer_id.name, peer_id.cert_der, b"p" * 32)
    conn = (
        Connection(Role.SERVER, ids.bob, S_NONCE)
        if role is Role.SERVER
        else Connection(Role.CLIENT, ids.alice, C_NONCE, server_fp_tls=ids.bob.fingerprint)
    )
    conn.initiate(T0)
    conn.receive_data(_frames(*(peer_hello if isinstance(m, str) else m for m in script)), T0)
    with pytest.raises(RemoteProtocolError) as info:
        drain(conn)
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE


def test_message_before_open_after_auth_is_unexpected(ids: Ids) -> None:
    pair = Pair.of(ids)
    pair.authenticate()
    pair.server.receive_data(_frames(Blob(b"too early")), pair.now)
    with pytest.raises(RemoteProtocolError) as info:
        drain(pair.server)
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE


def test_oversized_pre_auth_frame_is_refused_at_its_header(ids: Ids) -> None:
    server = Connection(Role.SERVER, ids.bob, S_NONCE)
    server.initiate(T0)
    server.data_to_send()
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_data((PRE_AUTH_MAX_FRAME + 1).to_bytes(4, "big") + b"\x80", T0)
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert frames_of(server.data_to_send())[0] == Error(ErrorCode.FRAME_TOO_LARGE, str(info.value))


def test_handshake_deadline(ids: Ids) -> None:
    pair = Pair.of(ids)
    pair.authenticate()  # stuck waiting for a trust decision that never comes
    assert pair.client.get_timer() == T0 + 5.0
    pair.client.handle_timer(T0 + 4.9)
    assert pair.client.data_to_send() == b""
    with pytest.raises(RemoteProtocolError) as info:
        pair.client.handle_timer(T0 + 5.0)
    assert info.value.code is ErrorCode.TIMEOUT
    assert [type(m) for m in frames_of(pair.client.data_to_send())] == [Error]
    assert pair.client.get_timer() is None


def test_keepalive_ping_then_missed_pong(ids: Ids) -> None:
    pair = Pair.of(ids, keepalive_idle=15.0, keepalive_timeout=10.0)
    pair.open()
    client = pair.client
    assert client.get_timer() == T0 + 15.0
    client.handle_timer(T0 + 14.0)
    assert client.data_to_send() == b""
    client.handle_timer(T0 + 15.0)
    assert frames_of(client.data_to_send()) == [Ping(1)]
    assert client.get_timer() == T0 + 25.0
    client.receive_data(_frames(Pong(1)), T0 + 16.0)  # the PONG resets the idle clock
    assert drain(client) == []
    assert client.get_timer() == T0 + 31.0
    client.handle_timer(T0 + 31.0)
    assert frames_of(client.data_to_send()) == [Ping(2)]
    with pytest.raises(RemoteProtocolError) as info:
        client.handle_timer(T0 + 41.0)
    assert info.value.code is ErrorCode.TIMEOUT


def test_any_data_counts_as_alive(ids: Ids) -> None:
    pair = Pair.of(ids)
    pair.open()
    pair.now = T0 + 14.0
    pair.server.send(Blob(b"busy"))
    pair.pump()
    assert pair.client.get_timer() == T0 + 29.0


def test_errors_poison_the_connection(ids: Ids) -> None:
    server = Connection(Role.SERVER, ids.bob, S_NONCE)
    server.initiate(T0)
    server.receive_data(b"\x00\x00\x00\x01\xc1", T0)
    with pytest.raises(RemoteProtocolError):
        server.next_event()
    assert server.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        server.next_event()
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"x", T0)
    with pytest.raises(LocalProtocolError):
        server.accept(T0)
    assert [type(m) for m in frames_of(server.data_to_send())] == [Hello, Error]
    assert server.get_timer() is None


def test_eof_during_handshake_terminates(ids: Ids) -> None:
    pair = Pair.of(ids)
    pair.start()
    pair.server.receive_data(pair.client.data_to_send()[:10], T0)
    pair.server.receive_data(b"", T0)
    assert drain(pair.server) == [ConnectionTerminated(graceful=False)]
    assert pair.server.state is State.CLOSED


def test_misuse_raises_local_errors(ids: Ids) -> None:
    with pytest.raises(LocalProtocolError):
        Connection(Role.CLIENT, ids.alice, C_NONCE)  # no TLS fingerprint
    with pytest.raises(LocalProtocolError):
        Connection(Role.SERVER, ids.bob, b"short")
    pair = Pair.of(ids)
    with pytest.raises(LocalProtocolError):
        pair.client.receive_data(b"x", T0)  # before initiate
    pair = Pair.of(ids)
    pair.authenticate()
    with pytest.raises(LocalProtocolError):
        pair.client.send(Blob(b"not open yet"))
    pair = Pair.of(ids)
    pair.open()
    with pytest.raises(LocalProtocolError):
        pair.client.send(Ping(1))
    pair = Pair.of(ids)
    pair.open()
    with pytest.raises(LocalProtocolError):
        pair.client.accept(T0)


def test_transition_table_is_total_over_live_states() -> None:
    for role, table in TRANSITIONS.items():
        assert State.ERROR not in table and State.CLOSED not in table
        assert all("error" in inputs for inputs in table.values()), role


# -- garbage in: only RemoteProtocolError may come out --------------------------------------------


def _feed_all(conn: Connection, chunks: list[bytes]) -> None:
    try:
        for chunk in chunks:
            conn.receive_data(chunk, T0)
            drain(conn)
    except RemoteProtocolError:
        assert conn.state is State.ERROR


def _fresh(ids: Ids, role: Role) -> Connection:
    if role is Role.CLIENT:
        conn = Connection(Role.CLIENT, ids.alice, C_NONCE, server_fp_tls=ids.bob.fingerprint)
    else:
        conn = Connection(Role.SERVER, ids.bob, S_NONCE)
    conn.initiate(T0)
    return conn


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    garbage=st.binary(max_size=400) | st.lists(st.binary(min_size=1, max_size=60).map(encode_frame)).map(b"".join),
    role=st.sampled_from(Role),
)
def test_random_bytes_whole_and_byte_by_byte(ids: Ids, garbage: bytes, role: Role) -> None:
    _feed_all(_fresh(ids, role), [garbage])
    _feed_all(_fresh(ids, role), [garbage[i : i + 1] for i in range(len(garbage))])


def _peer_opening(ids: Ids, role: Role) -> bytes:
    """What an honest peer sends first to a `_fresh` connection of `role`."""
    if role is Role.SERVER:
        return _client_hello_and_auth(ids)
    server = Connection(Role.SERVER, ids.bob, S_NONCE)
    server.initiate(T0)
    return server.data_to_send()


def _hello_of(peer: Identity, versions: tuple[int, ...], nonce: bytes) -> Hello:
    return Hello(versions, peer.device_id, peer.name, peer.cert_der, nonce)


def _plausible(ids: Ids, role: Role) -> st.SearchStrategy[bytes]:
    """What a confused or hostile peer might send: real messages in random order, some bent."""
    peer = st.sampled_from([ids.alice, ids.bob, ids.mallory])
    hellos = st.builds(
        _hello_of,
        peer,
        st.sampled_from([(1,), (2,), (1, 2)]),
        st.binary(min_size=32, max_size=32),
    )
    message = st.one_of(
        hellos,
        st.builds(Auth, st.binary(min_size=1, max_size=80)),
        st.builds(Ready, st.integers(1, 2)),
        st.builds(Ping, st.integers(0, 5)),
        st.builds(Pong, st.integers(0, 5)),
        st.builds(Error, st.sampled_from(ErrorCode)),
        st.builds(Blob, st.binary(max_size=20)),
    )
    frame = message.map(lambda m: encode_frame(encode_message(m)))
    # Often start like an honest peer (then READY), so the fuzz also reaches the open state.
    opening = _peer_opening(ids, role)
    start = st.sampled_from([b"", opening, *[opening + _frames(Ready(1))] * 3])
    rest = st.lists(frame | st.binary(max_size=12), max_size=5).map(b"".join)
    return st.builds(bytes.__add__, start, rest)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), role=st.sampled_from(Role), accept=st.sampled_from([True, True, False]))
def test_plausible_frames_whole_and_byte_by_byte(ids: Ids, data: st.DataObject, role: Role, accept: bool) -> None:
    wire = data.draw(_plausible(ids, role))
    for chunks in ([wire] if wire else [], [wire[i : i + 1] for i in range(len(wire))]):
        conn = _fresh(ids, role)
        try:
            for chunk in chunks:
                conn.receive_data(chunk, T0)
                while (ev := conn.next_event()) is not None:  # act on each event, as a shell does
                    if isinstance(ev, PeerAuthenticated) and accept:
                        conn.accept(T0)
            event(f"reached {conn.state.name}")
            conn.receive_data(b"", T0)
            assert isinstance(drain(conn)[-1], ConnectionTerminated)
        except RemoteProtocolError as exc:
            event(f"error {exc.code}")
            assert conn.state is State.ERROR
