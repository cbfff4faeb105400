"""The one trust decision, and the transitions people ask for, as pure functions over records.

Theory of operation: `decide` is what happens when a device *proves* a key in a handshake; it is
the only transition driven by the network, and it only runs after authentication. Everything
else (`verify`, `revoke`, `retrust`, `accept`) is a person's decision. Each function takes the
current record and returns the new record plus the event to log; the store applies both in one
transaction. Nothing here reads a clock or a disk.

    first sight             -> tofu (policy auto) | pending (manual, code); old pin: none
    pinned key, may sync    -> same level (match)
    pinned key, pending     -> pending (refused until `accept`)
    other key, not revoked  -> key_changed, old pin kept, new key stored as pending_fingerprint
    revoked, any key        -> revoked (refused)
    key_changed, other key  -> key_changed (the newest offered key is pending)
    key_changed, pinned key -> the level before the change (a flip back is flagged as an anomaly)
"""

from __future__ import annotations

from dataclasses import replace

from agent.errors import UserError
from agent.trust.model import Decision, DeviceRecord, EventKind, TrustLevel, TrustPolicy

MAX_ADDRESSES = 8


def _seen(record: DeviceRecord, name: str, now: float, address: str | None) -> DeviceRecord:
    addresses = record.addresses
    if address:
        # Most recent first, bounded: a device that roams should not grow the row forever.
        addresses = (address, *(a for a in addresses if a != address))[:MAX_ADDRESSES]
    return replace(record, name=name or record.name, last_seen=max(record.last_seen, now), addresses=addresses)


def decide(
    record: DeviceRecord | None,
    device_id: str,
    name: str,
    fingerprint: str,
    now: float,
    policy: TrustPolicy,
    address: str | None = None,
    restore: TrustLevel = TrustLevel.TOFU,
) -> Decision:
    """Decide the trust level of a device that has just proven `fingerprint`.

    `restore` is the level a `key_changed` device had before the change; it returns to it when
    it proves its pinned key again.
    """
    if record is None or record.trust is TrustLevel.UNKNOWN:
        level = TrustLevel.TOFU if policy is TrustPolicy.AUTO else TrustLevel.PENDING
        notes = "" if level is TrustLevel.TOFU else f"new device waiting for approval ({policy.value} policy)"
        new = DeviceRecord(
            device_id=device_id,
            name=name,
            fingerprint=fingerprint,
            trust=level,
            first_seen=now,
            last_seen=now,
            addresses=(address,) if address else (),
            notes=notes,
        )
        return Decision(level, EventKind.FIRST_USE, new, record)

    seen = _seen(record, name, now, address)
    if record.trust is TrustLevel.REVOKED:
        return Decision(TrustLevel.REVOKED, EventKind.REFUSED, seen, record)
    if record.trust is TrustLevel.KEY_CHANGED:
        if fingerprint != record.fingerprint:
            seen = replace(seen, pending_fingerprint=fingerprint)
            # Another new key (or the same new key again) is still a key change.
            return Decision(TrustLevel.KEY_CHANGED, EventKind.KEY_CHANGED, seen, record)
        # The pinned key is proven again, as OpenSSH accepts the key in known_hosts: whoever
        # offered the other key must not lock the real device out. The offered key is dropped
        # (so `retrust` cannot pin it by mistake); the log keeps it, and the anomaly rules flag
        # the flip (`key_flip_flop`) and repeated attempts (`repeated_key_change`).
        back = replace(seen, trust=restore, pending_fingerprint=None)
        return Decision(restore, EventKind.MATCH, back, record)
    if fingerprint != record.fingerprint:
        changed = replace(seen, trust=TrustLevel.KEY_CHANGED, pending_fingerprint=fingerprint)
        return Decision(TrustLevel.KEY_CHANGED, EventKind.KEY_CHANGED, changed, record)
    if record.trust is TrustLevel.PENDING:
        return Decision(TrustLevel.PENDING, EventKind.REFUSED, seen, record)
    return Decision(record.trust, EventKind.MATCH, seen, record)


def verify(record: DeviceRecord) -> tuple[DeviceRecord, EventKind]:
    """A person confirmed the pinned key out of band: `verified`, any pending key dropped."""
    return replace(record, trust=TrustLevel.VERIFIED, pending_fingerprint=None, notes=""), EventKind.VERIFIED


def revoke(record: DeviceRecord, note: str = "revoked by user") -> tuple[DeviceRecord, EventKind]:
    """Block the device whatever key it shows; the pin is kept for the record."""
    return replace(record, trust=TrustLevel.REVOKED, notes=note), EventKind.REVOKED


def retrust(record: DeviceRecord) -> tuple[DeviceRecord, EventKind]:
    """Pin the key offered after a change (or lift a block): back to `tofu`."""
    if record.pending_fingerprint is not None:
        new = replace(
            record,
            fingerprint=record.pending_fingerprint,
            pending_fingerprint=None,
            trust=TrustLevel.TOFU,
            notes="",
        )
        return new, EventKind.RETRUSTED
    if record.trust in (TrustLevel.REVOKED, TrustLevel.KEY_CHANGED):
        return replace(record, trust=TrustLevel.TOFU, notes=""), EventKind.RETRUSTED
    raise UserError(
        f"device {record.device_id} ({record.name}) has no changed key to trust; its level is {record.trust.value}"
    )


def accept(record: DeviceRecord) -> tuple[DeviceRecord, EventKind]:
    """Admit a device waiting under the manual or code policy."""
    if record.trust is not TrustLevel.PENDING:
        raise UserError(
            f"device {record.device_id} ({record.name}) is not waiting for approval; its level is {record.trust.value}"
        )
    return replace(record, trust=TrustLevel.TOFU, notes=""), EventKind.ACCEPTED
