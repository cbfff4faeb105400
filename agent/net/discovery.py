"""LAN discovery over mDNS/DNS-SD, behind a small `Discovery` interface with an in-memory fake.

Theory of operation: every agent advertises one `_tofu-agent._tcp.local.` service whose TXT record
carries `v=1`, its device id, a fingerprint hint and a display name, and browses for the others.
Everything received is hostile, unauthenticated input: the pure `PeerTable` parses it defensively
(bad records are ignored, never raised), keeps memory bounded under an mDNS flood, and turns
observations into `PeerSeen` / `PeerGone` events. The fingerprint is only a hint: trust is decided
after the TLS handshake, never here. A departure seen via an mDNS goodbye is a hint too: records of
a killed process linger for many minutes, so liveness comes from connections.

`agent.net.mdns.ZeroconfDiscovery` (python-zeroconf, asyncio only; its own module so an agent
run with `--no-mdns` never loads zeroconf) and `FakeDiscovery` (a shared in-memory bus) both only
pump observations into a `PeerTable` and deliver its events on an `EventStream`, which `stop()`
closes so an `async for` over `events` ends.

The table, its events and the record rules (TXT encoding and parsing, instance names, address
filtering and caps) live in `agent.net.peer_table`, which does no I/O; they are re-exported here.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

import anyio
import anyio.lowlevel

from agent.errors import TofuError
from agent.net.peer_table import (
    MAX_ADDRESSES,
    MAX_INSTANCE_BYTES,
    MAX_SERVICES,
    MAX_TXT_BYTES,
    SERVICE_TYPE,
    DiscoveryEvent,
    PeerGone,
    PeerSeen,
    PeerTable,
    TxtRecord,
    encode_txt,
    instance_name,
    normalise_addresses,
    parse_txt,
    truncate_utf8,
    txt_wire_size,
)

log = logging.getLogger(__name__)

EVENT_BUFFER = 1024
RESOLVE_WORKERS = 4
RESOLVE_TIMEOUT = 3.0
STOP_TIMEOUT = 2.0


class DiscoveryError(TofuError):
    """mDNS discovery could not be started (no usable network interface, socket error)."""


# -- the interface --------------------------------------------------------------------------------


class Discovery(Protocol):
    """Advertise this device and report peers as `PeerSeen` / `PeerGone` events on `events`."""

    @property
    def events(self) -> EventStream:
        """Events in arrival order; iteration ends after `stop()`."""
        ...

    def peers(self) -> tuple[PeerSeen, ...]:
        """A snapshot of the peers currently advertised."""
        ...

    async def start(self) -> None:
        """Start browsing at once and advertising in the background.

        :raises DiscoveryError: no socket could be opened.
        """
        ...

    async def update(self, fingerprint: str) -> None:
        """Re-announce with a new fingerprint hint (after a key rotation).

        :raises ValueError: `fingerprint` is malformed.
        :raises DiscoveryError: not started, or the advertisement failed.
        """
        ...

    async def stop(self) -> None:
        """Withdraw the advertisement (goodbye packets), stop browsing and end `events`. Idempotent."""
        ...

    async def wait_advertised(self) -> str:
        """Wait until others can find us; returns our service name ('' where nothing is probed).

        :raises DiscoveryError: not started, or the advertisement failed.
        """
        ...


class EventStream:
    """A bounded single-consumer queue of events; `async for` over it ends once the producer stops.

    Not an anyio memory stream on purpose: those warn when garbage-collected unclosed, which a
    consumer that simply stops iterating would trigger. When the consumer lags `max_buffer` events
    behind, new events are dropped (and counted), so a flood cannot grow memory.
    """

    def __init__(self, max_buffer: int = EVENT_BUFFER) -> None:
        self._items: deque[DiscoveryEvent] = deque()
        self._max_buffer = max_buffer
        self._closed = False
        self._wakeup: anyio.Event | None = None
        self.dropped = 0

    def put(self, event: DiscoveryEvent) -> None:
        """Queue `event` (producer side); dropped if the stream is closed or full."""
        if self._closed:
            return
        if len(self._items) >= self._max_buffer:
            self.dropped += 1
            log.warning("discovery event consumer is lagging; dropped %s", type(event).__name__)
            return
        self._items.append(event)
        self._wake()

    def close(self) -> None:
        """No more events (producer side); the consumer still gets what is queued."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    def receive_nowait(self) -> DiscoveryEvent:
        """The next event.

        :raises anyio.WouldBlock: none is queued yet.
        :raises anyio.EndOfStream: none is queued and the stream is closed.
        """
        if self._items:
            return self._items.popleft()
        if self._closed:
            raise anyio.EndOfStream
        raise anyio.WouldBlock

    async def receive(self) -> DiscoveryEvent:
        """The next event, waiting for one.

        :raises anyio.EndOfStream: the stream is closed and drained.
        """
        await anyio.lowlevel.checkpoint()
        while True:
            try:
                return self.receive_nowait()
            except anyio.WouldBlock:
                if self._wakeup is None:
                    self._wakeup = anyio.Event()
                await self._wakeup.wait()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> DiscoveryEvent:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None


class _EventPump:
    """What both implementations share: the event stream, the peer table, `async with`."""

    _table: PeerTable

    def __init__(self, buffer: int) -> None:
        self._stream = EventStream(buffer)

    def peers(self) -> tuple[PeerSeen, ...]:
        """A snapshot of the peers currently advertised."""
        return self._table.peers()

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def wait_advertised(self) -> str:
        return ""  # nothing to probe: whoever shares our medium sees us once started

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def events(self) -> EventStream:
        return self._stream

    def _emit(self, events: Iterable[DiscoveryEvent]) -> None:
        for event in events:
            self._stream.put(event)

    def _close_events(self) -> None:
        self._stream.close()


def local_ipv4_addresses() -> list[str]:
    """This host's non-loopback IPv4 addresses, to advertise."""
    import ifaddr  # only agents that advertise need it

    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if ip.is_IPv4 and isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                found.append(ip.ip)
    return list(dict.fromkeys(found))


# -- the fake: an in-memory bus -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Advert:
    properties: Mapping[bytes, bytes | None]
    addresses: tuple[str, ...]
    port: int | None


class FakeBus:
    """An in-memory mDNS segment shared by `FakeDiscovery` instances; can carry forged records."""

    def __init__(self) -> None:
        self._adverts: dict[str, _Advert] = {}
        self._members: list[FakeDiscovery] = []

    def publish(
        self,
        service_name: str,
        properties: Mapping[bytes, bytes | None],
        addresses: Sequence[str],
        port: int | None,
    ) -> None:
        """Add or replace a record (any content, for hostile tests) and show it to every member."""
        advert = _Advert(dict(properties), tuple(addresses), port)
        self._adverts[service_name] = advert
        for member in list(self._members):
            member._observe(service_name, advert)

    def withdraw(self, service_name: str) -> None:
        """Remove a record as a goodbye packet would."""
        if self._adverts.pop(service_name, None) is not None:
            for member in list(self._members):
                member._gone(service_name)

    def unique_name(self, instance: str) -> str:
        """A free service name for `instance`, renamed "-2", "-3", ... like zeroconf does."""
        candidate, n = f"{instance}.{SERVICE_TYPE}", 2
        while candidate in self._adverts:
            candidate, n = f"{instance}-{n}.{SERVICE_TYPE}", n + 1
        return candidate

    def _join(self, member: FakeDiscovery) -> None:
        self._members.append(member)
        for service_name, advert in list(self._adverts.items()):
            member._observe(service_name, advert)

    def _leave(self, member: FakeDiscovery) -> None:
        self._members.remove(member)


class FakeDiscovery(_EventPump):
    """`Discovery` on a `FakeBus`: same parsing and events as the real one, delivered synchronously."""

    def __init__(
        self,
        bus: FakeBus,
        *,
        device_id: str,
        name: str,
        fingerprint: str,
        port: int,
        addresses: Sequence[str] = ("127.0.0.1",),
        max_services: int = MAX_SERVICES,
        event_buffer: int = EVENT_BUFFER,
    ) -> None:
        super().__init__(event_buffer)
        self._txt = encode_txt(device_id, fingerprint, name)
        self.device_id = device_id
        self._name = name
        self._port = port
        self._addresses = tuple(addresses)
        self._bus = bus
        self._table = PeerTable(device_id, max_services=max_services, allow_loopback=True)
        self.service_name: str | None = None
        self._state = "new"

    async def start(self) -> None:
        if self._state != "new":
            raise DiscoveryError("discovery can only be started once")
        self._state = "running"
        self._bus._join(self)
        self.service_name = self._bus.unique_name(instance_name(self._name, self.device_id))
        self._bus.publish(self.service_name, self._txt, self._addresses, self._port)
        await anyio.lowlevel.checkpoint()

    async def update(self, fingerprint: str) -> None:
        txt = encode_txt(self.device_id, fingerprint, self._name)
        if self._state != "running" or self.service_name is None:
            raise DiscoveryError("discovery is not running")
        self._txt = txt
        self._bus.publish(self.service_name, txt, self._addresses, self._port)
        await anyio.lowlevel.checkpoint()

    async def stop(self) -> None:
        if self._state == "running":
            self._bus._leave(self)
            if self.service_name is not None:
                self._bus.withdraw(self.service_name)
        self._state = "stopped"
        self._close_events()
        await anyio.lowlevel.checkpoint()

    def crash(self) -> None:
        """Leave without a goodbye, like a killed process: the record lingers for the others."""
        if self._state == "running":
            self._bus._leave(self)
        self._state = "stopped"
        self._close_events()

    def _observe(self, service_name: str, advert: _Advert) -> None:
        self._emit(self._table.observe(service_name, advert.properties, advert.addresses, advert.port))

    def _gone(self, service_name: str) -> None:
        self._emit(self._table.remove(service_name))


__all__ = [
    "MAX_ADDRESSES",
    "MAX_INSTANCE_BYTES",
    "MAX_SERVICES",
    "MAX_TXT_BYTES",
    "SERVICE_TYPE",
    "Discovery",
    "DiscoveryError",
    "DiscoveryEvent",
    "EventStream",
    "FakeBus",
    "FakeDiscovery",
    "PeerGone",
    "PeerSeen",
    "PeerTable",
    "TxtRecord",
    "encode_txt",
    "instance_name",
    "normalise_addresses",
    "parse_txt",
    "truncate_utf8",
    "txt_wire_size",
]
