"""Apply the anomaly rules to the trust store: log new anomalies, block devices policy names.

`agent.trust.anomaly` decides what is anomalous (pure); this module is its disk edge, used by the
daemon after every trust decision and by the CLI when no agent runs. Observation-based anomalies
(mDNS adverts, name sightings) exist only while the agent runs, so once logged as ANOMALY events
they are read back from the log (`recorded`) and stay visible until a person clears them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from agent.trust import anomaly
from agent.trust.anomaly import Anomaly, AnomalyCode, AnomalyConfig, LiveConnection, Observation
from agent.trust.model import AnomalyEntry, DeviceRecord, EventKind, Outcome, Review, Reviewer, TrustEvent
from agent.trust.store import TrustStore

log = logging.getLogger(__name__)


def recorded(events: Sequence[TrustEvent]) -> list[Anomaly]:
    """Anomalies as the event log remembers them (one per device and code), not yet cleared."""
    found: dict[tuple[str, str], Anomaly] = {}
    for ev in sorted(events, key=lambda e: e.seq):
        if ev.kind is not EventKind.ANOMALY:
            continue
        code_text, _, summary = ev.detail.partition(":")
        try:
            code = AnomalyCode(code_text.strip())
        except ValueError:
            continue
        key = (ev.device_id, code.value)
        first = found[key].first_seen if key in found else ev.time
        evidence: list[tuple[str, anomaly.EvidenceValue]] = []
        if ev.fingerprint:
            evidence.append(("fingerprint", ev.fingerprint))
        if ev.old_fingerprint:
            evidence.append(("other_fingerprint", ev.old_fingerprint))
        if ev.address:
            evidence.append(("address", ev.address))
        found[key] = Anomaly(
            code=code,
            severity=anomaly.SEVERITY[code],
            device_id=ev.device_id,
            evidence=tuple(evidence),
            summary=summary.strip() or code.value,
            first_seen=first,
            last_seen=ev.time,
        )
    return anomaly.acknowledged(found.values(), events)


def current(
    store: TrustStore,
    config: AnomalyConfig,
    now: float,
    live: Sequence[LiveConnection] = (),
    observations: Sequence[Observation] = (),
) -> list[Anomaly]:
    """Every anomaly in force: the rules over the log and live state, plus those the log recorded."""
    events = store.events()
    fresh = anomaly.evaluate(events, store.all(), live, observations, config, now)
    seen = {(a.device_id, a.code) for a in fresh}
    merged = fresh + [a for a in recorded(events) if (a.device_id, a.code) not in seen]
    return sorted(merged, key=lambda a: (a.device_id, a.code.value))


def reviewer(
    config: AnomalyConfig,
    now: float,
    live: Sequence[LiveConnection] = (),
    observations: Sequence[Observation] = (),
) -> Reviewer:
    """The rules as the store runs them inside a decision's transaction, over the log it read once.

    Anomalies with evidence newer than their last ANOMALY entry are to be logged; devices whose
    blocking anomalies are newer than the last decision on them (`anomaly.to_block`) are to be
    revoked, through `policy.revoke` in the same transaction.
    """

    def review(events: Sequence[TrustEvent], records: Sequence[DeviceRecord]) -> Review:
        fresh = anomaly.evaluate(events, records, live, observations, config, now)
        entries = []
        for a in anomaly.unreported(fresh, events):
            evidence = dict(a.evidence)
            proven = evidence.get("proven")
            fp = proven[0] if isinstance(proven, tuple) and proven else evidence.get("fingerprint")
            entries.append(AnomalyEntry(a.device_id, a.event_detail(), fp if isinstance(fp, str) else None))
        block = []
        for device_id in anomaly.to_block(fresh, events, config):
            codes = sorted(
                {a.code.value for a in fresh if a.device_id == device_id and anomaly.should_block(a, config)}
            )
            note = f"blocked automatically: {', '.join(codes)}; let it back only with `trust retrust` or `trust verify`"
            block.append((device_id, note))
        return Review(tuple(entries), tuple(block))

    return review


def report(outcome: Outcome) -> None:
    """The warning lines for what a review logged and blocked (after its transaction committed)."""
    names = {r.device_id: r.name for r in outcome.records}
    for entry in outcome.review.anomalies:
        code, _, summary = entry.detail.partition(":")
        severity = anomaly.SEVERITY[AnomalyCode(code)]
        log.warning("ANOMALY %s (%s) for device %s: %s", code, severity.value, entry.device_id, summary.strip())
    for device_id in outcome.blocked:
        note = next((n for d, n in outcome.review.block if d == device_id), "")
        log.warning("BLOCKED device %s (%s): %s", names.get(device_id, ""), device_id, note)


def in_force(
    outcome: Outcome,
    config: AnomalyConfig,
    now: float,
    live: Sequence[LiveConnection] = (),
    observations: Sequence[Observation] = (),
) -> list[Anomaly]:
    """Every anomaly in force after `outcome`, from the log it read (no second read)."""
    fresh = anomaly.evaluate(outcome.events, outcome.records, live, observations, config, now)
    seen = {(a.device_id, a.code) for a in fresh}
    merged = fresh + [a for a in recorded(outcome.events) if (a.device_id, a.code) not in seen]
    return sorted(merged, key=lambda a: (a.device_id, a.code.value))


def apply(
    store: TrustStore,
    config: AnomalyConfig,
    now: float,
    live: Sequence[LiveConnection] = (),
    observations: Sequence[Observation] = (),
) -> tuple[list[Anomaly], list[str]]:
    """Log anomalies not yet logged (with a warning line) and revoke what policy blocks.

    One transaction, one read of the log. Returns the anomalies in force and the device ids
    revoked just now.
    """
    outcome = store.review(reviewer(config, now, live, observations), now)
    report(outcome)
    return in_force(outcome, config, now, live, observations), list(outcome.blocked)
