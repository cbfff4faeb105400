"""Pump one TLS stream through the sans-I/O `Connection`: read, feed, drain events, write, re-arm.

The link decides nothing: it asks its `LinkHooks` (the daemon) whether to accept an
authenticated peer, and hands it open-connection messages. A peer's bad input ends in a
`ProtocolError`: the ERROR frame the machine queued is sent, the stream closed, and one log line
names the peer and the code.

Full duplex. Each link has a reader (`_pump`) and a writer (`_write_loop`) task. The reader
never waits for a write: what the machine queues (PONGs, READY, ERROR) and what `send_many`
adds leave through the writer. Were the reader to wait for its own writes, two peers that both
write while their socket buffers are full would each wait for the other to read, for good (the
two-way first-sync deadlock). Backpressure is explicit instead: `send_many` waits while more than
`SEND_HIGH_WATER` bytes are queued, and the reader stops reading only past `READ_STOP_BACKLOG`,
which the machine's own small replies cannot reach unless the peer sends without ever reading
(then holding it up is the point: it bounds what a peer can make us buffer).
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
SEND_HIGH_WATER = 4 * 1024 * 1024  # queued outgoing bytes past which `send_many` waits for the writer
# Queued outgoing bytes past which the reader stops reading. Callers of `send_many` stop at the
# high-water mark and add at most one batch (a few MiB), so only a peer that makes us answer
# (PINGs) while it never reads gets here.
READ_STOP_BACKLOG = SEND_HIGH_WATER + 32 * 1024 * 1024
CLOSE_FLUSH_TIMEOUT = 1.0  # seconds to let the ERROR frame (and what precedes it) leave at close


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
        send_high_water: int = SEND_HIGH_WATER,
        read_stop_backlog: int = READ_STOP_BACKLOG,
    ) -> None:
        self.stream = stream
        self.send_high_water = send_high_water
        self.read_stop_backlog = read_stop_backlog
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
        self._closing: tuple[ErrorCode, str] | None = None
        self._recv_scope: anyio.CancelScope | None = None
        # writer side: bytes taken from the machine and not yet written, and the events that
        # wake the writer (work queued) and the waiting senders (room)
        self._writing = 0
        self._wake_writer = anyio.Event()
        self._room = anyio.Event()
        self._writer_done = anyio.Event()
        self._write_error: BaseException | None = None
        self._stopping = False  # the reader is done: the writer sends what is queued, then ends
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

    @property
    def backlog(self) -> int:
        """Outgoing bytes queued and not yet written to the stream."""
        return self.conn.bytes_to_send + self._writing

    def _kick(self) -> None:
        """Let the writer send what the machine has queued; never waits."""
        if self.conn.bytes_to_send:
            self._wake_writer.set()

    async def send(self, message: WireMessage) -> None:
        """Send an application message on the open connection."""
        await self.send_many((message,))

    async def send_many(self, messages: Iterable[WireMessage]) -> None:
        """Queue application messages in order for one TLS write (thousands of small ones cost
        one write and a few TLS records instead of a syscall and a record each).

        Waits while more than SEND_HIGH_WATER bytes are queued (the peer reads slower than we
        write); never waits for the peer otherwise.

        :raises anyio.BrokenResourceError: the link's stream failed or the link is closing.
        :raises LocalProtocolError: the connection is not open.
        """
        await self._room_below(self.send_high_water)
        if self._write_error is not None or self._stopping:
            raise anyio.BrokenResourceError("the link is closing")
        for message in messages:
            self.conn.send(message)
        self._kick()

    async def _write_loop(self) -> None:
        """Write what the machine queues, in order, until the reader is done and all is sent."""
        try:
            while True:
                data = self.conn.data_to_send()
                if not data:
                    self._room.set()
                    if self._stopping:
                        return
                    self._wake_writer = anyio.Event()
                    if self.conn.bytes_to_send:
                        continue  # queued between the take and the new event
                    await self._wake_writer.wait()
                    continue
                self._writing = len(data)
                if self.backlog <= self.send_high_water:
                    self._room.set()
                await self.stream.send(data)
                self._writing = 0
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            # (a TLS stream that is not standard-compatible reports the peer's close as EndOfStream)
            self._write_error = exc
            self._room.set()
            if self._recv_scope is not None:
                self._recv_scope.cancel()  # the reader learns it from _write_error
        finally:
            self._writing = 0
            self._writer_done.set()

    async def _drain_and_stop(self) -> None:
        """Let the writer send what is queued (at most CLOSE_FLUSH_TIMEOUT), then stop it."""
        self._stopping = True
        self._wake_writer.set()
        self._room.set()
        with anyio.move_on_after(CLOSE_FLUSH_TIMEOUT):
            await self._writer_done.wait()

    def close_soon(self, code: ErrorCode, reason: str) -> None:
        """Ask the pump to send ERROR(code) and close (e.g. the device was just revoked)."""
        self._closing = (code, reason)
        if self._recv_scope is not None:
            self._recv_scope.cancel()

    async def _receive(self, wait: float | None) -> bytes | None:
        """Bytes from the peer, b"" at EOF, None after `wait` seconds or when `close_soon` wakes us."""
        with anyio.move_on_after(wait) as scope:
            self._recv_scope = scope
            if self._closing is not None or self._write_error is not None:
                return None
            if self.backlog > self.read_stop_backlog:
                # the peer sends and never reads: hold it up until the writer gets through
                await self._room_below(self.read_stop_backlog)
                return None
            try:
                return await self.stream.receive(READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                return b""
        return None

    async def _room_below(self, limit: int) -> None:
        """Wait until at most `limit` bytes are queued, or the writer stopped."""
        while self.backlog > limit and self._write_error is None and not self._stopping:
            if self._room.is_set():
                self._room = anyio.Event()  # one event for all waiters: the writer sets it
            await self._room.wait()

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
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._write_loop)
                try:
                    reason = await self._read(hooks)
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._drain_and_stop()
                    tg.cancel_scope.cancel()
        finally:
            await hooks.closed(self, reason)

    async def _read(self, hooks: LinkHooks) -> str:
        """Run the reader; the reason the connection ended."""
        try:
            return await self._pump(hooks)
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
            return reason
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            return f"connection lost: {exc}"

    async def _pump(self, hooks: LinkHooks) -> str:
        conn = self.conn
        conn.initiate(time.monotonic())
        self._kick()
        while True:
            if self._write_error is not None:
                return f"connection lost: {self._write_error}"
            if self._closing is not None:
                code, why = self._closing
                conn.close(code, why)
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
                            return f"refused: {verdict.code.value}"
                    case HandshakeComplete():
                        self.opened_at = time.time()
                        self._kick()
                        await hooks.opened(self)
                    case MessageReceived():
                        await hooks.message(self, event.message)
                    case PeerClosed():
                        return f"peer closed: {event.code.value} {event.reason}".rstrip()
                    case ConnectionTerminated():
                        return "connection closed by peer"
            self._kick()
