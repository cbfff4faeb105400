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
"""

from __future__ import annotations

import ipaddress
import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

import anyio
import anyio.lowlevel

from agent.errors import TofuError
from agent.identity.ids import clean_name, is_device_id, is_fingerprint

log = logging.getLogger(__name__)

SERVICE_TYPE = "_tofu-agent._tcp.local."
TXT_VERSION = "1"
MAX_TXT_BYTES = 200  # what we send: small enough for one packet with room to spare
MAX_RX_TXT_BYTES = 512  # what we accept from others
MAX_RX_NAME_BYTES = 128
# RFC 6763 allows 63 bytes per instance label; keep room for zeroconf's "-2", "-3", ... on a clash.
MAX_INSTANCE_BYTES = 56
MAX_SERVICES = 256
MAX_ADDRESSES = 8
EVENT_BUFFER = 1024
RESOLVE_WORKERS = 4
RESOLVE_TIMEOUT = 3.0
STOP_TIMEOUT = 2.0


class DiscoveryError(TofuError):
    """mDNS discovery could not be started (no usable network interface, socket error)."""


# -- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerSeen:
    """A peer's advertisement appeared or changed (addresses, port, fingerprint hint or name)."""

    device_id: str
    name: str
    fingerprint_hint: str
    addresses: tuple[str, ...]
    port: int
    service_name: str

    def __post_init__(self) -> None:
        if not is_device_id(self.device_id):
            raise ValueError(f"not a device id: {self.device_id!r}")
        if not is_fingerprint(self.fingerprint_hint):
            raise ValueError("fingerprint_hint is not 64 lower-case hex characters")
        if not 0 < self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        if not self.addresses:
            raise ValueError("a peer needs at least one address")


@dataclass(frozen=True, slots=True)
class PeerGone:
    """A peer's advertisement was withdrawn (goodbye) or expired; a hint, not proof of absence."""

    device_id: str
    service_name: str


DiscoveryEvent = PeerSeen | PeerGone


# -- TXT records and instance names (pure) --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TxtRecord:
    """The validated content of a version-1 TXT record."""

    device_id: str
    fingerprint: str
    name: str


def truncate_utf8(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` of UTF-8 without splitting a character."""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def txt_wire_size(properties: Mapping[bytes, bytes | None]) -> int:
    """Bytes the properties take in a TXT record: a length byte plus `key[=value]` per entry."""
    return sum(1 + len(k) + (0 if v is None else 1 + len(v)) for k, v in properties.items())


def encode_txt(device_id: str, fingerprint: str, name: str) -> dict[bytes, bytes]:
    """The TXT properties we advertise, with `name` truncated so the total is <= MAX_TXT_BYTES.

    :raises ValueError: `device_id` or `fingerprint` is malformed.
    """
    if not is_device_id(device_id):
        raise ValueError(f"not a device id: {device_id!r}")
    if not is_fingerprint(fingerprint):
        raise ValueError("not a fingerprint (64 lower-case hex characters)")
    props = {b"v": TXT_VERSION.encode(), b"id": device_id.encode(), b"fp": fingerprint.encode(), b"name": b""}
    budget = MAX_TXT_BYTES - txt_wire_size(props)
    # Clean again after cutting, so the name a peer parses back is exactly the one we sent.
    props[b"name"] = clean_name(truncate_utf8(clean_name(name), budget)).encode("utf-8")
    return props


def parse_txt(properties: Mapping[bytes, bytes | None]) -> TxtRecord | str:
    """A `TxtRecord` from received TXT properties, or a short reason why they are ignored. Never raises."""
    try:
        if txt_wire_size(properties) > MAX_RX_TXT_BYTES:
            return "TXT record too large"
        version = properties.get(b"v")
        if version != TXT_VERSION.encode():
            return f"unsupported TXT version {version!r:.20}"
        device_id = _ascii(properties.get(b"id"))
        if device_id is None or not is_device_id(device_id):
            return "missing or malformed id"
        fingerprint = _ascii(properties.get(b"fp"))
        if fingerprint is None or not is_fingerprint(fingerprint):
            return "missing or malformed fp"
        raw_name = properties.get(b"name")
        if raw_name is None or len(raw_name) > MAX_RX_NAME_BYTES:
            return "missing or oversize name"
        name = clean_name(raw_name.decode("utf-8"))
    except (UnicodeDecodeError, TypeError, AttributeError, ValueError):
        return "undecodable TXT record"
    return TxtRecord(device_id=device_id, fingerprint=fingerprint, name=name)


def _ascii(value: bytes | None) -> str | None:
    if value is None or len(value) > 64:
        return None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


def instance_name(name: str, device_id: str) -> str:
    """The DNS-SD instance label: display name plus a short device id, at most MAX_INSTANCE_BYTES.

    The id suffix keeps two machines with the same host name apart. Dots and backslashes become
    '-' because many DNS-SD browsers mishandle escaped dots inside an instance label.
    """
    suffix = f" ({device_id[:6]})"
    base = clean_name(name).replace(".", "-").replace("\\", "-")
    base = truncate_utf8(base, MAX_INSTANCE_BYTES - len(suffix.encode("utf-8"))).rstrip()
    return f"{base or 'unnamed'}{suffix}"


def normalise_addresses(
    addresses: Iterable[str],
    *,
    max_addresses: int = MAX_ADDRESSES,
    allow_loopback: bool = False,
    allow_link_local_v6: bool = False,
) -> tuple[str, ...]:
    """Dialable addresses from a record: IPv4, IPv6, then IPv6 link-local; no duplicates. Never raises.

    Unspecified, multicast and (unless allowed) loopback and IPv6 link-local addresses are dropped:
    a hostile record must not make us dial them.
    """
    v4: list[str] = []
    v6: list[str] = []
    v6_link_local: list[str] = []
    for text in addresses:
        if len(v4) + len(v6) + len(v6_link_local) >= 4 * max_addresses:  # bound the work on hostile input
            break
        try:
            addr = ipaddress.ip_address(text)
        except (ValueError, TypeError):
            continue
        if addr.is_unspecified or addr.is_multicast or (addr.is_loopback and not allow_loopback):
            continue
        if isinstance(addr, ipaddress.IPv6Address):
            if addr.ipv4_mapped is not None:
                continue
            if addr.is_link_local:
                if allow_link_local_v6 and addr.scope_id:
                    v6_link_local.append(str(addr))
                continue
            v6.append(str(addr))
        else:
            v4.append(str(addr))
    ordered = list(dict.fromkeys(v4 + v6 + v6_link_local))
    return tuple(ordered[:max_addresses])


# -- the peer table (pure) ------------------------------------------------------------------------


class PeerTable:
    """Turns observed mDNS services into events; bounded and hostile-input safe."""

    def __init__(
        self,
        own_device_id: str,
        *,
        max_services: int = MAX_SERVICES,
        max_addresses: int = MAX_ADDRESSES,
        allow_loopback: bool = False,
        allow_link_local_v6: bool = False,
        on_ignored: Callable[[str, str], None] | None = None,
    ) -> None:
        self.own_device_id = own_device_id
        self.max_services = max_services
        self.max_addresses = max_addresses
        self.allow_loopback = allow_loopback
        self.allow_link_local_v6 = allow_link_local_v6
        self._on_ignored = on_ignored
        self._peers: dict[str, PeerSeen] = {}  # by lower-cased service name

    def __len__(self) -> int:
        return len(self._peers)

    def peers(self) -> tuple[PeerSeen, ...]:
        """The peers currently advertised, in order of first sighting."""
        return tuple(self._peers.values())

    def observe(
        self,
        service_name: str,
        properties: Mapping[bytes, bytes | None],
        addresses: Iterable[str],
        port: int | None,
    ) -> list[DiscoveryEvent]:
        """Events for a resolved service (new, changed, or turned invalid). Never raises."""
        key = service_name.lower()
        peer_or_reason = self._parse(service_name, properties, addresses, port)
        old = self._peers.get(key)
        if isinstance(peer_or_reason, str):
            self._ignore(service_name, peer_or_reason)
            if old is None:
                return []
            del self._peers[key]
            return [PeerGone(old.device_id, old.service_name)]
        peer = peer_or_reason
        if old == peer:
            return []
        if old is None and len(self._peers) >= self.max_services:
            self._ignore(service_name, f"tracking {self.max_services} services already")
            return []
        self._peers[key] = peer
        if old is not None and old.device_id != peer.device_id:
            return [PeerGone(old.device_id, old.service_name), peer]
        return [peer]

    def remove(self, service_name: str) -> list[DiscoveryEvent]:
        """Events for a service whose records were withdrawn or expired."""
        old = self._peers.pop(service_name.lower(), None)
        return [] if old is None else [PeerGone(old.device_id, old.service_name)]

    def _parse(
        self,
        service_name: str,
        properties: Mapping[bytes, bytes | None],
        addresses: Iterable[str],
        port: int | None,
    ) -> PeerSeen | str:
        if not isinstance(service_name, str) or len(service_name) > 255:
            return "bad service name"
        if not service_name.lower().endswith("." + SERVICE_TYPE):
            return "not our service type"
        txt = parse_txt(properties)
        if isinstance(txt, str):
            return txt
        if txt.device_id == self.own_device_id:
            return "our own advertisement"
        if not isinstance(port, int) or not 0 < port < 65536:
            return "bad port"
        addrs = normalise_addresses(
            addresses,
            max_addresses=self.max_addresses,
            allow_loopback=self.allow_loopback,
            allow_link_local_v6=self.allow_link_local_v6,
        )
        if not addrs:
            return "no usable address"
        return PeerSeen(
            device_id=txt.device_id,
            name=txt.name,
            fingerprint_hint=txt.fingerprint,
            addresses=addrs,
            port=port,
            service_name=service_name,
        )

    def _ignore(self, service_name: str, reason: str) -> None:
        log.debug("ignoring mDNS record %.80r: %s", service_name, reason)
        if self._on_ignored is not None:
            self._on_ignored(service_name, reason)


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
]
