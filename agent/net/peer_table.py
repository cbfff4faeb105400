"""The pure half of discovery: what a peer's mDNS record may say, and the bounded table of peers.

Everything here is hostile, unauthenticated input handled without I/O: `parse_txt` and
`normalise_addresses` reject what is malformed (never raising), the per-record caps (TXT size, name
size, `MAX_ADDRESSES`) and the table's `MAX_SERVICES` bound memory under a flood, and `PeerTable`
turns observations into `PeerSeen` / `PeerGone` events. `agent.net.discovery` has the theory of
operation and the services that feed the table; it re-exports these names.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from agent.identity.ids import clean_name, is_device_id, is_fingerprint

# The name this logger always had, before the table moved out of agent.net.discovery.
log = logging.getLogger("agent.net.discovery")

SERVICE_TYPE = "_tofu-agent._tcp.local."
TXT_VERSION = "1"
MAX_TXT_BYTES = 200  # what we send: small enough for one packet with room to spare
MAX_RX_TXT_BYTES = 512  # what we accept from others
MAX_RX_NAME_BYTES = 128
# RFC 6763 allows 63 bytes per instance label; keep room for zeroconf's "-2", "-3", ... on a clash.
MAX_INSTANCE_BYTES = 56
MAX_SERVICES = 256
MAX_ADDRESSES = 8


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


__all__ = [
    "MAX_ADDRESSES",
    "MAX_INSTANCE_BYTES",
    "MAX_RX_NAME_BYTES",
    "MAX_RX_TXT_BYTES",
    "MAX_SERVICES",
    "MAX_TXT_BYTES",
    "SERVICE_TYPE",
    "TXT_VERSION",
    "DiscoveryEvent",
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
