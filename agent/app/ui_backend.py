"""The running agent as the web page sees it: `agent.ui.backend.UiBackend` over the daemon's parts.

The page decides nothing either: every action here is the same store transition the CLI applies
(`agent/trust/policy.py` through `TrustStore`), followed by the same `trust_changed` the control
socket sends, so the running agent acts on it at once. A decision about a key names the key the
person saw (`fingerprint=`): if the device showed another key meanwhile, it is refused.

Kept versions, restore, override and revert go to the folders' engines (`SyncService`, the same
calls the control socket's `versions`, `restore`, `folder_override` and `folder_revert` make);
pausing edits config.toml as `tofu-agent folder pause` does, then applies it at once.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio.to_thread

from agent.app import folders
from agent.app.report import event_json, rfc3339
from agent.errors import UserError
from agent.host.paths import Paths
from agent.trust import policy
from agent.trust.model import DeviceRecord, EventKind, TrustLevel
from agent.trust.store import TrustStore
from agent.ui.backend import ChangeFeed, ThisDevice


class FolderRequests(Protocol):
    """What the page asks of the folders' engines (`agent.sync.service.SyncService` has it)."""

    async def versions(self, folder_id: str | None, name: str = "") -> list[dict[str, Any]]: ...

    async def restore(self, folder_id: str, name: str, at: float | None) -> dict[str, Any]: ...

    async def override(self, folder_id: str) -> dict[str, Any]: ...

    async def revert(self, folder_id: str) -> dict[str, Any]: ...


def _when(wall: float) -> str:
    return dt.datetime.fromtimestamp(wall, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _at(text: str | None) -> float | None:
    """The `at` of a restore: the exact `kept_at` the page listed (None: the newest version)."""
    if not text:
        return None
    try:
        at = float(text)
    except ValueError:
        raise UserError(f"not a time: {text[:40]!r}") from None
    if not math.isfinite(at):
        raise UserError(f"not a time: {text[:40]!r}")
    return at


def _same_key(seen: str | None, actual: str | None, name: str) -> None:
    if seen and seen != actual:
        raise UserError(f"{name}'s key changed while the page was open: look again before deciding")


@dataclass
class AgentBackend:
    """`UiBackend` for the daemon; each collaborator is one of the daemon's own methods."""

    store: TrustStore
    feed: ChangeFeed
    this: Callable[[], ThisDevice]
    status: Callable[[], Awaitable[dict[str, Any]]]
    trust_changed: Callable[[str, DeviceRecord | None], None]
    set_window: Callable[[float | None], dict[str, Any]]
    rotate_key: Callable[[], Awaitable[dict[str, Any]]]
    folders_changed: Callable[[], Awaitable[dict[str, Any]]] | None = None
    paths: Paths | None = None
    start_pairing: Callable[[], Awaitable[str]] | None = None  # a new code; the pairing runs on
    join_pairing: Callable[[str], Awaitable[str]] | None = None  # with a code typed in
    sync: Callable[[], FolderRequests | None] | None = None  # the folders' engines (None: no folders)

    def _folders(self) -> FolderRequests:
        """The folders' engines.

        :raises UserError: this agent syncs no folders.
        """
        engines = self.sync() if self.sync is not None else None
        if engines is None:
            raise UserError("this agent syncs no folders")
        return engines

    async def snapshot(self) -> dict[str, Any]:
        st = await self.status()
        pw = st.get("pairing_window")
        if isinstance(pw, dict) and st.get("trust_policy") == "window":
            st["pairing_window"] = {**pw, "closes_at": rfc3339(pw["until"]) if pw.get("until") else None}
        else:
            st.pop("pairing_window", None)
        return st

    async def trust_log(self, device: str | None, limit: int) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            target = self.store.resolve(device).device_id if device else None
            return [event_json(e) for e in self.store.events(target, limit)]

        return await anyio.to_thread.run_sync(read)

    def this_device(self) -> ThisDevice:
        return self.this()

    async def versions(self, folder: str | None) -> list[dict[str, Any]]:
        return await self._folders().versions(folder, "")

    def changes(self) -> AsyncIterator[int]:
        return self.feed.subscribe()

    async def act(self, action: str, device: str | None, **args: str) -> str:
        match action:
            case "window_open":
                view = self.set_window(float(args.get("seconds", 600)))
                until = time.strftime("%H:%M", time.localtime(float(view["until"])))
                return f"the pairing window is open until {until}: new devices are trusted on first use"
            case "window_close":
                self.set_window(None)
                return "the pairing window is closed"
            case "rotate_key":
                done = await self.rotate_key()
                return f"this machine's key was rotated; new fingerprint {done['fingerprint'][:16]}..."
            case "pair_start":
                if self.start_pairing is None:
                    raise UserError("code pairing is not available here: run `tofu-agent pair`")
                shown = await self.start_pairing()
                code = shown.split(" ")[0]
                return (
                    f"pairing code {shown}: on the other machine run `tofu-agent pair {code}` or enter it on "
                    f"its page (This machine); it works once, for 5 minutes"
                )
            case "pair_join":
                if self.join_pairing is None:
                    raise UserError("code pairing is not available here: run `tofu-agent pair CODE`")
                return await self.join_pairing(args.get("code", ""))
            case "accept_folder":
                return await self._accept_folder(args.get("folder"), device)
            case "restore" | "folder_override" | "folder_revert":
                return await self._folder_request(action, args)
            case "folder_pause" | "folder_resume":
                return await self._pause(args.get("folder"), action == "folder_pause")
        if device is None:
            raise UserError(f"{action} needs a device")
        record = await anyio.to_thread.run_sync(self._apply, action, device, args.get("fingerprint"))
        self.trust_changed(record.device_id, None if action == "forget" else record)
        self.feed.notify()
        level = "unknown" if action == "forget" else record.trust.value
        return f"{action}: {record.name} ({record.device_id[:8]}) is now {level}"

    async def _accept_folder(self, folder_id: str | None, device: str | None) -> str:
        """Accept the folder `device` offers: a `[[folder]]` shared with it, applied at once."""
        if self.paths is None or self.folders_changed is None:
            raise UserError("this is not available yet in this version")
        paths = self.paths
        if not folder_id or device is None:
            raise UserError("accept_folder needs a folder and the device offering it")
        record = await anyio.to_thread.run_sync(self.store.resolve, device)
        if not record.trust.may_sync:
            raise UserError(f"{record.name} is {record.trust.value}: it gets no folder")
        added = await anyio.to_thread.run_sync(folders.accept, paths, folder_id, [record.device_id], None)
        result = await self.folders_changed()
        self.feed.notify()
        later = " (restart tofu-agent to start it)" if any(r["id"] == folder_id for r in result["restart"]) else ""
        return f"folder {folder_id!r} is synced with {record.name} at {added.path}{later}"

    async def _folder_request(self, action: str, args: dict[str, str]) -> str:
        """Restore a kept version, or override (send-only) or revert (receive-only) a folder."""
        folder_id = args.get("folder")
        if not folder_id:
            raise UserError(f"{action} needs a folder")
        engines = self._folders()
        if action == "restore":
            name = args.get("path", "").strip("/")
            if not name:
                raise UserError("restore needs the path of a file in the folder")
            kept = await engines.restore(folder_id, name, _at(args.get("at")))
            self.feed.notify()
            shown = str(kept.get("name", name))[:200]
            return (
                f"restored {shown} in {folder_id} as it was before {_when(float(kept['kept_at']))}; "
                "it syncs to the peers now"
            )
        if action == "folder_override":
            done = await engines.override(folder_id)
            self.feed.notify()
            return f"folder {folder_id!r}: this machine's state now wins on every peer ({done['overridden']} names)"
        done = await engines.revert(folder_id)
        self.feed.notify()
        return f"folder {folder_id!r}: {done['reverted']} local changes undone (kept as versions)"

    async def _pause(self, folder_id: str | None, paused: bool) -> str:
        """Pause or resume a folder in config.toml (`tofu-agent folder pause|resume`), applied at once."""
        if self.paths is None or self.folders_changed is None:
            raise UserError("this is not available yet in this version")
        if not folder_id:
            raise UserError("pausing needs a folder")
        folder = await anyio.to_thread.run_sync(folders.set_paused, self.paths, folder_id, paused)
        result = await self.folders_changed()
        self.feed.notify()
        later = " (restart tofu-agent to apply it)" if any(r["id"] == folder.id for r in result["restart"]) else ""
        return f"folder {folder.id!r} is {'paused: no data moves' if paused else 'syncing again'}{later}"

    def _apply(self, action: str, device: str, fingerprint: str | None) -> DeviceRecord:
        """One store transition, in a worker thread."""
        now = time.time()
        current = self.store.resolve(device)
        match action:
            case "verify":
                _same_key(fingerprint, current.pending_fingerprint or current.fingerprint, current.name)
                key = fingerprint or current.fingerprint
                return self.store.change(device, now, lambda r: policy.verify(r, key), "verified on the web page")
            case "retrust":
                _same_key(fingerprint, current.pending_fingerprint or current.fingerprint, current.name)
                return self.store.retrust(device, now)
            case "accept":
                _same_key(fingerprint, current.fingerprint, current.name)
                return self.store.accept(device, now)
            case "revoke":
                return self.store.revoke(device, now, "revoked on the web page")
            case "reject":
                if current.trust is not TrustLevel.PENDING:
                    raise UserError(f"{current.name} is not waiting for approval")
                return self.store.revoke(device, now, "request rejected on the web page")
            case "forget":
                return self.store.forget(device, now)
            case "introducer_on" | "introducer_off":
                return self.store.set_introducer(device, action == "introducer_on", now)
            case "clear_anomalies":
                self.store.record_event(current.device_id, EventKind.ANOMALY_CLEARED, now, detail="")
                return current
        raise UserError(f"unknown action {action!r}")
