"""What the agent knows live about each device, beyond the trust store: link, addresses, adverts.

The agent owns one `dict[str, PeerView]` keyed by device id; the dialler, the trust decision and
the introductions read and update it, all on the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import anyio

from agent.net.link import PeerLink
from agent.trust.anomaly import LiveConnection


@dataclass(eq=False)
class PeerView:
    """What the agent knows live about one device (beyond the trust store)."""

    device_id: str
    name: str = ""
    link: PeerLink | None = None
    address: str | None = None
    advertised_fp: str | None = None
    mdns_addresses: tuple[str, ...] = ()
    disconnected: anyio.Event = field(default_factory=anyio.Event)
    refused_us: str = ""  # why the device last refused us ("" once it accepts), e.g. waiting for approval


def live_connections(peers: Mapping[str, PeerView]) -> list[LiveConnection]:
    """Every authenticated link now, as the anomaly rules see it (read on the event loop)."""
    return [
        LiveConnection(v.device_id, v.link.peer.fingerprint, v.link.address, v.link.opened_at or 0.0)
        for v in peers.values()
        if v.link is not None and v.link.peer is not None
    ]
