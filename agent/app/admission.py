"""Whether an authenticated peer may stay: the trust decision, the refusal it earns, and duplicates.

`Agent.authenticated` (the link hook) gathers what the event loop owns and calls `decide` in a
worker thread: the rotation chain, the trust level and the anomaly rules in one store
transaction (`TrustStore.handshake`, the one decision point). A refusal carries its reason code
to the peer and, for a person, a log line saying which command admits the device. At most one
link per device survives: the one dialled by the lower device id, on both sides alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.errors import ErrorCode
from agent.identity import rotation
from agent.identity.keys import format_fingerprint
from agent.net.link import PeerLink
from agent.trust import guard
from agent.trust.anomaly import AnomalyConfig, LiveConnection, NameSighting, Observation
from agent.trust.model import Decision, DeviceRecord, EventKind, TrustLevel
from agent.trust.store import TrustStore
from agent.wire.handshake import PeerAuthenticated, Role

# The logger these lines had before they left agent/app/daemon.py: journal filters keep working.
log = logging.getLogger("agent.app.daemon")

_REFUSAL = {
    TrustLevel.KEY_CHANGED: ErrorCode.KEY_CHANGED,
    TrustLevel.REVOKED: ErrorCode.REVOKED,
    TrustLevel.PENDING: ErrorCode.PENDING,
}


def refusal_code(level: TrustLevel) -> ErrorCode:
    """The code a device at trust `level` is refused (or dropped) with."""
    return _REFUSAL.get(level, ErrorCode.NOT_TRUSTED)


def refusal_reason(code: ErrorCode) -> str:
    """What the refused peer is told, in words, beside `code`."""
    return {
        ErrorCode.KEY_CHANGED: "your key differs from the one pinned for your device id",
        ErrorCode.REVOKED: "your device is revoked here",
        ErrorCode.PENDING: "your device waits for approval here",
        ErrorCode.NOT_TRUSTED: "your device is not trusted here",
    }.get(code, code.value)


def decide(
    store: TrustStore,
    anomaly: AnomalyConfig,
    peer: PeerAuthenticated,
    address: str,
    now: float,
    live: list[LiveConnection],
    observations: list[Observation],
    window_open: bool = False,
    window_reason: str = "",
) -> tuple[Decision, bool, NameSighting | None]:
    """In a worker thread: one trust decision (rotation chain, level, anomaly rules) in one transaction.

    Returns the decision, whether the rules just blocked the device, and the name sighting a
    new device makes (for the loop to keep).
    """
    record = store.get(peer.device_id)
    sighting = NameSighting(peer.device_id, peer.name, address, now) if record is None else None
    if sighting is not None:
        observations = [*observations, sighting]
    chains: list[rotation.ChainResult] = []

    def follow(pinned: str) -> tuple[str, ...]:
        # Asked inside the store's transaction, from the pin it read there.
        chain = rotation.follow_chain(pinned, peer.device_id, peer.fingerprint, peer.rotations)
        chains.append(chain)
        return chain.path if chain.ok else ()

    review = guard.reviewer(anomaly, now, live, observations)
    outcome = store.handshake(
        peer.device_id, peer.name, peer.fingerprint, now, address, follow=follow, review=review,
        window_open=window_open, window_reason=window_reason,
    )  # fmt: skip
    guard.report(outcome)
    decision = outcome.decision
    assert decision is not None
    if decision.event is EventKind.ROTATED and chains:
        log.info(
            "%s (%s) rotated its key along a signed chain of %d statement(s): pin moved to %s",
            peer.name,
            peer.device_id,
            len(chains[-1].links),
            format_fingerprint(peer.fingerprint),
        )
    return decision, peer.device_id in outcome.blocked, sighting


def keep_new(own_id: str, old: PeerLink, new: PeerLink) -> bool:
    """Both sides agree: keep the link dialled by the lower device id; same dialler: the newer."""
    peer_id = new.device_id or ""

    def dialler(link: PeerLink) -> str:
        return own_id if link.role is Role.CLIENT else peer_id

    if dialler(old) == dialler(new):
        return True
    return dialler(new) < dialler(old)


def log_refusal(record: DeviceRecord, peer: PeerAuthenticated, address: str, cli: Callable[[str, str], str]) -> None:
    """Say why a device was refused, and for a person to act on: the command that admits it."""
    if record.trust is TrustLevel.KEY_CHANGED:
        log.warning(
            "KEY CHANGED for device %s (%s) at %s: expected fingerprint %s, received %s. "
            "The device may have been reinstalled or reset, or someone may be impersonating it. "
            "The connection was refused and the old key is kept. If you know why the key changed, "
            "accept the new key with: %s",
            record.name,
            record.device_id,
            address,
            format_fingerprint(record.fingerprint),
            format_fingerprint(peer.fingerprint),
            cli("trust retrust", record.device_id),
        )
    elif record.trust is TrustLevel.PENDING:
        log.warning(
            "new device %s (%s) at %s waits for approval (fingerprint %s); admit it with: %s",
            record.name,
            record.device_id,
            address,
            format_fingerprint(peer.fingerprint),
            cli("trust accept", record.device_id),
        )
    else:
        log.info(
            "refused %s (%s) at %s: trust is %s",
            record.name,
            record.device_id,
            address,
            record.trust.value,
        )
