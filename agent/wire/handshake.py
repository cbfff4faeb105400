"""The connection state machine: HELLO/AUTH/READY handshake, then an open message channel.

Theory of operation
-------------------
Sans-I/O, in the style of h11: the I/O shell feeds bytes in (`receive_data`, ``b""`` for EOF),
pulls events out (`next_event` until None), makes calls (`initiate`, `accept`, `refuse`,
`send`, `close`, `handle_timer`), and after every call writes `data_to_send()` to the transport
and re-arms its timer from `get_timer()`. Time is always passed in as `now` (monotonic seconds).

The transport is TLS 1.3 authenticated by the server's certificate only. Both sides send HELLO at
once. The client checks that the certificate in the server's HELLO is the one TLS showed it,
then signs the auth transcript (`auth_transcript`) and sends AUTH; the transcript names the
server's key as the client saw it in TLS, so a relay terminating TLS with its own key makes the
server's check fail. The server verifies AUTH with the key in the client's HELLO certificate.
Each side then emits `PeerAuthenticated`; the caller decides trust outside the machine and calls
`accept` (sends READY) or `refuse` (sends ERROR, CLOSED). The connection is OPEN, with
`HandshakeComplete`, once we accepted and the peer's READY arrived, in either order.

Frames are parsed one per `next_event` step, so the frame limit can grow from 8 KiB to 4 MiB
exactly at OPEN. A peer's ERROR in any state gives `PeerClosed` and CLOSED; in CLOSED the rest
of the stream is ignored; EOF gives `ConnectionTerminated` last. Any `ProtocolError` raised by a
call poisons the machine into ERROR (later calls raise LocalProtocolError) and queues an ERROR
message with the error's code: the shell catches the exception, sends `data_to_send()`, closes.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import ErrorCode, IdentityError, LocalProtocolError, ProtocolError, RemoteProtocolError
from agent.identity.crypto import fingerprint_of_public_key, public_key_of_cert, verify_signature
from agent.identity.ids import is_fingerprint
from agent.wire.frames import MAX_FRAME, PRE_AUTH_MAX_FRAME, FrameDecoder, frame_header
from agent.wire.messages import (
    CONTROL_TYPES,
    NONCE_LEN,
    SUPPORTED_VERSIONS,
    Auth,
    Error,
    Hello,
    Ping,
    Pong,
    Ready,
    WireMessage,
    clean_reason,
    decode_message,
    encode_message,
)
from agent.wire.session import (
    KEEPALIVE_IDLE,
    KEEPALIVE_TIMEOUT,
    ConnectionTerminated,
    Event,
    HandshakeComplete,
    Keepalive,
    KeepaliveAction,
    LocalIdentity,
    MessageReceived,
    PeerAuthenticated,
    PeerClosed,
)

# The events and the identity protocol live in session.py; they are re-exported here.
__all__ = [
    "AUTH_LABEL", "HANDSHAKE_TIMEOUT", "KEEPALIVE_IDLE", "KEEPALIVE_TIMEOUT", "TRANSITIONS", "Connection",
    "ConnectionTerminated", "Event", "HandshakeComplete", "LocalIdentity", "MessageReceived",
    "PeerAuthenticated", "PeerClosed", "Role", "State", "auth_transcript",
]  # fmt: skip

HANDSHAKE_TIMEOUT: Final = 5.0
AUTH_LABEL: Final = b"tofu-agent/v1/auth"
_LEN: Final = struct.Struct(">I")


class Role(Enum):
    """CLIENT dialed and checks the server's TLS certificate; SERVER accepted and proves by TLS."""

    CLIENT = "client"
    SERVER = "server"


class State(Enum):
    """Named after what the connection expects next."""

    IDLE = "idle"  # our initiate()
    EXPECT_HELLO = "expect_hello"  # the peer's HELLO
    EXPECT_AUTH = "expect_auth"  # server only: the client's AUTH
    AWAIT_DECISION = "await_decision"  # our accept()/refuse(); the peer's READY may come first
    AWAIT_DECISION_PEER_READY = "await_decision_peer_ready"  # our accept()/refuse(); READY is here
    EXPECT_READY = "expect_ready"  # we accepted: the peer's READY
    OPEN = "open"  # application messages, PING/PONG
    CLOSED = "closed"  # an ERROR was sent or received; the rest of the stream is ignored
    ERROR = "error"  # poisoned by an exception; every call but data_to_send() raises


# Inputs: the peer's messages by wire name (lower case), and our own calls (upper case).
# "APP" is any registered non-control message; "SEND" is our send() of one.
INITIATE, ACCEPT, REFUSE, SEND, CLOSE, APP = "INITIATE", "ACCEPT", "REFUSE", "SEND", "CLOSE", "APP"

_COMMON: Final[dict[State, dict[str, State]]] = {
    State.IDLE: {INITIATE: State.EXPECT_HELLO},
    State.AWAIT_DECISION: {
        "ready": State.AWAIT_DECISION_PEER_READY,
        ACCEPT: State.EXPECT_READY,
        REFUSE: State.CLOSED,
    },
    State.AWAIT_DECISION_PEER_READY: {ACCEPT: State.OPEN, REFUSE: State.CLOSED},
    State.EXPECT_READY: {"ready": State.OPEN},
    State.OPEN: {"ping": State.OPEN, "pong": State.OPEN, APP: State.OPEN, SEND: State.OPEN},
}
_CLIENT: Final = {**_COMMON, State.EXPECT_HELLO: {"hello": State.AWAIT_DECISION}}
_SERVER: Final = {
    **_COMMON,
    State.EXPECT_HELLO: {"hello": State.EXPECT_AUTH},
    State.EXPECT_AUTH: {"auth": State.AWAIT_DECISION},
}
# In every live state the peer's ERROR and our close() end the connection.
_LIVE: Final = (
    State.IDLE,
    State.EXPECT_HELLO,
    State.EXPECT_AUTH,
    State.AWAIT_DECISION,
    State.AWAIT_DECISION_PEER_READY,
    State.EXPECT_READY,
    State.OPEN,
)
TRANSITIONS: Final[dict[Role, dict[State, dict[str, State]]]] = {
    role: {state: {**table.get(state, {}), "error": State.CLOSED, CLOSE: State.CLOSED} for state in _LIVE}
    for role, table in ((Role.CLIENT, _CLIENT), (Role.SERVER, _SERVER))
}
_HANDSHAKING: Final = frozenset(_LIVE) - {State.IDLE, State.OPEN}


def auth_transcript(
    *,
    version: int,
    server_fingerprint: str,
    client_fingerprint: str,
    client_nonce: bytes,
    server_nonce: bytes,
    client_device_id: str,
    server_device_id: str,
) -> bytes:
    """The bytes the client signs in AUTH: AUTH_LABEL, then each field as u32-BE length + bytes."""
    fields = (
        version.to_bytes(2, "big"),
        bytes.fromhex(server_fingerprint),
        bytes.fromhex(client_fingerprint),
        client_nonce,
        server_nonce,
        client_device_id.encode("ascii"),
        server_device_id.encode("ascii"),
    )
    return AUTH_LABEL + b"".join(_LEN.pack(len(f)) + f for f in fields)


class Connection:
    """One connection's protocol state, from HELLO to close; see the module docstring."""

    def __init__(
        self,
        role: Role,
        identity: LocalIdentity,
        nonce: bytes,
        *,
        server_fp_tls: str | None = None,
        versions: tuple[int, ...] = SUPPORTED_VERSIONS,
        rotations: tuple[bytes, ...] = (),
        keepalive_idle: float = KEEPALIVE_IDLE,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        """:raises LocalProtocolError: a client without `server_fp_tls`, or an unusable HELLO."""
        if (role is Role.CLIENT) != is_fingerprint(server_fp_tls):
            raise LocalProtocolError("a client needs server_fp_tls (and a server must not have one)")
        if len(nonce) != NONCE_LEN:
            raise LocalProtocolError(f"nonce must be {NONCE_LEN} random bytes")
        self._role = role
        self._identity = identity
        self._nonce = nonce
        self._server_fp_tls = server_fp_tls
        self._hello = Hello(versions, identity.device_id, identity.name, identity.cert_der, nonce, rotations)
        self._handshake_timeout = handshake_timeout
        self._keepalive = Keepalive(keepalive_idle, keepalive_timeout)
        self._transitions = TRANSITIONS[role]
        self._state = State.IDLE
        self._decoder = FrameDecoder(PRE_AUTH_MAX_FRAME)
        self._out = bytearray()
        self._events: deque[Event] = deque()
        self._deadline: float | None = None  # of the handshake
        self._last_rx = 0.0
        self._eof = False
        self._terminated = False
        self._peer_hello: Hello | None = None
        self._peer_key: ec.EllipticCurvePublicKey | None = None
        self._peer_fp = ""
        self._version = 0
        self._peer: PeerAuthenticated | None = None

    @property
    def role(self) -> Role:
        return self._role

    @property
    def state(self) -> State:
        return self._state

    @property
    def peer(self) -> PeerAuthenticated | None:
        """What the peer proved, once it has."""
        return self._peer

    @property
    def version(self) -> int | None:
        """The protocol version both speak, once HELLOs are exchanged."""
        return self._version or None

    # -- calls ------------------------------------------------------------------------------------

    def initiate(self, now: float) -> None:
        """Start: queue our HELLO and start the handshake deadline."""
        with self._guard():
            self._go(INITIATE, now)
            self._deadline = now + self._handshake_timeout
            self._queue(self._hello)

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the transport; `b""` means EOF. Events come out of next_event().

        :raises RemoteProtocolError: the next frame's header is invalid (e.g. FRAME_TOO_LARGE).
        """
        with self._guard():
            if self._state is State.IDLE or self._eof:
                raise LocalProtocolError(f"cannot receive data in {self._state.name} (or after EOF)")
            if not data:
                self._eof = True
                return
            self._last_rx = now
            self._keepalive.received(now)
            if self._state is not State.CLOSED:
                self._decoder.feed(data)

    def next_event(self) -> Event | None:
        """The next event, or None until more data (or a call) produces one.

        :raises RemoteProtocolError: the peer broke the protocol; nothing else is raised for peer input.
        """
        with self._guard():
            if self._state is State.IDLE:
                raise LocalProtocolError("call initiate() first")
            while not self._events:
                body = self._decoder.next_frame() if self._state is not State.CLOSED else None
                if body is not None:
                    self._handle(body)
                    continue
                if self._eof and not self._terminated:
                    self._terminated = True
                    graceful = self._state is State.CLOSED
                    self._enter(State.CLOSED)
                    return ConnectionTerminated(graceful)
                return None
            return self._events.popleft()

    def accept(self, now: float) -> None:
        """The caller trusts the authenticated peer: queue READY. A no-op if the peer already closed."""
        with self._guard():
            if self._state is State.CLOSED:
                return  # the peer's ERROR overtook our decision; PeerClosed tells the caller
            next_state = self._lookup(ACCEPT)
            self._queue(Ready(self._version))
            self._enter(next_state, now)

    def refuse(self, code: ErrorCode, reason: str, now: float) -> None:
        """The caller does not trust the authenticated peer: queue ERROR(code) and close (no-op if closed)."""
        with self._guard():
            if self._state is State.CLOSED:
                return
            self._go(REFUSE, now)
            self._queue(Error(code, clean_reason(reason)))

    def close(self, code: ErrorCode = ErrorCode.SHUTTING_DOWN, reason: str = "") -> None:
        """Queue ERROR(code) and close; does nothing if already CLOSED."""
        with self._guard():
            if self._state is not State.CLOSED:
                self._go(CLOSE, self._last_rx)
                self._queue(Error(code, clean_reason(reason)))

    def send(self, message: WireMessage) -> None:
        """Queue an application message; only when OPEN.

        :raises LocalProtocolError: not OPEN, a control message, or larger than MAX_FRAME.
        """
        with self._guard():
            if isinstance(message, CONTROL_TYPES):
                raise LocalProtocolError(f"{type(message).__name__} is sent by the machine itself")
            self._lookup(SEND)
            self._queue(message)

    def data_to_send(self) -> bytes:
        """Everything queued for the transport since the last call (also after an error)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def bytes_to_send(self) -> int:
        """How many bytes are queued for the transport (what data_to_send() would return)."""
        return len(self._out)

    def get_timer(self) -> float | None:
        """When handle_timer() next needs to run, or None."""
        if self._state is State.OPEN:
            return self._keepalive.deadline()
        if self._state in _HANDSHAKING:
            return self._deadline
        return None

    def handle_timer(self, now: float) -> None:
        """Act on timers due at `now`: a handshake deadline, or keepalive (PING, then TIMEOUT).

        :raises RemoteProtocolError: TIMEOUT.
        """
        with self._guard():
            if self._state in _HANDSHAKING and self._deadline is not None and now >= self._deadline:
                raise RemoteProtocolError(
                    f"the handshake did not finish within {self._handshake_timeout:g} s", ErrorCode.TIMEOUT
                )
            if self._state is State.OPEN:
                action = self._keepalive.on_timer(now)
                if action is KeepaliveAction.SEND_PING:
                    self._queue(Ping(self._keepalive.next_seq()))
                elif action is KeepaliveAction.TIMED_OUT:
                    raise RemoteProtocolError("the peer stopped answering keepalive pings", ErrorCode.TIMEOUT)

    # -- machinery --------------------------------------------------------------------------------

    @contextmanager
    def _guard(self) -> Iterator[None]:
        if self._state is State.ERROR:
            raise LocalProtocolError("the connection already failed; close the transport")
        try:
            yield
        except ProtocolError as exc:
            if self._state is not State.CLOSED:  # after an ERROR was exchanged, say nothing more
                self._queue(Error(exc.code, clean_reason(str(exc))))
            self._state = State.ERROR
            self._decoder.clear()
            self._events.clear()
            raise

    def _lookup(self, event: str, *, from_peer: bool = False) -> State:
        next_state = self._transitions.get(self._state, {}).get(event)
        if next_state is not None:
            return next_state
        if from_peer:
            raise RemoteProtocolError(
                f"unexpected {event.lower()} message in state {self._state.name}",
                ErrorCode.UNEXPECTED_MESSAGE,
            )
        raise LocalProtocolError(f"cannot {event.lower()} in state {self._state.name}")

    def _go(self, event: str, now: float) -> None:
        self._enter(self._lookup(event), now)

    def _enter(self, state: State, now: float = 0.0) -> None:
        if state is self._state:
            return  # entry actions run once, not on every message in OPEN
        self._state = state
        if state is State.OPEN:
            self._deadline = None
            self._decoder.max_frame = MAX_FRAME
            self._keepalive.start(max(now, self._last_rx))
            self._events.append(HandshakeComplete(self._version))
        elif state is State.CLOSED:
            self._deadline = None
            self._decoder.clear()

    def _queue(self, message: WireMessage) -> None:
        body = encode_message(message)
        self._out += frame_header(len(body))  # two appends: no copy of a large body
        self._out += body

    def _handle(self, body: bytes) -> None:
        message = decode_message(body)
        event = message.TYPE if isinstance(message, CONTROL_TYPES) else APP
        next_state = self._lookup(event, from_peer=True)
        match message:
            case Error(code=code, reason=reason):
                self._events.append(PeerClosed(code, reason))
            case Hello():
                self._on_hello(message)
            case Auth():
                self._on_auth(message)
            case Ping(seq=seq):
                self._queue(Pong(seq))
            case Ready(version=version) if version != self._version:
                raise RemoteProtocolError(
                    f"READY for version {version}, not {self._version}", ErrorCode.VERSION_MISMATCH
                )
            case Ready() | Pong():
                pass
            case _:
                self._events.append(MessageReceived(message))
        self._enter(next_state, self._last_rx)

    def _on_hello(self, hello: Hello) -> None:
        try:
            key = public_key_of_cert(hello.cert)
        # UnsupportedAlgorithm (an unknown key type or curve) escapes load_certificate today.
        except (IdentityError, UnsupportedAlgorithm, ValueError) as exc:
            code = ErrorCode.CERT_MISMATCH if self._role is Role.CLIENT else ErrorCode.AUTH_FAILED
            raise RemoteProtocolError(f"the peer's HELLO certificate is unusable: {exc}", code) from exc
        fingerprint = fingerprint_of_public_key(key)
        if self._role is Role.CLIENT and fingerprint != self._server_fp_tls:
            raise RemoteProtocolError(
                "the certificate in the server's HELLO is not the one its TLS connection showed",
                ErrorCode.CERT_MISMATCH,
            )
        if hello.device_id == self._identity.device_id:
            raise RemoteProtocolError("connected to ourselves", ErrorCode.SELF_CONNECTION)
        common = set(hello.versions) & set(self._hello.versions)
        if not common:
            raise RemoteProtocolError(
                f"no common protocol version (we speak {list(self._hello.versions)}, "
                f"the peer speaks {list(hello.versions)})",
                ErrorCode.VERSION_MISMATCH,
            )
        self._version = max(common)
        self._peer_hello = hello
        self._peer_key = key
        self._peer_fp = fingerprint
        if self._role is Role.CLIENT:
            self._queue(Auth(self._identity.sign(self._transcript())))
            self._authenticated()

    def _on_auth(self, auth: Auth) -> None:
        assert self._peer_key is not None  # the transition table admits AUTH only after HELLO
        if not verify_signature(self._peer_key, auth.signature, self._transcript()):
            raise RemoteProtocolError(
                "the peer's AUTH signature does not match this connection (a relay, or a bad key)",
                ErrorCode.AUTH_FAILED,
            )
        self._authenticated()

    def _transcript(self) -> bytes:
        peer = self._peer_hello
        assert peer is not None
        me = self._identity
        if self._role is Role.CLIENT:
            assert self._server_fp_tls is not None
            return auth_transcript(
                version=self._version,
                server_fingerprint=self._server_fp_tls,  # what TLS showed us, not what HELLO claims
                client_fingerprint=me.fingerprint,
                client_nonce=self._nonce,
                server_nonce=peer.nonce,
                client_device_id=me.device_id,
                server_device_id=peer.device_id,
            )
        return auth_transcript(
            version=self._version,
            server_fingerprint=me.fingerprint,  # our own key: a relay's TLS key makes this differ
            client_fingerprint=self._peer_fp,
            client_nonce=peer.nonce,
            server_nonce=self._nonce,
            client_device_id=peer.device_id,
            server_device_id=me.device_id,
        )

    def _authenticated(self) -> None:
        peer = self._peer_hello
        assert peer is not None
        self._peer = PeerAuthenticated(
            device_id=peer.device_id,
            name=peer.name,
            fingerprint=self._peer_fp,
            cert_der=peer.cert,
            rotations=peer.rotations,
            version=self._version,
        )
        self._events.append(self._peer)
