"""`FakeBackend`: an in-memory agent for tests, benchmarks and trying the page without peers.

It keeps a `status --json`-shaped dict and changes it the way the agent would: `accept` makes a
pending device `tofu`, `retrust` pins the offered key, and so on. Tests drive it with the helper
methods (`add_device`, `connect`, `offer_key`, `raise_anomaly`, `add_folder`, `set_progress`,
`keep_version`). Restoring a kept version marks it `restored`; it stays listed, as in the agent.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from agent.errors import UserError
from agent.ui.backend import ACTIONS, ChangeFeed, ThisDevice


def fake_device_id(seed: str) -> str:
    """A well-formed device id derived from `seed` (32 base32 characters)."""
    return base64.b32encode(hashlib.sha256(seed.encode()).digest()[:20]).decode("ascii")


def fake_fingerprint(seed: str) -> str:
    """A well-formed fingerprint derived from `seed`."""
    return hashlib.sha256(b"fp:" + seed.encode()).hexdigest()


def _stamp(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class FakeBackend:
    """A `UiBackend` in memory. `unsupported` lists actions it refuses as an older agent would."""

    def __init__(self, name: str = "this-machine", unsupported: frozenset[str] = frozenset()) -> None:
        self.me = ThisDevice(fake_device_id(name), name, fake_fingerprint(name))
        self.feed = ChangeFeed()
        self.unsupported = unsupported
        self.status: dict[str, Any] = {
            "running": True,
            "device_id": self.me.device_id,
            "name": self.me.name,
            "fingerprint": self.me.fingerprint,
            "bind": "127.0.0.1",
            "port": 39001,
            "pid": 1,
            "trust_policy": "manual",
            "mdns": True,
            "peers": [],
            "folders": [],
            "pairing_window": {"open": False, "closes_at": None},
            "offered_folders": [],
        }
        self.log: list[dict[str, Any]] = []
        self.kept: list[dict[str, Any]] = []  # kept versions, as `versions` lists them
        self.actions: list[tuple[str, str | None, dict[str, str]]] = []
        self.pair_code = "7-guitar-oxygen"

    # -- helpers for tests ----------------------------------------------------------------------

    def peer(self, device_id: str) -> dict[str, Any]:
        """The peer entry for `device_id` (KeyError if there is none)."""
        for p in self.status["peers"]:
            if p["device_id"] == device_id:
                return p  # type: ignore[no-any-return]
        raise KeyError(device_id)

    def _event(self, device_id: str, kind: str, trust_after: str | None, detail: str = "", **more: Any) -> None:
        p = next((p for p in self.status["peers"] if p["device_id"] == device_id), None)
        self.log.append(
            {
                "seq": len(self.log) + 1,
                "time": _stamp(time.time()),
                "device_id": device_id,
                "kind": kind,
                "fingerprint": more.get("fingerprint", p["fingerprint"] if p else None),
                "old_fingerprint": more.get("old_fingerprint"),
                "address": p["address"] if p else None,
                "detail": detail,
                "trust_after": trust_after,
            }
        )

    def add_device(
        self,
        seed: str,
        name: str | None = None,
        trust: str = "tofu",
        connected: bool = False,
        address: str | None = "192.0.2.7:39001",
    ) -> str:
        """Add a device (its id and key derive from `seed`); return its id."""
        device_id = fake_device_id(seed)
        self.status["peers"].append(
            {
                "device_id": device_id,
                "name": seed if name is None else name,
                "trust": trust,
                "connected": connected,
                "address": address,
                "fingerprint": fake_fingerprint(seed),
                "pending_fingerprint": None,
                "last_seen": _stamp(time.time()),
                "sync_count": 0,
                "anomalies": [],
            }
        )
        self.status["peers"].sort(key=lambda p: p["device_id"])
        self._event(device_id, "first_seen" if trust != "pending" else "pending", trust)
        self.feed.notify()
        return device_id

    def connect(self, device_id: str, connected: bool = True) -> None:
        """Mark a device connected or not."""
        p = self.peer(device_id)
        p["connected"] = connected
        p["last_seen"] = _stamp(time.time())
        self.feed.notify()

    def offer_key(self, device_id: str, seed: str) -> str:
        """The device shows another key: it becomes key_changed with that key pending."""
        p = self.peer(device_id)
        new = fake_fingerprint(seed)
        p.update(trust="key_changed", pending_fingerprint=new, connected=False)
        old = p["fingerprint"]
        self._event(device_id, "key_changed", "key_changed", "refused", fingerprint=new, old_fingerprint=old)
        self.feed.notify()
        return new

    def raise_anomaly(self, device_id: str, code: str, summary: str) -> None:
        """Add an anomaly in force for a device."""
        now = time.time()
        self.peer(device_id)["anomalies"].append(
            {
                "code": code,
                "severity": "warning",
                "device_id": device_id,
                "summary": summary,
                "first_seen": now,
                "last_seen": now,
                "evidence": {},
            }
        )
        self._event(device_id, "anomaly", None, f"{code}: {summary}")
        self.feed.notify()

    def add_folder(
        self,
        folder_id: str,
        path: str,
        peers: Sequence[tuple[str, int, int]] = (),
        *,
        kind: str = "sendreceive",  # the status entry's `type`
        paused: bool = False,
        versioning: str = "trash",
        remote_differs: int = 0,
        locally_changed: int = 0,
        versions_evicted: int = 0,
    ) -> None:
        """Add a folder; `peers` are (device id, files needed, bytes needed)."""
        self.status["folders"].append(
            {
                "id": folder_id,
                "path": path,
                "state": "paused" if paused else "idle",
                "error": None,
                "failed_files": 0,
                "files": 120,
                "bytes": 10_000_000,
                "need_files": 0,
                "need_bytes": 0,
                "peers": [],
                "type": kind,
                "paused": paused,
                "versioning": versioning,
                "remote_differs": remote_differs,
                "locally_changed": locally_changed,
                "versions_evicted": versions_evicted,
            }
        )
        for device_id, files, size in peers:
            self.set_progress(folder_id, device_id, files, size)
        self.feed.notify()

    def set_progress(self, folder_id: str, device_id: str, need_files: int, need_bytes: int) -> None:
        """Set what a device still needs of a folder."""
        folder = next(f for f in self.status["folders"] if f["id"] == folder_id)
        total = max(folder["bytes"], need_bytes)
        percent = 100.0 if not total else round(100.0 * (total - need_bytes) / total, 1)
        entry = {
            "device_id": device_id,
            "name": next((p["name"] for p in self.status["peers"] if p["device_id"] == device_id), ""),
            "need_files": need_files,
            "need_bytes": need_bytes,
            "percent": min(percent, 99.0) if need_files else percent,
        }
        folder["peers"] = [e for e in folder["peers"] if e["device_id"] != device_id] + [entry]
        folder["state"] = "syncing" if need_files else "paused" if folder.get("paused") else "idle"
        self.feed.notify()

    def folder(self, folder_id: str | None) -> dict[str, Any]:
        """The status entry of folder `folder_id`.

        :raises UserError: there is none (as the agent says it).
        """
        for f in self.status["folders"]:
            if f["id"] == folder_id:
                return f  # type: ignore[no-any-return]
        raise UserError(f"no folder {folder_id!r} is synced (see `tofu-agent folders`)")

    def keep_version(self, folder_id: str, name: str, kept_at: float, size: int = 1234, by: str = "") -> None:
        """Note a kept version of `name` (what a peer's change, by device `by`, replaced at `kept_at`)."""
        self.folder(folder_id)
        stamp = dt.datetime.fromtimestamp(kept_at, dt.UTC).strftime("%Y%m%d-%H%M%S")
        version = {
            "folder": folder_id,
            "path": f".tofu-versions/{name}~{stamp}",
            "name": name,
            "kept_at": kept_at,
            "size": size,
            "by": by,
            "restored": False,
        }
        self.kept.append(version)
        self.kept.sort(key=lambda k: -k["kept_at"])
        self.feed.notify()

    # -- UiBackend ------------------------------------------------------------------------------

    async def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(self.status)

    async def trust_log(self, device: str | None, limit: int) -> list[dict[str, Any]]:
        events = [e for e in reversed(self.log) if device is None or e["device_id"] == device]
        return copy.deepcopy(events[:limit])

    def this_device(self) -> ThisDevice:
        return self.me

    async def versions(self, folder: str | None) -> list[dict[str, Any]]:
        if folder is not None:
            self.folder(folder)
        shown = [{k: v for k, v in kept.items() if k != "restored"} for kept in self.kept]
        return [k for k in shown if folder is None or k["folder"] == folder]

    def _folder_act(self, action: str, args: dict[str, str]) -> str:
        """`restore`, `folder_override`, `folder_revert`, `folder_pause`, `folder_resume`."""
        f = self.folder(args.get("folder"))
        if action == "restore":
            name, at = args.get("path", ""), float(args["at"]) if args.get("at") else None
            found = [k for k in self.kept if k["folder"] == f["id"] and k["name"] == name]
            found = [k for k in found if at is None or k["kept_at"] <= at]
            if not found:
                raise UserError(f"no kept version of {name!r}" + (" at or before that time" if at else ""))
            found[0]["restored"] = True
            return f"restored {name[:200]} in {f['id']}; it syncs to the peers now"
        if action == "folder_override":
            if f.get("type") != "sendonly":
                raise UserError(f"folder {f['id']!r} is not send-only")
            differs, f["remote_differs"] = f.get("remote_differs", 0), 0
            return f"folder {f['id']!r}: our state now wins on every peer ({differs} names)"
        if action == "folder_revert":
            if f.get("type") != "receiveonly":
                raise UserError(f"folder {f['id']!r} is not receive-only")
            changed, f["locally_changed"] = f.get("locally_changed", 0), 0
            return f"folder {f['id']!r}: {changed} local changes undone (kept as versions)"
        paused = action == "folder_pause"
        f["paused"] = paused
        if f["state"] in ("idle", "paused"):
            f["state"] = "paused" if paused else "idle"
        return f"folder {f['id']!r} is {'paused: no data moves' if paused else 'syncing again'}"

    def changes(self) -> AsyncIterator[int]:
        return self.feed.subscribe()

    async def act(self, action: str, device: str | None, **args: str) -> str:
        if action not in ACTIONS or action in self.unsupported:
            raise UserError(f"this agent does not support {action!r}")
        self.actions.append((action, device, dict(args)))
        if action == "pair_start":
            return f"pairing code: {self.pair_code}"
        if action == "pair_join":
            return f"joined pairing with code {args.get('code', '')}"
        if action in ("window_open", "window_close"):
            self.status["pairing_window"] = {"open": action == "window_open", "closes_at": None}
            self.feed.notify()
            return "pairing window " + ("open" if action == "window_open" else "closed")
        if action == "rotate_key":
            return "key rotated"
        if action in ("restore", "folder_override", "folder_revert", "folder_pause", "folder_resume"):
            message = self._folder_act(action, args)
            self.feed.notify()
            return message
        if device is None:
            raise UserError(f"{action} needs a device")
        p = self.peer(device)
        if action == "accept_folder":
            self.status["offered_folders"] = [
                o
                for o in self.status["offered_folders"]
                if not (o["id"] == args.get("folder") and o["device_id"] == device)
            ]
            self.feed.notify()
            return f"folder {args.get('folder')} accepted"
        shown = args.get("fingerprint")
        if action == "retrust":
            if p["trust"] != "key_changed" or shown != p["pending_fingerprint"]:
                raise UserError("the key changed while you looked; check it again")
            p.update(trust="tofu", fingerprint=p["pending_fingerprint"], pending_fingerprint=None, connected=True)
        elif action == "accept":
            if p["trust"] != "pending":
                raise UserError(f"{p['name']} is not waiting for approval")
            p.update(trust="tofu", connected=True)
        elif action == "verify":
            wanted = p["pending_fingerprint"] if p["trust"] == "key_changed" else p["fingerprint"]
            if shown != wanted:
                raise UserError("the key changed while you compared; compare again")
            p.update(trust="verified", fingerprint=wanted, pending_fingerprint=None)
        elif action == "revoke":
            p.update(trust="revoked", connected=False)
        elif action == "reject":
            p.update(trust="revoked", connected=False)
        elif action == "forget":
            self.status["peers"].remove(p)
        elif action == "clear_anomalies":
            p["anomalies"] = []
        elif action in ("introducer_on", "introducer_off"):
            p["introducer"] = action == "introducer_on"
        self._event(device, action, p.get("trust"), "by the web page")
        self.feed.notify()
        return f"{action.replace('_', ' ')}: done for {p['name'][:64]}"
