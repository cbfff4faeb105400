"""Trust levels, device records and trust events: the data the trust store keeps (pure)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum


class TrustLevel(StrEnum):
    """How far a device is trusted; only TOFU and VERIFIED may sync."""

    UNKNOWN = "unknown"
    TOFU = "tofu"
    VERIFIED = "verified"
    KEY_CHANGED = "key_changed"
    REVOKED = "revoked"
    PENDING = "pending"

    @property
    def may_sync(self) -> bool:
        return self in (TrustLevel.TOFU, TrustLevel.VERIFIED)


class TrustPolicy(StrEnum):
    """What happens on first sight of a device: pin it (`auto`), or wait for a person."""

    WINDOW = "window"  # trust on first use only while the pairing window is open, else pending
    AUTO = "auto"  # trust on first use, always (lab networks)
    MANUAL = "manual"  # new devices wait as `pending` until `trust accept`
    CODE = "code"  # new devices are refused; only pairing, `trust add` or `accept` admit them


class EventKind(StrEnum):
    """Every kind of entry in the append-only trust event log."""

    FIRST_USE = "first_use"  # a new device was pinned (tofu) or put in pending
    MATCH = "match"  # a known device showed its pinned key
    KEY_CHANGED = "key_changed"  # a known device showed another key (old and new fingerprints)
    REFUSED = "refused"  # a revoked or pending device tried to connect
    VERIFIED = "verified"  # a person confirmed the key (safety number, QR, pairing)
    REVOKED = "revoked"  # a person or the anomaly policy blocked the device
    RETRUSTED = "retrusted"  # the pending key after a change was pinned
    ACCEPTED = "accepted"  # a pending device was admitted
    FORGOTTEN = "forgotten"  # the device record was deleted
    ADDED = "added"  # pre-pinned from a URI or an import before first contact
    ROTATED = "rotated"  # the pin moved along a valid signed rotation chain
    ANOMALY = "anomaly"  # an anomaly rule fired (detail holds the code)
    ANOMALY_CLEARED = "anomaly_cleared"  # a person acknowledged the anomalies
    INTRODUCER_ON = "introducer_on"  # a person marked the device as an introducer
    INTRODUCER_OFF = "introducer_off"  # a person unmarked it (whom it introduced stays)


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """One row of the trust table."""

    device_id: str
    name: str
    fingerprint: str
    trust: TrustLevel
    first_seen: float
    last_seen: float
    sync_count: int = 0
    addresses: tuple[str, ...] = ()
    notes: str = ""
    pending_fingerprint: str | None = None
    # Its signed introductions of other devices are applied here (household introductions).
    introducer: bool = False


@dataclass(frozen=True, slots=True)
class TrustEvent:
    """One entry of the event log; times are Unix seconds."""

    seq: int
    time: float
    device_id: str
    kind: EventKind
    fingerprint: str | None = None
    old_fingerprint: str | None = None
    address: str | None = None
    detail: str = ""
    trust_after: TrustLevel | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of `verify_device`: the level now in force, and what happened."""

    level: TrustLevel
    event: EventKind
    record: DeviceRecord
    previous: DeviceRecord | None = None
    notes: tuple[str, ...] = field(default=())
    detail: str = ""  # for the log entry (a rotation's path)

    @property
    def may_sync(self) -> bool:
        return self.level.may_sync


@dataclass(frozen=True, slots=True)
class AnomalyEntry:
    """An anomaly to log: `detail` is `code: summary`, `fingerprint` the key it is about."""

    device_id: str
    detail: str
    fingerprint: str | None = None


@dataclass(frozen=True, slots=True)
class Review:
    """What the anomaly rules ask after a decision: entries to log, and devices to block (id, note)."""

    anomalies: tuple[AnomalyEntry, ...] = ()
    block: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Outcome:
    """One transaction's result: the decision (if a handshake), the review, and the log after it.

    `events` is the log as read once in the transaction plus what it appended, oldest first;
    `records` the devices after it.
    """

    decision: Decision | None
    review: Review
    blocked: tuple[str, ...]
    events: tuple[TrustEvent, ...]
    records: tuple[DeviceRecord, ...]


# The anomaly rules as the store runs them, inside a decision's transaction: the log (oldest first)
# and the devices in, what to log and block out. Pure.
Reviewer = Callable[[Sequence[TrustEvent], Sequence[DeviceRecord]], Review]
