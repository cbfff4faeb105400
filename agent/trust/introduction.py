"""Household introductions: a device we trust as an introducer vouches for a device it admitted.

Theory of operation (Syncthing's "introducer", with a signature). When a person admits a device on
machine I (accept, pair, verify, or inside a pairing window), I sends each connected peer that
trusts I as an introducer an INTRODUCE message: "device D, named N, holds the key F", signed by I's
key. The receiver checks the signature against the key I proved in this connection's handshake,
and applies `introduce`: an unknown D is pinned as `tofu` (logged `first_use`, "via=introduced by
I"), a pending D is admitted, and a D pinned to another key is a key change like any other: an
introduction never moves a pin, never lifts a revocation and never downgrades a level.

Pure: no disk, no clock; the time in a statement is the signer's and proves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, Self

from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.crypto import length_prefixed, verify_signature
from agent.identity.ids import MAX_NAME_LEN, is_device_id, is_fingerprint
from agent.trust.model import DeviceRecord, EventKind, TrustLevel
from agent.wire.messages import WireMessage, check, field_bytes, field_int, field_str, register

LABEL = b"tofu-agent/v1/introduce"
MAX_SIGNATURE = 80
MAX_TIME = 2**63 - 1


def signed_bytes(introducer: str, device_id: str, name: str, fingerprint: str, time: int) -> bytes:
    """Label and fields, each prefixed by its 2-byte length, so no two statements share bytes."""
    return length_prefixed(
        LABEL,
        introducer.encode("ascii"),
        device_id.encode("ascii"),
        name.encode("utf-8"),
        fingerprint.encode("ascii"),
        time.to_bytes(8, "big"),
    )


@register("introduce")
@dataclass(frozen=True, slots=True)
class Introduce(WireMessage):
    """`introducer` vouches that `device_id` (named `name`) holds the key `fingerprint`."""

    introducer: str
    device_id: str
    name: str
    fingerprint: str
    time: int
    signature: bytes

    def __post_init__(self) -> None:
        check(is_device_id(self.introducer) and is_device_id(self.device_id), "introduce: not a device id")
        check(self.introducer != self.device_id, "introduce: a device cannot introduce itself")
        check(is_fingerprint(self.fingerprint), "introduce: not a fingerprint")
        check(0 < len(self.name) <= MAX_NAME_LEN and self.name.isprintable(), "introduce: not a display name")
        check(0 <= self.time <= MAX_TIME, "introduce: time out of range")
        check(0 < len(self.signature) <= MAX_SIGNATURE, "introduce: signature must be 1-80 bytes")

    def signed_bytes(self) -> bytes:
        """The exact bytes the introducer signs."""
        return signed_bytes(self.introducer, self.device_id, self.name, self.fingerprint, self.time)

    def verify(self, introducer_key: ec.EllipticCurvePublicKey) -> bool:
        """True if the introducer's key signed this statement."""
        return verify_signature(introducer_key, self.signature, self.signed_bytes())

    def to_fields(self) -> dict[str, object]:
        return {
            "introducer": self.introducer,
            "device_id": self.device_id,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "time": self.time,
            "signature": self.signature,
        }

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> Self:
        return cls(
            introducer=field_str(fields, "introducer", max_len=64),
            device_id=field_str(fields, "device_id", max_len=64),
            name=field_str(fields, "name", max_len=4 * MAX_NAME_LEN),
            fingerprint=field_str(fields, "fingerprint", max_len=64),
            time=field_int(fields, "time", max_value=MAX_TIME),
            signature=field_bytes(fields, "signature", max_len=MAX_SIGNATURE),
        )


class Signer(Protocol):
    """What signs an introduction: this device's identity (agent.identity.Identity fits)."""

    @property
    def device_id(self) -> str: ...
    def sign(self, data: bytes) -> bytes: ...


def make(signer: Signer, device_id: str, name: str, fingerprint: str, time: int) -> Introduce:
    """An introduction of `device_id` signed by `signer`.

    :raises LocalProtocolError: the fields cannot form an introduction.
    """
    draft = Introduce(signer.device_id, device_id, name, fingerprint, time, b"\x00")
    return replace(draft, signature=signer.sign(draft.signed_bytes()))


@dataclass(frozen=True, slots=True)
class Introduced:
    """What an introduction changes: the new record and the event to log with it."""

    record: DeviceRecord
    event: EventKind
    detail: str


def introduce(existing: DeviceRecord | None, intro: Introduce, introducer_name: str, now: float) -> Introduced | None:
    """Apply an introduction from a device we trust as an introducer; None if it changes nothing.

    The caller has checked that the sender is the introducer, may sync, is marked as an introducer
    here, and signed `intro` with the key it proved in this connection.
    """
    via = f"via=introduced by {introducer_name} ({intro.introducer[:8]})"
    if existing is None or existing.trust is TrustLevel.UNKNOWN:
        record = DeviceRecord(intro.device_id, intro.name, intro.fingerprint, TrustLevel.TOFU, now, now, notes=via)
        return Introduced(record, EventKind.FIRST_USE, via)
    if existing.trust is TrustLevel.REVOKED:
        return None  # a person's block stands whoever vouches
    if existing.fingerprint != intro.fingerprint:
        if existing.pending_fingerprint == intro.fingerprint and existing.trust is TrustLevel.KEY_CHANGED:
            return None  # already flagged with this very key
        changed = replace(existing, trust=TrustLevel.KEY_CHANGED, pending_fingerprint=intro.fingerprint)
        return Introduced(changed, EventKind.KEY_CHANGED, f"{via} names another key than the pinned one")
    if existing.trust is TrustLevel.PENDING:
        return Introduced(replace(existing, trust=TrustLevel.TOFU, notes=via), EventKind.ACCEPTED, via)
    return None  # already trusted with this key (or waiting on a key change): nothing to do
