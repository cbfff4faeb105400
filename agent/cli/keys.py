"""`tofu-agent anomalies [clear DEVICE]` and `tofu-agent rotate-key`."""

from __future__ import annotations

import argparse
import datetime as dt
import time
from typing import TYPE_CHECKING, Any

from agent.app import control
from agent.identity.ids import format_fingerprint
from agent.trust.model import EventKind

if TYPE_CHECKING:
    from agent.cli.context import Ctx

EXIT_OK = 0


def _when(ts: object) -> str:
    if not isinstance(ts, int | float):
        return "?"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def render_anomalies(items: list[dict[str, Any]]) -> str:
    """The human list of anomalies."""
    if not items:
        return "No anomalies."
    lines = []
    for a in items:
        lines.append(
            f"{str(a.get('severity', '?')).upper():<8} {a.get('code')}  device {a.get('device_id')}  "
            f"{_when(a.get('first_seen'))} .. {_when(a.get('last_seen'))}"
        )
        lines.append(f"         {a.get('summary', '')}")
    lines.append("Acknowledge with: tofu-agent anomalies clear DEVICE")
    return "\n".join(lines)


def cmd_anomalies(ctx: Ctx) -> int:
    """List anomalies (from the running agent, else from the trust store), or clear a device's."""
    from agent.trust import guard

    if ctx.args.action == "clear":
        from agent.errors import UserError
        from agent.trust.anomaly import AnomalyCode

        if not ctx.args.device:
            raise UserError("anomalies clear needs a DEVICE (id or unique prefix)")
        if ctx.args.code and ctx.args.code not in set(AnomalyCode):
            raise UserError(f"unknown anomaly code {ctx.args.code!r}; valid: {', '.join(c.value for c in AnomalyCode)}")
        with ctx.store() as store:
            record = store.resolve(ctx.args.device)
            store.record_event(record.device_id, EventKind.ANOMALY_CLEARED, time.time(), detail=ctx.args.code or "")
        control.notify_trust_changed(ctx.paths.control_socket, record.device_id)
        ctx.out(
            {"device_id": record.device_id, "cleared": ctx.args.code or "all"},
            f"cleared anomalies of {record.name} ({record.device_id}); new evidence raises them again",
        )
        return EXIT_OK
    try:
        items: list[dict[str, Any]] = control.request(ctx.paths.control_socket, "anomalies", timeout=5.0)
    except control.AgentNotRunning:
        with ctx.store() as store:
            items = [a.to_json() for a in guard.current(store, ctx.config().anomaly, time.time())]
    ctx.out(items, render_anomalies(items))
    return EXIT_OK


def cmd_rotate_key(ctx: Ctx) -> int:
    """Rotate this device's key: through the running agent if there is one, else on disk."""
    from agent.identity import keys as identity

    try:
        result: dict[str, Any] = control.request(ctx.paths.control_socket, "rotate_key", timeout=30.0)
    except control.AgentNotRunning:
        current = ctx.identity()
        new = identity.rotate(ctx.paths, current, dt.datetime.now(dt.UTC))
        result = {
            "old_fingerprint": current.fingerprint,
            "fingerprint": new.fingerprint,
            "statements": len(identity.load_rotations(ctx.paths)),
        }
    ctx.out(
        result,
        f"new key {format_fingerprint(result['fingerprint'])}\n"
        f"old key {format_fingerprint(result['old_fingerprint'])} signed the change; "
        "peers that pinned the old key move to the new one when they next connect.",
    )
    return EXIT_OK


def register(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    """Add `anomalies` and `rotate-key` to the `tofu-agent` parser."""
    an = sub.add_parser("anomalies", parents=[common], help="suspicious key changes and adverts")
    an.add_argument("action", nargs="?", choices=["clear"], help="acknowledge a device's anomalies")
    an.add_argument("device", nargs="?", metavar="DEVICE")
    an.add_argument("--code", default=None, help="clear only this anomaly code")
    an.set_defaults(func=cmd_anomalies)
    rk = sub.add_parser("rotate-key", parents=[common], help="new key, signed by the old one; pairings survive")
    rk.set_defaults(func=cmd_rotate_key)
