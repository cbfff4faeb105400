"""The sync I/O shell: runs one `SyncEngine` per configured folder for the daemon (placeholder)."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.abc

from agent.config import Config
from agent.identity import Identity
from agent.net.link import PeerLink
from agent.paths import Paths
from agent.wire.messages import WireMessage


class SyncService:
    """What the daemon calls for folder sync; every method is safe to call for any open link."""

    def __init__(self, paths: Paths, config: Config, ident: Identity) -> None:
        self.paths = paths
        self.config = config
        self.identity = ident

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Scan folders, watch them and run timers until cancelled."""
        task_status.started()

    async def peer_opened(self, link: PeerLink) -> None:
        """A trusted peer is connected: start exchanging indexes."""

    async def message(self, link: PeerLink, message: WireMessage) -> None:
        """A sync message from a connected peer; RemoteProtocolError closes that link."""

    async def peer_closed(self, link: PeerLink) -> None:
        """A peer's link closed: forget its in-flight requests."""

    def status(self) -> list[dict[str, Any]]:
        """The `folders` list of `status --json`."""
        return []
