"""The pairing connection: its two wire messages, the pure `PairingExchange` that feeds them to a
`PairingSession`, and `PairLink`, which pumps them through the handshake `Connection`.

`run_exchange` drives one connection from handshake to result. `agent.net.pairing_net` has the
theory of operation, and the listener, dialer and mDNS around this; it re-exports these names.
"""

from __future__ import annotations

import secrets
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import anyio
import anyio.abc

from agent.errors import (
    ConnectionLost,
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    TofuError,
    UserError,
)
from agent.pairing.code import (
    CONFIRM_LEN,
    NAMEPLATE_MAX,
    PAKE_MESSAGE_LEN,
    BadPairingMessage,
    PairingError,
    PairingExpired,
    PairingSession,
    State,
    WrongCodeError,
)
from agent.wire.handshake import (
    Connection,
    ConnectionTerminated,
    HandshakeComplete,
    LocalIdentity,
    MessageReceived,
    PeerAuthenticated,
    PeerClosed,
    Role,
)
from agent.wire.messages import WireMessage, check, field_bytes, field_int, register

READ_SIZE: Final = 64 * 1024


# -- wire messages --------------------------------------------------------------------------------


@register("pair_pake")
@dataclass(frozen=True, slots=True)
class PairPake(WireMessage):
    """A SPAKE2 message, and the nameplate the sender holds (public, bound into the password)."""

    nameplate: int
    msg: bytes

    def __post_init__(self) -> None:
        check(1 <= self.nameplate <= NAMEPLATE_MAX, f"nameplate must be in 1..{NAMEPLATE_MAX}")
        check(len(self.msg) == PAKE_MESSAGE_LEN, f"msg must be {PAKE_MESSAGE_LEN} bytes")

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> PairPake:
        return cls(
            nameplate=field_int(fields, "nameplate", min_value=1, max_value=NAMEPLATE_MAX),
            msg=field_bytes(fields, "msg", exact=PAKE_MESSAGE_LEN),
        )


@register("pair_confirm")
@dataclass(frozen=True, slots=True)
class PairConfirm(WireMessage):
    """The sender's key confirmation: HMAC over the transcript, under a key from SPAKE2."""

    mac: bytes

    def __post_init__(self) -> None:
        check(len(self.mac) == CONFIRM_LEN, f"mac must be {CONFIRM_LEN} bytes")

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> PairConfirm:
        return cls(mac=field_bytes(fields, "mac", exact=CONFIRM_LEN))


# -- errors that do not burn the code -------------------------------------------------------------


class NotThisPairing(RemoteProtocolError):
    """The peer holds another nameplate (or came while a pairing runs); its connection is refused."""


class PeerRefusedPairing(UserError):
    """The other device closed the connection before pairing finished; the message says why."""


# -- the exchange (pure) --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PairedPeer:
    """The peer of a successful pairing: its id, the name it gave, and the key it proved."""

    device_id: str
    name: str
    fingerprint: str


class PairingExchange:
    """The pairing messages of one connection, over one `PairingSession`; no I/O, time passed in."""

    def __init__(self, session: PairingSession) -> None:
        self.session = session
        self._peer: PeerAuthenticated | None = None
        self._owns = False
        self.result: PairedPeer | None = None

    @property
    def started(self) -> bool:
        """True once this connection uses the session: from then on any failure burns the code."""
        return self._owns

    def authenticated(self, peer: PeerAuthenticated) -> None:
        """The handshake proved `peer`; remember who, for the transcript."""
        self._peer = peer

    def opened(self, now: float) -> list[WireMessage]:
        """The connection is open: the joining side speaks first.

        :raises PairingError: the session expired or was used before.
        """
        if self.session.role == "waiting":
            return []
        self._owns = True
        return [PairPake(self.session.nameplate, self.session.start(now))]

    def received(self, message: WireMessage, now: float) -> list[WireMessage]:
        """A pairing message from the peer: what to send back.

        :raises NotThisPairing: (waiting side, session not taken by this connection) another
            nameplate, or another connection holds the session; the code is not burnt.
        :raises PairingError: the session failed and is burnt; send `code` to the peer.
        """
        peer = self._peer
        if peer is None:
            raise LocalProtocolError("a pairing message before the handshake finished")
        if not self._owns:  # only a waiting side gets here: the joining side owns from `opened`
            if not isinstance(message, PairPake):
                raise NotThisPairing("the first pairing message must be pair_pake", ErrorCode.UNEXPECTED_MESSAGE)
            if message.nameplate != self.session.nameplate:
                raise NotThisPairing(
                    f"this device waits for pairing number {self.session.nameplate}, not {message.nameplate}",
                    ErrorCode.NOT_TRUSTED,
                )
            if self.session.state is not State.EXPECT_START:
                raise NotThisPairing("this device is already pairing with another one", ErrorCode.NOT_TRUSTED)
            self._owns = True
            ours = self.session.start(now)
            mac = self.session.receive_pake(message.msg, peer.device_id, peer.fingerprint, now)
            return [PairPake(self.session.nameplate, ours), PairConfirm(mac)]
        match message:
            case PairPake(nameplate=nameplate, msg=msg) if self.session.state is State.EXPECT_PAKE:
                if nameplate != self.session.nameplate:
                    self.session.abort()
                    raise BadPairingMessage(f"the other device waits for pairing number {nameplate}, not this one")
                return [PairConfirm(self.session.receive_pake(msg, peer.device_id, peer.fingerprint, now))]
            case PairConfirm(mac=mac) if self.session.state is State.EXPECT_CONFIRM:
                done = self.session.receive_confirm(mac, now)
                self.result = PairedPeer(done.peer_device_id, peer.name, done.peer_fingerprint)
                return []
        self.session.abort()
        raise BadPairingMessage(f"the other device sent {message.TYPE} out of turn; ask for a new code")

    def peer_closed(self, code: ErrorCode, reason: str) -> UserError:
        """The error to report when the peer closes before pairing finished (the session is burnt)."""
        if self._owns:
            self.session.abort()
        if code is ErrorCode.AUTH_FAILED and self._owns:
            return WrongCodeError()
        if code is ErrorCode.TIMEOUT:
            return PairingExpired()
        text = f": {reason}" if reason else ""
        return PeerRefusedPairing(f"the other device ended the pairing ({code.value}){text}")


# -- the pump -------------------------------------------------------------------------------------


class PairLink:
    """One pairing connection: pumps a byte stream through a `Connection`; decides nothing."""

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        role: Role,
        identity: LocalIdentity,
        deadline: float,
        *,
        server_fp_tls: str | None = None,
    ) -> None:
        self.stream = stream
        self.deadline = deadline
        self.conn = Connection(role, identity, secrets.token_bytes(32), server_fp_tls=server_fp_tls)
        self.peer: PeerAuthenticated | None = None

    async def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.stream.send(data)

    async def _event(self) -> HandshakeComplete | MessageReceived | PeerAuthenticated:
        """The next event that needs the caller; PeerClosed and EOF become exceptions.

        :raises ClosedByPeer: the peer sent ERROR or hung up.
        :raises TimeoutError: `deadline` passed.
        :raises RemoteProtocolError: the peer broke the protocol (the ERROR is sent first).
        """
        while True:
            try:
                event = self.conn.next_event()
            except ProtocolError:
                await self._flush_quietly()
                raise
            match event:
                case PeerClosed(code=code, reason=reason):
                    raise ClosedByPeer(code, reason)
                case ConnectionTerminated():
                    raise ClosedByPeer(None, "")
                case HandshakeComplete() | MessageReceived() | PeerAuthenticated():
                    return event
            await self._flush()
            now = time.monotonic()
            if now >= self.deadline:
                raise TimeoutError
            timer = self.conn.get_timer()
            wait = self.deadline - now if timer is None else min(self.deadline, timer) - now
            data: bytes | None = None
            with anyio.move_on_after(max(0.0, wait)):
                try:
                    data = await self.stream.receive(READ_SIZE)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    data = b""
            try:
                if data is None:
                    self.conn.handle_timer(time.monotonic())
                else:
                    self.conn.receive_data(data, time.monotonic())
            except ProtocolError:
                await self._flush_quietly()
                raise

    async def open(self, refuse: Callable[[PeerAuthenticated], str | None] = lambda _: None) -> PeerAuthenticated:
        """Run the handshake until the connection is OPEN; `refuse` may veto the peer with a reason.

        :raises PeerRefusedHere: `refuse` gave a reason (it was sent to the peer).
        """
        self.conn.initiate(time.monotonic())
        await self._flush()
        while True:
            event = await self._event()
            if isinstance(event, PeerAuthenticated):
                self.peer = event
                reason = refuse(event)
                if reason is not None:
                    self.conn.refuse(ErrorCode.NOT_TRUSTED, reason, time.monotonic())
                    await self._flush_quietly()
                    raise PeerRefusedHere(reason)
                self.conn.accept(time.monotonic())
                await self._flush()
            elif isinstance(event, HandshakeComplete):
                assert self.peer is not None  # the machine authenticates before it opens
                return self.peer
            else:
                raise LocalProtocolError("an application message before the connection opened")

    async def receive(self) -> WireMessage:
        """The next application message."""
        while True:
            event = await self._event()
            if isinstance(event, MessageReceived):
                return event.message

    async def send(self, messages: Sequence[WireMessage]) -> None:
        """Send messages on the open connection."""
        for message in messages:
            self.conn.send(message)
        await self._flush()

    async def close(self, code: ErrorCode, reason: str) -> None:
        """Send ERROR(code, reason) if still possible; never raises."""
        try:
            self.conn.close(code, reason)
        except ProtocolError:
            pass  # poisoned: the machine already queued its own ERROR
        await self._flush_quietly()

    async def linger(self, seconds: float) -> None:
        """Wait up to `seconds` for the peer to close first, so our last message is read."""
        with anyio.move_on_after(seconds):
            try:
                while True:
                    await self._event()
            except (ClosedByPeer, TimeoutError, ProtocolError, OSError, anyio.BrokenResourceError):
                return

    async def _flush_quietly(self) -> None:
        with anyio.move_on_after(1.0):
            try:
                await self._flush()
            except (OSError, ssl.SSLError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass


class ClosedByPeer(TofuError):
    """Internal: the peer sent ERROR (`code`) or hung up (`code` None)."""

    def __init__(self, code: ErrorCode | None, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class PeerRefusedHere(UserError):
    """We refused the authenticated peer before pairing (e.g. pinned to another key)."""


async def run_exchange(
    link: PairLink, exchange: PairingExchange, refuse: Callable[[PeerAuthenticated], str | None]
) -> PairedPeer:
    """Handshake, then pairing messages, until the exchange has a result.

    :raises PairingError: the pairing failed (burnt if `exchange.started`); the peer was told.
    :raises NotThisPairing, PeerRefusedHere, PeerRefusedPairing: refused before the session was used.
    :raises ConnectionLost: the connection broke or broke the protocol before pairing.
    """
    try:
        peer = await link.open(refuse)
        exchange.authenticated(peer)
        await link.send(exchange.opened(time.monotonic()))
        while exchange.result is None:
            message = await link.receive()
            await link.send(exchange.received(message, time.monotonic()))
        return exchange.result
    except (PairingError, NotThisPairing) as exc:
        await link.close(exc.code, str(exc))
        raise
    except ClosedByPeer as exc:
        if exc.code is None:
            if exchange.started:
                raise PairingError("the other device hung up before pairing finished; ask for a new code") from exc
            raise ConnectionLost("the other side closed the connection before pairing") from exc
        raise exchange.peer_closed(exc.code, exc.reason) from exc
    except TimeoutError as exc:
        await link.close(ErrorCode.TIMEOUT, "pairing took too long")
        raise PairingExpired() from exc
    except RemoteProtocolError as exc:
        if exchange.started:
            raise PairingError(f"the other device broke the pairing protocol: {exc}") from exc
        raise ConnectionLost(_handshake_failure(exc)) from exc
    except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
        raise ConnectionLost(f"the pairing connection broke: {exc}") from exc


def _handshake_failure(exc: RemoteProtocolError) -> str:
    if exc.code in (ErrorCode.CERT_MISMATCH, ErrorCode.AUTH_FAILED):
        return (
            "the connection is not end to end: the keys on it do not match (someone may be in the middle); "
            "nothing was pinned"
        )
    return f"the pairing connection failed: {exc}"


__all__ = [
    "READ_SIZE",
    "ClosedByPeer",
    "NotThisPairing",
    "PairConfirm",
    "PairLink",
    "PairPake",
    "PairedPeer",
    "PairingExchange",
    "PeerRefusedHere",
    "PeerRefusedPairing",
    "run_exchange",
]
