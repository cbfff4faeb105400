"""Anomaly rules over the trust event log and live observations (pure: no disk, no clock).

Theory of operation: `evaluate` runs every rule over what the caller hands in (the event log, the
device records, the live connections, and observations such as mDNS adverts) at time `now`, and
returns at most one `Anomaly` per (code, device), sorted. It never changes trust: the daemon logs
new anomalies (`unreported`), and revokes devices for those `to_block` picks.

Rules, and the evidence each one trusts:
- repeated_key_change: >= threshold distinct keys offered in KEY_CHANGED events within the window.
  Only keys a device proved in a handshake are logged, and ROTATED events never count.
- key_flip_flop: a key the device held before a change comes back later (an intermittent MITM).
- advert_mismatch: an mDNS record's fingerprint differs from the key the same device id proved.
  The record is unauthenticated, so it only ever raises an anomaly about the device it names.
- cloned_key: one key proven by two device ids, or one device id live with two unrelated keys.
- new_device_same_name: a device id not seen before uses the name of a known device.

Acknowledgement: an ANOMALY_CLEARED event hides a device's anomalies (all of them, or the one whose
code is the event's detail) when all their evidence is at or before the clear; newer evidence
raises them again.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from agent.errors import ConfigError
from agent.trust.model import DeviceRecord, EventKind, TrustEvent


class AnomalyCode(StrEnum):
    """Stable anomaly codes: shown to users, written to the event log, named in `block_on`."""

    REPEATED_KEY_CHANGE = "repeated_key_change"
    KEY_FLIP_FLOP = "key_flip_flop"
    ADVERT_MISMATCH = "advert_mismatch"
    CLONED_KEY = "cloned_key"
    NEW_DEVICE_SAME_NAME = "new_device_same_name"


class Severity(StrEnum):
    """How loudly to report an anomaly; independent of whether it blocks."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _SEVERITY_RANK[self]


_SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}

SEVERITY: Mapping[AnomalyCode, Severity] = {
    AnomalyCode.REPEATED_KEY_CHANGE: Severity.CRITICAL,
    # Also what restoring an old backup looks like, so it warns rather than blocks by default.
    AnomalyCode.KEY_FLIP_FLOP: Severity.WARNING,
    # Unauthenticated input, and a stale mDNS cache after a rotation looks the same.
    AnomalyCode.ADVERT_MISMATCH: Severity.WARNING,
    AnomalyCode.CLONED_KEY: Severity.CRITICAL,
    # Most often a reinstall; occasionally a lure.
    AnomalyCode.NEW_DEVICE_SAME_NAME: Severity.INFO,
}

_NEVER = float("-inf")  # the time of an event that never happened

DEFAULT_BLOCK_ON = frozenset({AnomalyCode.REPEATED_KEY_CHANGE, AnomalyCode.CLONED_KEY})

EvidenceValue = str | int | float | tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AnomalyConfig:
    """Rule thresholds and the codes that block a device; validated on construction.

    :raises ConfigError: a threshold below 2, a non-positive window, or an unknown code.
    """

    repeated_key_change_threshold: int = 3
    window_seconds: float = 24 * 3600.0
    block_on: frozenset[str] = DEFAULT_BLOCK_ON

    def __post_init__(self) -> None:
        if self.repeated_key_change_threshold < 2:
            # One key change is what a reinstall looks like; it already has its own trust level.
            raise ConfigError("repeated_key_change_threshold must be at least 2")
        if not self.window_seconds > 0:
            raise ConfigError("the anomaly window must be positive")
        unknown = sorted(set(self.block_on) - set(AnomalyCode))
        if unknown:
            valid = ", ".join(c.value for c in AnomalyCode)
            raise ConfigError(f"unknown anomaly code(s) in block_on: {', '.join(unknown)}; valid: {valid}")


@dataclass(frozen=True, slots=True)
class Anomaly:
    """One finding about one device; `first_seen`/`last_seen` span its evidence (Unix seconds)."""

    code: AnomalyCode
    severity: Severity
    device_id: str
    evidence: tuple[tuple[str, EvidenceValue], ...]
    summary: str
    first_seen: float
    last_seen: float

    def to_json(self) -> dict[str, object]:
        """A JSON-able dict for `anomalies --json` and the control socket."""
        return {
            "code": self.code.value,
            "severity": self.severity.value,
            "device_id": self.device_id,
            "summary": self.summary,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "evidence": {k: list(v) if isinstance(v, tuple) else v for k, v in self.evidence},
        }

    def event_detail(self) -> str:
        """The `detail` of the ANOMALY event that records this anomaly: `code: summary`."""
        return f"{self.code.value}: {self.summary}"


# -- observations ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LiveConnection:
    """An authenticated connection open now: `fingerprint` was proven in its handshake."""

    device_id: str
    fingerprint: str
    address: str
    since: float


@dataclass(frozen=True, slots=True)
class AdvertObservation:
    """An mDNS record for `device_id` said `advertised_fp`; a handshake by that id proved `proven_fp`."""

    device_id: str
    advertised_fp: str
    proven_fp: str
    address: str
    time: float


@dataclass(frozen=True, slots=True)
class NameSighting:
    """A device id showed the display name `name` (mDNS record or refused handshake) at `time`."""

    device_id: str
    name: str
    address: str
    time: float


Observation = AdvertObservation | NameSighting


# -- evaluation -----------------------------------------------------------------------------------


def evaluate(
    events: Sequence[TrustEvent],
    records: Sequence[DeviceRecord],
    live: Sequence[LiveConnection],
    observations: Sequence[Observation],
    config: AnomalyConfig,
    now: float,
) -> list[Anomaly]:
    """Every anomaly not acknowledged, one per (code, device), sorted by device id then code."""
    names = {r.device_id: r.name for r in records}
    found = [
        *repeated_key_change(events, config, now, names),
        *key_flip_flop(events, names),
        *advert_mismatch([o for o in observations if isinstance(o, AdvertObservation)], names),
        *cloned_key(records, live, events, now),
        *new_device_same_name(records, [o for o in observations if isinstance(o, NameSighting)]),
    ]
    return acknowledged(_dedupe(found), events)


def should_block(anomaly: Anomaly, config: AnomalyConfig) -> bool:
    """True if policy says this anomaly's device must be revoked."""
    return anomaly.code in config.block_on


def to_block(anomalies: Iterable[Anomaly], events: Sequence[TrustEvent], config: AnomalyConfig) -> list[str]:
    """Device ids to revoke now: blocking anomalies with evidence newer than the last decision on them.

    A decision is a revoke (already blocked), or a person's retrust, verify, accept or clear; without
    this rule a `trust retrust` would be undone by the very evidence the person just overrode.
    """
    decided = _latest(events, _DECISIONS)
    out = {a.device_id for a in anomalies if should_block(a, config) and a.last_seen > decided.get(a.device_id, _NEVER)}
    return sorted(out)


def unreported(anomalies: Iterable[Anomaly], events: Sequence[TrustEvent]) -> list[Anomaly]:
    """Anomalies with evidence newer than the last ANOMALY event logged for their device and code."""
    logged: dict[tuple[str, str], float] = {}
    for ev in events:
        if ev.kind is EventKind.ANOMALY:
            key = (ev.device_id, ev.detail.partition(":")[0].strip())
            logged[key] = max(logged.get(key, ev.time), ev.time)
    return [a for a in anomalies if a.last_seen > logged.get((a.device_id, a.code.value), _NEVER)]


def acknowledged(anomalies: Iterable[Anomaly], events: Sequence[TrustEvent]) -> list[Anomaly]:
    """Drop anomalies whose evidence is all at or before an ANOMALY_CLEARED event covering them."""
    cleared_all: dict[str, float] = {}
    cleared_code: dict[tuple[str, str], float] = {}
    for ev in events:
        if ev.kind is not EventKind.ANOMALY_CLEARED:
            continue
        code = ev.detail.strip()
        if code in set(AnomalyCode):
            cleared_code[(ev.device_id, code)] = max(cleared_code.get((ev.device_id, code), ev.time), ev.time)
        else:
            cleared_all[ev.device_id] = max(cleared_all.get(ev.device_id, ev.time), ev.time)
    out = []
    for a in anomalies:
        cleared = max(cleared_all.get(a.device_id, _NEVER), cleared_code.get((a.device_id, a.code.value), _NEVER))
        if a.last_seen > cleared:
            out.append(a)
    return out


_DECISIONS = frozenset(
    {
        EventKind.REVOKED,
        EventKind.RETRUSTED,
        EventKind.VERIFIED,
        EventKind.ACCEPTED,
        EventKind.ANOMALY_CLEARED,
    }
)

# Events whose `fingerprint` is a key the device proved or was pinned to at that moment.
_KEY_EVENTS = frozenset(
    {
        EventKind.FIRST_USE,
        EventKind.MATCH,
        EventKind.KEY_CHANGED,
        EventKind.REFUSED,  # a device in key_changed that shows its old key again is refused
        EventKind.RETRUSTED,
        EventKind.ROTATED,
        EventKind.VERIFIED,
        EventKind.ADDED,
        EventKind.ACCEPTED,
    }
)


def _latest(events: Iterable[TrustEvent], kinds: frozenset[EventKind]) -> dict[str, float]:
    out: dict[str, float] = {}
    for ev in events:
        if ev.kind in kinds:
            out[ev.device_id] = max(out.get(ev.device_id, ev.time), ev.time)
    return out


def _who(device_id: str, names: Mapping[str, str]) -> str:
    name = names.get(device_id)
    return f"{name!r} ({device_id[:8]})" if name else f"device {device_id[:8]}"


def _short(fp: str) -> str:
    return fp[:16]


def _make(
    code: AnomalyCode,
    device_id: str,
    evidence: Sequence[tuple[str, EvidenceValue]],
    summary: str,
    first_seen: float,
    last_seen: float,
) -> Anomaly:
    return Anomaly(code, SEVERITY[code], device_id, tuple(evidence), summary, first_seen, last_seen)


def _dedupe(found: Iterable[Anomaly]) -> list[Anomaly]:
    # Rules already aggregate per device; this merge only guards the output contract.
    merged: dict[tuple[str, AnomalyCode], Anomaly] = {}
    for a in found:
        key = (a.device_id, a.code)
        prev = merged.get(key)
        if prev is None:
            merged[key] = a
            continue
        keys = {k for k, _ in prev.evidence}
        merged[key] = Anomaly(
            a.code,
            max(prev.severity, a.severity, key=lambda s: s.rank),
            a.device_id,
            prev.evidence + tuple((k, v) for k, v in a.evidence if k not in keys),
            prev.summary,
            min(prev.first_seen, a.first_seen),
            max(prev.last_seen, a.last_seen),
        )
    return [merged[k] for k in sorted(merged)]


# -- rules ----------------------------------------------------------------------------------------


def repeated_key_change(
    events: Sequence[TrustEvent], config: AnomalyConfig, now: float, names: Mapping[str, str] | None = None
) -> list[Anomaly]:
    """Devices that offered >= threshold distinct keys in KEY_CHANGED events at or after `now - window`."""
    # Events after `now` still count: a clock stepping back must not hide evidence.
    since = now - config.window_seconds
    offered: dict[str, dict[str, float]] = defaultdict(dict)  # device -> fingerprint -> first time
    times: dict[str, list[float]] = defaultdict(list)
    for ev in sorted(events, key=lambda e: e.seq):
        if ev.kind is EventKind.KEY_CHANGED and ev.fingerprint and ev.time >= since:
            offered[ev.device_id].setdefault(ev.fingerprint, ev.time)
            times[ev.device_id].append(ev.time)
    out = []
    for device_id, fps in offered.items():
        n = len(fps)
        if n < config.repeated_key_change_threshold:
            continue
        hours = config.window_seconds / 3600
        out.append(
            _make(
                AnomalyCode.REPEATED_KEY_CHANGE,
                device_id,
                [
                    ("fingerprints", tuple(fps)),
                    ("count", n),
                    ("threshold", config.repeated_key_change_threshold),
                    ("window_seconds", config.window_seconds),
                ],
                f"{_who(device_id, names or {})} offered {n} different keys within {hours:g} h; "
                "someone may be impersonating it",
                min(times[device_id]),
                max(times[device_id]),
            )
        )
    return out


def key_flip_flop(events: Sequence[TrustEvent], names: Mapping[str, str] | None = None) -> list[Anomaly]:
    """Devices that came back with a key they held before a change to another key."""
    current: dict[str, str] = {}
    before: dict[str, set[str]] = defaultdict(set)
    order: dict[str, list[str]] = defaultdict(list)
    flips: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for ev in sorted(events, key=lambda e: e.seq):
        fp = ev.fingerprint
        if ev.kind not in _KEY_EVENTS or not fp:
            continue
        dev = ev.device_id
        if dev not in current and ev.old_fingerprint:
            # A log that starts mid-history still knows the key pinned before this event.
            current[dev] = ev.old_fingerprint
            order[dev].append(ev.old_fingerprint)
        cur = current.get(dev)
        if cur == fp:
            continue
        if fp in before[dev]:
            flips[dev].append((ev.time, fp))
        if cur is not None:
            before[dev].add(cur)
        if fp not in order[dev]:
            order[dev].append(fp)
        current[dev] = fp
    out = []
    for dev, fl in flips.items():
        returned = tuple(dict.fromkeys(fp for _, fp in fl))
        out.append(
            _make(
                AnomalyCode.KEY_FLIP_FLOP,
                dev,
                [("returned", returned), ("keys", tuple(order[dev])), ("flips", len(fl))],
                f"{_who(dev, names or {})} switched back to a key it had before a change "
                f"({_short(returned[0])}...); this is how an intermittent man-in-the-middle looks",
                min(t for t, _ in fl),
                max(t for t, _ in fl),
            )
        )
    return out


def advert_mismatch(observations: Sequence[AdvertObservation], names: Mapping[str, str] | None = None) -> list[Anomaly]:
    """Devices whose mDNS record advertised a fingerprint other than the key they proved."""
    bad: dict[str, list[AdvertObservation]] = defaultdict(list)
    for o in observations:
        if o.advertised_fp != o.proven_fp:
            bad[o.device_id].append(o)
    out = []
    for dev, obs in bad.items():
        advertised = tuple(dict.fromkeys(o.advertised_fp for o in obs))
        out.append(
            _make(
                AnomalyCode.ADVERT_MISMATCH,
                dev,
                [
                    ("advertised", advertised),
                    ("proven", tuple(dict.fromkeys(o.proven_fp for o in obs))),
                    ("addresses", tuple(dict.fromkeys(o.address for o in obs))),
                ],
                f"an mDNS record for {_who(dev, names or {})} advertised key {_short(advertised[0])}... "
                "but the device proved another; someone on the network may be spoofing its adverts",
                min(o.time for o in obs),
                max(o.time for o in obs),
            )
        )
    return out


def cloned_key(
    records: Sequence[DeviceRecord], live: Sequence[LiveConnection], events: Sequence[TrustEvent], now: float
) -> list[Anomaly]:
    """Keys proven by two device ids (records or live), or one id live with two keys unlinked by rotation."""
    names = {r.device_id: r.name for r in records}
    others: dict[str, set[str]] = defaultdict(set)  # device -> other device ids sharing a key
    shared: dict[str, set[str]] = defaultdict(set)  # device -> fingerprints involved
    addrs: dict[str, set[str]] = defaultdict(set)
    first: dict[str, float] = {}
    last: dict[str, float] = {}

    def note(dev: str, fps: Iterable[str], other: Iterable[str], t0: float, t1: float) -> None:
        shared[dev].update(fps)
        others[dev].update(o for o in other if o != dev)
        first[dev] = min(first.get(dev, t0), t0)
        last[dev] = max(last.get(dev, t1), t1)

    by_key: dict[str, dict[str, DeviceRecord]] = defaultdict(dict)
    for r in records:
        # A pending key was proven in a handshake too.
        for fp in (r.fingerprint, r.pending_fingerprint):
            if fp:
                by_key[fp][r.device_id] = r
    for fp, holders in by_key.items():
        if len(holders) < 2:
            continue
        # The key became shared when the later device first showed up.
        t0 = max(r.first_seen for r in holders.values())
        t1 = max(r.last_seen for r in holders.values())
        for dev in holders:
            note(dev, [fp], holders, t0, t1)

    live_by_key: dict[str, list[LiveConnection]] = defaultdict(list)
    live_by_dev: dict[str, list[LiveConnection]] = defaultdict(list)
    for c in live:
        live_by_key[c.fingerprint].append(c)
        live_by_dev[c.device_id].append(c)
    for fp, conns in live_by_key.items():
        ids = {c.device_id for c in conns}
        if len(ids) >= 2:
            for c in conns:
                note(c.device_id, [fp], ids, max(x.since for x in conns), now)
                addrs[c.device_id].add(c.address)
    lineage = _rotation_lineage(events)
    for dev, conns in live_by_dev.items():
        # Old and new key of a signed rotation overlap briefly while the agent re-handshakes.
        roots = {lineage.get((dev, c.fingerprint), c.fingerprint) for c in conns}
        if len(roots) >= 2:
            note(dev, [c.fingerprint for c in conns], [], max(c.since for c in conns), now)
            addrs[dev].update(c.address for c in conns)

    out = []
    for dev in shared:
        evidence: list[tuple[str, EvidenceValue]] = [("fingerprints", tuple(sorted(shared[dev])))]
        if others[dev]:
            evidence.append(("other_devices", tuple(sorted(others[dev]))))
            summary = (
                f"{_who(dev, names)} proved a key that {len(others[dev])} other device id(s) also proved; "
                "the private key has been copied"
            )
        else:
            summary = f"{_who(dev, names)} is connected with two different keys at once; one is an impostor"
        if addrs[dev]:
            evidence.append(("addresses", tuple(sorted(addrs[dev]))))
        out.append(_make(AnomalyCode.CLONED_KEY, dev, evidence, summary, first[dev], last[dev]))
    return out


def _rotation_lineage(events: Sequence[TrustEvent]) -> dict[tuple[str, str], str]:
    """Map (device, fingerprint) to a representative of its ROTATED-linked group (union-find)."""
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def find(x: tuple[str, str]) -> tuple[str, str]:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    for ev in events:
        if ev.kind is EventKind.ROTATED and ev.fingerprint and ev.old_fingerprint:
            a, b = find((ev.device_id, ev.old_fingerprint)), find((ev.device_id, ev.fingerprint))
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {x: find(x)[1] for x in parent}


def normalize_name(name: str) -> str:
    """The form names are compared in: whitespace collapsed and trimmed, case-folded."""
    return " ".join(name.split()).casefold()


# Placeholders say nothing about identity.
_NO_NAMES = frozenset({"", "unnamed"})


def new_device_same_name(records: Sequence[DeviceRecord], sightings: Sequence[NameSighting]) -> list[Anomaly]:
    """Device ids that appeared after a known device with the same name (records and unknown-id sightings)."""
    by_name: dict[str, list[DeviceRecord]] = defaultdict(list)
    for r in records:
        if normalize_name(r.name) not in _NO_NAMES:
            by_name[normalize_name(r.name)].append(r)
    out: list[Anomaly] = []
    for group in by_name.values():
        group.sort(key=lambda r: (r.first_seen, r.device_id))
        for i, r in enumerate(group[1:], start=1):
            known = tuple(x.device_id for x in group[:i])
            out.append(_same_name(r.device_id, r.name, known, (), r.first_seen, r.first_seen))
    # An unknown id's sighting is unauthenticated, so it only ever raises an anomaly about that id.
    known_ids = {r.device_id for r in records}
    seen: dict[str, list[NameSighting]] = defaultdict(list)
    for s in sightings:
        if s.device_id not in known_ids and normalize_name(s.name) in by_name:
            seen[s.device_id].append(s)
    for dev, ss in seen.items():
        known = tuple(sorted({r.device_id for s in ss for r in by_name[normalize_name(s.name)]}))
        addresses = tuple(dict.fromkeys(s.address for s in ss))
        t0, t1 = min(s.time for s in ss), max(s.time for s in ss)
        out.append(_same_name(dev, ss[0].name, known, addresses, t0, t1))
    return out


def _same_name(
    dev: str, name: str, known: tuple[str, ...], addresses: tuple[str, ...], t0: float, t1: float
) -> Anomaly:
    evidence: list[tuple[str, EvidenceValue]] = [("name", name), ("known_devices", known)]
    if addresses:
        evidence.append(("addresses", addresses))
    summary = (
        f"new device {dev[:8]} calls itself {name!r} like known device {known[0][:8]}; "
        "a reinstall, or a lure: compare safety numbers before trusting it"
    )
    return _make(AnomalyCode.NEW_DEVICE_SAME_NAME, dev, evidence, summary, t0, t1)
