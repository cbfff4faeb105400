"""What a connection's user sees: its events, the identity it needs, and keepalive timing.

`agent.wire.handshake.Connection` is the machine; this module holds its vocabulary and the
keepalive sub-machine, a tiny pure timer (time passed in as `now`).

Keepalive theory: after `idle` seconds without receiving anything, send PING; if nothing at all
(a PONG or any other data) arrives within `timeout` seconds after that, the peer is gone. Any
received data counts as a sign of life, so a busy connection never pings.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final, Protocol

from agent.errors import ErrorCode
from agent.wire.messages import WireMessage

KEEPALIVE_IDLE: Final = 15.0
KEEPALIVE_TIMEOUT: Final = 10.0


class LocalIdentity(Protocol):
    """What the machine needs of this device's identity (agent.identity.Identity fits)."""

    @property
    def device_id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def cert_der(self) -> bytes: ...
    @property
    def fingerprint(self) -> str: ...
    def sign(self, data: bytes) -> bytes: ...


# -- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerAuthenticated:
    """The peer proved it holds the key of `cert_der`; the caller must now accept() or refuse()."""

    device_id: str
    name: str
    fingerprint: str
    cert_der: bytes
    rotations: tuple[bytes, ...]
    version: int


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """Both sides accepted: the connection is OPEN and speaks `version`."""

    version: int


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """An application message (e.g. a sync message) arrived on the open connection."""

    message: WireMessage


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The peer sent ERROR: it closes the connection with `code` (e.g. key_changed)."""

    code: ErrorCode
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The transport reached EOF; `graceful` if an ERROR was exchanged first. The last event."""

    graceful: bool


Event = PeerAuthenticated | HandshakeComplete | MessageReceived | PeerClosed | ConnectionTerminated


# -- keepalive ------------------------------------------------------------------------------------


class KeepaliveAction(Enum):
    """What `Keepalive.on_timer` asks the connection to do."""

    SEND_PING = "send_ping"
    TIMED_OUT = "timed_out"


class Keepalive:
    """Decides when to PING and when a silent peer has timed out."""

    __slots__ = ("_idle", "_last_rx", "_ping_sent", "_seq", "_timeout")

    def __init__(self, idle: float = KEEPALIVE_IDLE, timeout: float = KEEPALIVE_TIMEOUT) -> None:
        if not (idle > 0 and timeout > 0):
            raise ValueError("keepalive idle and timeout must be positive")
        self._idle = idle
        self._timeout = timeout
        self._last_rx: float | None = None  # None: not started (the connection is not open)
        self._ping_sent: float | None = None
        self._seq = 0

    def start(self, now: float) -> None:
        """Begin watching at `now` (the connection just opened)."""
        self._last_rx = now
        self._ping_sent = None

    def received(self, now: float) -> None:
        """The peer sent something at `now`."""
        if self._last_rx is not None:
            self._last_rx = max(self._last_rx, now)
            self._ping_sent = None

    def deadline(self) -> float | None:
        """When `on_timer` next has something to do, or None if not started."""
        if self._last_rx is None:
            return None
        if self._ping_sent is not None:
            return self._ping_sent + self._timeout
        return self._last_rx + self._idle

    def next_seq(self) -> int:
        """A fresh PING sequence number."""
        self._seq += 1
        return self._seq

    def on_timer(self, now: float) -> KeepaliveAction | None:
        """SEND_PING, TIMED_OUT, or None if `now` is before the deadline."""
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return None
        if self._ping_sent is not None:
            return KeepaliveAction.TIMED_OUT
        self._ping_sent = now
        return KeepaliveAction.SEND_PING
