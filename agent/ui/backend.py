"""What the page needs from the running agent: the `UiBackend` protocol, and `ChangeFeed` to implement it.

The daemon implements `UiBackend`; the page never imports the daemon, the sync engine or the
network code. `snapshot()` is the very object `tofu-agent status --json` prints (one source of
truth), with two optional additions the page shows when present:

- `"pairing_window": {"open": bool, "closes_at": RFC 3339 | None}` (the pairing-window feature);
- `"offered_folders": [{"id": str, "device_id": str, "name": str}]` (folders a peer offers).

Folder entries carry `type` ("sendreceive" | "sendonly" | "receiveonly"), `paused`, `remote_differs`
(send-only), `locally_changed` (receive-only) and `versions_evicted` when the agent keeps versions.

Actions (`act`) name the key the person saw (`fingerprint=`) where it matters, so the agent can
refuse a decision about a key that changed while the page was open.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final, Protocol

import anyio

# action -> does it need a device?
ACTIONS: Final[dict[str, bool]] = {
    "verify": True,  # args: fingerprint (the key whose safety number the person compared)
    "revoke": True,
    "retrust": True,  # args: fingerprint (the offered key the person saw)
    "accept": True,  # args: fingerprint
    "reject": True,
    "forget": True,
    "introducer_on": True,
    "introducer_off": True,
    "clear_anomalies": True,
    "window_open": False,
    "window_close": False,
    "pair_start": False,  # returns the code to show
    "pair_join": False,  # args: code
    "rotate_key": False,
    "accept_folder": True,  # args: folder (the device is the one offering it)
    "restore": False,  # args: folder, path, at (the exact `kept_at` of the version the person saw)
    "folder_override": False,  # args: folder (send-only: its state wins on every peer)
    "folder_revert": False,  # args: folder (receive-only: local changes are undone, kept as versions)
    "folder_pause": False,  # args: folder
    "folder_resume": False,  # args: folder
}


@dataclass(frozen=True, slots=True)
class ThisDevice:
    """This machine as the page shows it; the identity URI and QR code are derived from it."""

    device_id: str
    name: str
    fingerprint: str


class UiBackend(Protocol):
    """The running agent as the page sees it. Every method may be called from the event loop."""

    async def snapshot(self) -> dict[str, Any]:
        """The `status --json` object (see `agent.report.build_status`)."""
        ...

    async def trust_log(self, device: str | None, limit: int) -> list[dict[str, Any]]:
        """Trust events as `agent.cli.event_json` prints them, newest first, at most `limit`."""
        ...

    def this_device(self) -> ThisDevice:
        """This machine's id, name and current fingerprint."""
        ...

    async def versions(self, folder: str | None) -> list[dict[str, Any]]:
        """The kept versions of one folder (None: every folder), newest first, as `tofu-agent versions
        --json` lists them: `folder, path, name, kept_at` (unix wall time), `size, by` (device id or "").

        :raises agent.errors.UserError: no such folder, or this agent keeps no versions.
        """
        ...

    async def act(self, action: str, device: str | None, **args: str) -> str:
        """Carry out one action (a key of `ACTIONS`); return one line for the person.

        :raises agent.errors.UserError: the action is refused or not supported; the message says why.
        """
        ...

    def changes(self) -> AsyncIterator[int]:
        """A new subscription, starting at the call (not at the first `anext`): yields a version number
        after each change of the snapshot, coalesced. `ChangeFeed.subscribe` does this."""
        ...


class ChangeFeed:
    """A coalescing change signal: `notify()` from anywhere on the loop, any number of `subscribe()`rs.

    A subscriber that is slow sees one wake-up for many changes, never a backlog.
    """

    def __init__(self) -> None:
        self.version = 0
        self._event = anyio.Event()
        self._closed = False

    def notify(self) -> None:
        """Record a change and wake every subscriber."""
        self.version += 1
        self._event.set()
        self._event = anyio.Event()

    def close(self) -> None:
        """End every subscription."""
        self._closed = True
        self._event.set()

    async def wait(self, seen: int) -> int:
        """Wait until the version differs from `seen` (or the feed closes); return the version."""
        while self.version == seen and not self._closed:
            await self._event.wait()
        return self.version

    @property
    def closed(self) -> bool:
        """True once `close()` ran."""
        return self._closed

    def subscribe(self) -> AsyncIterator[int]:
        """Yield the version after each change from now on; ends when the feed closes.

        The starting point is taken here, not at the first `anext`, so no change made between
        subscribing and iterating is missed.
        """
        return self._follow(self.version)

    async def _follow(self, seen: int) -> AsyncIterator[int]:
        while True:
            seen = await self.wait(seen)
            if self._closed:
                return
            yield seen
