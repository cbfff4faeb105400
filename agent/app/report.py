"""The `status` object: the agent's live state (copied on its event loop) plus the trust store."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.trust.anomaly import LiveConnection, Observation
from agent.trust.model import DeviceRecord, TrustEvent, TrustLevel


def rfc3339(ts: float | None) -> str | None:
    """Unix seconds as RFC 3339 UTC with a Z (as in the seed's trusted_peers.json), or None."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class LiveView:
    """A copy of one device's live state for `status`."""

    name: str
    connected: bool
    address: str | None
    advertised_fp: str | None
    refused_us: str = ""  # why the device refused us, e.g. "waiting for approval on desktop"


@dataclass(frozen=True, slots=True)
class StatusSnapshot:
    """Everything `status` reads from the event loop, copied so a worker thread can use it."""

    views: dict[str, LiveView]
    live: list[LiveConnection]
    observations: list[Observation]
    folders: list[dict[str, Any]]
    offered: list[dict[str, Any]] = field(default_factory=list)  # folders peers offer that we do not share


def build_status(
    own: dict[str, Any],
    snap: StatusSnapshot,
    records: Sequence[DeviceRecord],
    anomalies: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """The `status --json` object: `own` fields, then every known or live device, then folders."""
    by_device: dict[str, list[dict[str, Any]]] = {}
    for a in anomalies:
        by_device.setdefault(str(a["device_id"]), []).append(a)
    known = {r.device_id: r for r in records}
    shown = {d for d, v in snap.views.items() if v.connected or v.advertised_fp or v.refused_us}
    now = time.time()
    peers = []
    for device_id in sorted(set(known) | shown):
        r = known.get(device_id)
        v = snap.views.get(device_id)
        peers.append(
            {
                "device_id": device_id,
                "name": (r.name if r else "") or (v.name if v else ""),
                "trust": r.trust.value if r else TrustLevel.UNKNOWN.value,
                "connected": bool(v and v.connected),
                "address": (v.address if v else None) or (r.addresses[0] if r and r.addresses else None),
                "fingerprint": r.fingerprint if r else (v.advertised_fp if v else None),
                "pending_fingerprint": r.pending_fingerprint if r else None,
                "introducer": r.introducer if r else False,
                "last_seen": rfc3339(now if v and v.connected else (r.last_seen if r else None)),
                "sync_count": r.sync_count if r else 0,
                "anomalies": by_device.get(device_id, []),
                "refused_us": v.refused_us if v else "",
            }
        )
    return {"running": True, **own, "peers": peers, "folders": snap.folders, "offered_folders": snap.offered}


def event_json(e: TrustEvent) -> dict[str, Any]:
    """A trust event as JSON (the shape `tofu-agent trust log --json` prints)."""
    return {
        "seq": e.seq,
        "time": rfc3339(e.time),
        "device_id": e.device_id,
        "kind": e.kind.value,
        "fingerprint": e.fingerprint,
        "old_fingerprint": e.old_fingerprint,
        "address": e.address,
        "detail": e.detail,
        "trust_after": e.trust_after.value if e.trust_after else None,
    }
