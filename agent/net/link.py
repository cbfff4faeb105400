"""Pump one TLS stream through the sans-I/O `Connection`: read, feed, drain events, write, re-arm.

The link decides nothing: it asks its `LinkHooks` (the daemon) whether to accept an
authenticated peer, and hands it open-connection messages. A peer's bad input ends in a
`ProtocolError`: the ERROR frame the machine queued is sent, the stream closed, and one log line
names the peer and the code.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import anyio
import anyio.abc
from anyio.streams.tls import TLSAttribute

from agent.errors import ErrorCode, ProtocolError, RemoteProtocolError
from agent.wire.handshake import (
    Connection,
    ConnectionTerminated,
    HandshakeComplete,
    LocalIdentity,
    MessageReceived,
    PeerAuthenticated,
    PeerClosed,
    Role,
    State,
)
from agent.wire.messages import WireMessage

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
TIMER_GRACE = 0.05
DRAIN_RECORDS = 64  # TLS records decrypted per wake-up at most (16 KiB each), so other tasks get turns


@dataclass(frozen=True, slots=True)
class Verdict:
    """The daemon's answer to an authenticated peer: accept, or refuse with a code."""

    accept: bool
    code: ErrorCode = ErrorCode.NOT_TRUSTED
    reason: str = ""


class LinkHooks(Protocol):
    """What the daemon does at each step of a link's life."""

    async def authenticated(self, link: PeerLink, peer: PeerAuthenticated) -> Verdict: ...
    async def opened(self, link: PeerLink) -> None: ...
    async def message(self, link: PeerLink, message: WireMessage) -> None: ...
    async def closed(self, link: PeerLink, reason: str) -> None: ...


class PeerLink:
    """One connection to a peer, inbound or outbound."""

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        role: Role,
        identity: LocalIdentity,
        address: str,
        *,
        server_fp_tls: str | None = None,
        rotations: tuple[bytes, ...] = (),
        keepalive_idle: float = 15.0,
        keepalive_timeout: float = 10.0,
    ) -> None:
        self.stream = stream
        self.address = address
        self.role = role
        self.conn = Connection(
            role,
            identity,
            secrets.token_bytes(32),
            server_fp_tls=server_fp_tls,
            rotations=rotations,
            keepalive_idle=keepalive_idle,
            keepalive_timeout=keepalive_timeout,
        )
        self.peer: PeerAuthenticated | None = None
        self.opened_at: float | None = None
        self._send_lock = anyio.Lock()
        self._closing: tuple[ErrorCode, str] | None = None
        self._recv_scope: anyio.CancelScope | None = None
        # A TLS stream hands out one 16 KiB record per `receive`; records already buffered are
        # read straight from its SSLObject (public via TLSAttribute) without a trip through the
        # event loop each, which is most of the cost of receiving bulk data.
        self._ssl: ssl.SSLObject | None = stream.extra(TLSAttribute.ssl_object, None)

    @property
    def device_id(self) -> str | None:
        return self.peer.device_id if self.peer else None

    @property
    def is_open(self) -> bool:
        return self.conn.state is State.OPEN

    def __repr__(self) -> str:
        who = self.peer.name if self.peer else "?"
        return f"<PeerLink {who} {self.address} {self.role.name.lower()} {self.conn.state.name}>"

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self.conn.data_to_send()
            if data:
                await self.stream.send(data)

    async def send(self, message: WireMessage) -> None:
        """Send an application message on the open connection."""
        await self.send_many((message,))

    async def send_many(self, messages: Iterable[WireMessage]) -> None:
        """Send application messages in order with one TLS write (thousands of small ones cost
        one write and a few TLS records instead of a syscall and a record each)."""
        async with self._send_lock:
            for message in messages:
                self.conn.send(message)
            data = self.conn.data_to_send()
            if data:
                await self.stream.send(data)

    def close_soon(self, code: ErrorCode, reason: str) -> None:
        """Ask the pump to send ERROR(code) and close (e.g. the device was just revoked)."""
        self._closing = (code, reason)
        if self._recv_scope is not None:
            self._recv_scope.cancel()

    async def _receive(self, wait: float | None) -> bytes | None:
        """Bytes from the peer, b"" at EOF, None after `wait` seconds or when `close_soon` wakes us."""
        with anyio.move_on_after(wait) as scope:
            self._recv_scope = scope
            if self._closing is not None:
                return None
            try:
                return await self.stream.receive(READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                return b""
        return None

    def _buffered_records(self) -> list[bytes]:
        """Plaintext of the TLS records that are already received and need no waiting.

        Anything unusual (no more data, close_notify, a TLS error) just stops here: the stream's
        next `receive` meets the same condition and reports it the usual way.
        """
        assert self._ssl is not None
        out: list[bytes] = []
        for _ in range(DRAIN_RECORDS):
            try:
                data = self._ssl.read(READ_SIZE)
            except ssl.SSLError:  # SSLWantReadError: nothing buffered (or a real error, see above)
                break
            if not data:
                break
            out.append(data)
        return out

    async def run(self, hooks: LinkHooks) -> None:
        """Drive the connection until it closes; never raises for anything the peer does."""
        reason = "closed"
        try:
            reason = await self._pump(hooks)
        except ProtocolError as exc:
            reason = f"{exc.code.value}: {exc}"
            who = f"{self.peer.name} ({self.peer.device_id[:8]}..)" if self.peer else "unauthenticated peer"
            level = logging.WARNING if isinstance(exc, RemoteProtocolError) else logging.ERROR
            log.log(level, "closing connection with %s at %s: %s", who, self.address, reason)
            if self.conn.state not in (State.ERROR, State.CLOSED):
                # Raised by a hook (e.g. sync refusing a message), not by the machine, which
                # would have queued the ERROR itself: tell the peer why before closing.
                with contextlib.suppress(ProtocolError):
                    self.conn.close(exc.code, str(exc))
            try:
                with anyio.move_on_after(1.0):
                    await self._flush()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            reason = f"connection lost: {exc}"
        finally:
            await hooks.closed(self, reason)

    async def _pump(self, hooks: LinkHooks) -> str:
        conn = self.conn
        conn.initiate(time.monotonic())
        await self._flush()
        while True:
            if self._closing is not None:
                code, why = self._closing
                conn.close(code, why)
                await self._flush()
                return f"closed by us: {code.value}"
            timer = conn.get_timer()
            # Never judge a timer without a look at what already arrived: after the pump was held
            # up (backpressure), the peer's answer may be waiting in the socket.
            timeout = None if timer is None else max(TIMER_GRACE, timer - time.monotonic())
            data = await self._receive(timeout)
            if data is None:
                if self._closing is None:
                    conn.handle_timer(time.monotonic())
            else:
                now = time.monotonic()
                conn.receive_data(data, now)
                if data and self._ssl is not None:
                    for more in self._buffered_records():
                        conn.receive_data(more, now)
            while (event := conn.next_event()) is not None:
                match event:
                    case PeerAuthenticated():
                        self.peer = event
                        verdict = await hooks.authenticated(self, event)
                        if verdict.accept:
                            conn.accept(time.monotonic())
                        else:
                            conn.refuse(verdict.code, verdict.reason, time.monotonic())
                            await self._flush()
                            return f"refused: {verdict.code.value}"
                    case HandshakeComplete():
                        self.opened_at = time.time()
                        await self._flush()
                        await hooks.opened(self)
                    case MessageReceived():
                        await hooks.message(self, event.message)
                    case PeerClosed():
                        return f"peer closed: {event.code.value} {event.reason}".rstrip()
                    case ConnectionTerminated():
                        return "connection closed by peer"
            await self._flush()
