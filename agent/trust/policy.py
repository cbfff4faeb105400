"""The one trust decision, and the transitions people ask for, as pure functions over records.

Theory of operation: `decide` is what happens when a device *proves* a key in a handshake; it is
one of two transitions driven by the network, and it only runs after authentication (following a
signed rotation chain is part of it); the other is a signed introduction from a device a person
marked as an introducer (`agent.trust.introduction`). Everything else (`verify`, `revoke`,
`retrust`, `accept`, `add`, `forget`, `import_record`, `set_introducer`, a pairing's `verify`, an
anomaly's `revoke`) is a person's or the anomaly policy's decision. Each function takes the
current record and returns the new record plus the event to log; the store applies both in one
transaction. Nothing here reads a clock or a
disk: what the log says (`restore_level`, `repeats_refusal`) is computed from events the store
read once, in the same transaction.

    first sight             -> tofu (policy auto, or window while it is open) | pending (window
                               closed, manual, code): the key is pinned either way
    pinned key, may sync    -> same level (match)
    pinned key, pending     -> pending (refused until `accept`)
    other key, not revoked  -> key_changed, old pin kept, new key stored as pending_fingerprint
    revoked, any key        -> revoked (refused)
    key_changed, other key  -> key_changed (the newest offered key is pending)
    key_changed, pinned key -> the level before the change (a flip back is flagged as an anomaly)
    other key, may sync, a signed chain from the pin to it -> same level, pin moved (rotated)

`worth_logging` keeps the log bounded: an ordinary reconnect (a `match` that changes no level)
only moves the row's last_seen; a refusal already logged since the device's last other decision
is not logged again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from agent.errors import UserError
from agent.trust import window
from agent.trust.model import Decision, DeviceRecord, EventKind, TrustEvent, TrustLevel, TrustPolicy

# Given the pinned fingerprint, the path of verified rotation links from it to the proven key
# (pin first, proven key last), or () if there is none. It must be pure (signatures only).
ChainFollower = Callable[[str], Sequence[str]]

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
    follow: ChainFollower | None = None,
    window_open: bool = False,
    window_reason: str = "",
) -> Decision:
    """Decide the trust level of a device that has just proven `fingerprint`.

    `window_open` says whether this machine's pairing window is open (policy `window`): a new device
    is then trusted on first use, and its log entry says it came in through the window. Inside a
    fresh install's window (`window_reason` is `window.FRESH_INSTALL`) it is also marked as an
    introducer: the household's first machines vouch for each other's later admissions.

    `restore` is the level a `key_changed` device had before the change; it returns to it when
    it proves its pinned key again. `follow` finds a signed rotation chain from the pin; it is
    asked only for a device that may sync and proved another key, so the pin it starts from is
    the one in `record` (read in the same transaction as the write).
    """
    if record is None or record.trust is TrustLevel.UNKNOWN:
        via_window = policy is TrustPolicy.WINDOW and window_open
        level = TrustLevel.TOFU if policy is TrustPolicy.AUTO or via_window else TrustLevel.PENDING
        why = "the pairing window is closed" if policy is TrustPolicy.WINDOW else f"{policy.value} policy"
        notes = "" if level is TrustLevel.TOFU else f"new device waiting for approval ({why})"
        introducer = via_window and window_reason == window.FRESH_INSTALL
        new = DeviceRecord(
            device_id=device_id,
            name=name,
            fingerprint=fingerprint,
            trust=level,
            first_seen=now,
            last_seen=now,
            addresses=(address,) if address else (),
            notes=notes,
            introducer=introducer,
        )
        detail = f"name={name}" + (" via=window" if via_window else "") + (" introducer=on" if introducer else "")
        return Decision(level, EventKind.FIRST_USE, new, record, detail=detail)

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
    if fingerprint != record.fingerprint and record.trust.may_sync and follow is not None:
        path = tuple(follow(record.fingerprint))
        if len(path) >= 2 and path[0] == record.fingerprint and path[-1] == fingerprint:
            moved = replace(seen, fingerprint=fingerprint, pending_fingerprint=None)
            detail = " -> ".join(fp[:16] for fp in path)
            return Decision(record.trust, EventKind.ROTATED, moved, record, detail=detail)
    if fingerprint != record.fingerprint:
        changed = replace(seen, trust=TrustLevel.KEY_CHANGED, pending_fingerprint=fingerprint)
        return Decision(TrustLevel.KEY_CHANGED, EventKind.KEY_CHANGED, changed, record)
    if record.trust is TrustLevel.PENDING:
        return Decision(TrustLevel.PENDING, EventKind.REFUSED, seen, record)
    return Decision(record.trust, EventKind.MATCH, seen, record)


def verify(record: DeviceRecord, fingerprint: str | None = None) -> tuple[DeviceRecord, EventKind]:
    """A person confirmed a key out of band: `verified`, any pending key dropped.

    `fingerprint` is the key the person compared (default: the pin); it may only be the pin or the
    key offered after a change, which it then pins.

    :raises UserError: `fingerprint` is neither the pin nor the offered key.
    """
    if fingerprint is None or fingerprint == record.fingerprint:
        return replace(record, trust=TrustLevel.VERIFIED, pending_fingerprint=None, notes=""), EventKind.VERIFIED
    if fingerprint != record.pending_fingerprint:
        raise UserError(f"{record.name}'s key changed while you compared; run `tofu-agent verify` again")
    new = replace(record, fingerprint=fingerprint, pending_fingerprint=None, trust=TrustLevel.VERIFIED, notes="")
    return new, EventKind.VERIFIED


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


def add(
    existing: DeviceRecord | None, device_id: str, name: str, fingerprint: str, now: float
) -> tuple[DeviceRecord, EventKind]:
    """Pre-pin a device as `verified` (a scanned URI, a pairing of a new device).

    :raises UserError: the device is already pinned to another key.
    """
    if existing is not None and existing.fingerprint != fingerprint:
        raise UserError(
            f"device {device_id} is already pinned to another key; if the new one is right, "
            f"run `tofu-agent trust forget {device_id}` first"
        )
    record = existing or DeviceRecord(device_id, name, fingerprint, TrustLevel.VERIFIED, now, now)
    return replace(record, trust=TrustLevel.VERIFIED, pending_fingerprint=None, notes=""), EventKind.ADDED


def pairing_conflict(record: DeviceRecord | None, fingerprint: str) -> str | None:
    """Why a device that proved `fingerprint` may not be paired here, or None if it may."""
    if record is None or record.trust is TrustLevel.UNKNOWN:
        return None
    if record.fingerprint != fingerprint:
        offered = " (it is the new key it offered)" if record.pending_fingerprint == fingerprint else ""
        return (
            f"{record.name} ({record.device_id}) is pinned to another key here{offered}; pairing never "
            f"replaces a pin: if the new key is right, run `tofu-agent trust retrust {record.device_id}` "
            f"or `tofu-agent trust forget {record.device_id}` on this machine, then pair again"
        )
    if record.trust is TrustLevel.REVOKED:
        return (
            f"{record.name} ({record.device_id}) is revoked here; lift that first with "
            f"`tofu-agent trust retrust {record.device_id}`, then pair again"
        )
    return None


def pair(
    existing: DeviceRecord | None, device_id: str, name: str, fingerprint: str, now: float
) -> tuple[DeviceRecord, EventKind]:
    """A device proved `fingerprint` in a pairing: a new one is added, a known one verified.

    :raises UserError: it is pinned to another key or revoked here (see `pairing_conflict`).
    """
    reason = pairing_conflict(existing, fingerprint)
    if reason is not None:
        raise UserError(reason)
    if existing is None or existing.trust is TrustLevel.UNKNOWN:
        record, kind = add(None, device_id, name, fingerprint, now)
    else:
        record, kind = verify(existing)
    return replace(record, introducer=True), kind  # a code pairing makes an introducer (both sides)


def set_introducer(record: DeviceRecord, on: bool) -> tuple[DeviceRecord, EventKind]:
    """A person marks (or unmarks) the device as an introducer; its level is untouched.

    Unmarking it does not touch the devices it introduced: `trust log` shows who introduced whom.
    """
    return replace(record, introducer=on), EventKind.INTRODUCER_ON if on else EventKind.INTRODUCER_OFF


def forget(record: DeviceRecord) -> tuple[None, EventKind]:
    """Delete the record: the device is a stranger on next contact (the log keeps its history)."""
    return None, EventKind.FORGOTTEN


# An import may raise a known key to these levels, never lower it.
_IMPORT_RANK = {TrustLevel.REVOKED: 3, TrustLevel.VERIFIED: 2}


def import_record(existing: DeviceRecord | None, record: DeviceRecord) -> tuple[DeviceRecord | None, str]:
    """Merge one exported record: the record to store (None: nothing changes) and the outcome.

    A pin is never replaced by an import (`conflict`); a known key may be raised to `verified` or
    `revoked`, never lowered (`kept`).
    """
    if existing is None:
        return replace(record, pending_fingerprint=None), "added"
    if existing.fingerprint != record.fingerprint:
        return None, "conflict"
    if _IMPORT_RANK.get(record.trust, 0) > _IMPORT_RANK.get(existing.trust, 0):
        pending = None if record.trust is TrustLevel.VERIFIED else existing.pending_fingerprint
        return replace(existing, trust=record.trust, pending_fingerprint=pending), "updated"
    return None, "kept"


# -- what the log says, and what it needs -----------------------------------------------------------


def restore_level(events: Iterable[TrustEvent], device_id: str) -> TrustLevel:
    """The device's last level that allowed sync, from the log (`tofu` if none is recorded)."""
    best: TrustEvent | None = None
    for ev in events:
        if ev.device_id == device_id and ev.trust_after in (TrustLevel.TOFU, TrustLevel.VERIFIED):
            if best is None or ev.seq > best.seq:
                best = ev
    return best.trust_after if best is not None and best.trust_after is not None else TrustLevel.TOFU


_NOT_DECISIONS = frozenset({EventKind.REFUSED, EventKind.KEY_CHANGED, EventKind.ANOMALY})


def repeats_refusal(events: Iterable[TrustEvent], device_id: str, kind: EventKind, fingerprint: str) -> bool:
    """True if this refusal was already logged since the device's last other decision.

    A refused peer retries, and an impersonator may alternate keys: one entry per distinct
    (kind, key) keeps the log bounded and readable, while every distinct key still counts for
    the anomaly rules. The row's last_seen still moves.
    """
    if kind not in (EventKind.REFUSED, EventKind.KEY_CHANGED):
        return False
    mine = sorted((ev for ev in events if ev.device_id == device_id), key=lambda ev: ev.seq, reverse=True)
    for ev in mine:
        if ev.kind not in _NOT_DECISIONS:
            return False
        if ev.kind is kind and ev.fingerprint == fingerprint:
            return True
    return False


def worth_logging(decision: Decision, fingerprint: str, events: Iterable[TrustEvent]) -> bool:
    """Whether a handshake's decision (on a proven `fingerprint`) gets a log entry (the row is written either way).

    An ordinary reconnect (a `match` at an unchanged level with the pinned key) moves only the
    row's last_seen, names and addresses: logging it would grow the log, and every handshake's
    cost, with every reconnect. A `match` that changes the level (a `key_changed` device proving
    its pinned key again) is logged: `key_flip_flop` and `restore_level` read it.
    """
    previous = decision.previous
    if decision.event is EventKind.MATCH:
        return previous is None or previous.trust is not decision.level
    return not repeats_refusal(events, decision.record.device_id, decision.event, fingerprint)
