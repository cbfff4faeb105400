"""`tofu-agent window`, `pending` and `ui`: the pairing window, who is asking to join, the web page."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from agent.app import control
from agent.errors import UserError
from agent.identity.ids import format_fingerprint
from agent.trust import window
from agent.trust.model import TrustLevel

if TYPE_CHECKING:
    from agent.cli.context import Ctx

EXIT_OK = 0


def _duration(text: str) -> float:
    try:
        return window.parse_duration(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _until(view: dict[str, Any]) -> str:
    if not view.get("open"):
        return "the pairing window is closed: new devices wait for approval (`tofu-agent pending`)"
    until = time.strftime("%H:%M", time.localtime(float(view["until"])))
    why = f" ({view['reason']})" if view.get("reason") else ""
    return f"the pairing window is open until {until}{why}: new devices are trusted on first use"


def window_request(ctx: Ctx, action: str, seconds: float | None = None) -> int:
    """Ask the running agent to open, close or show its pairing window."""
    args: dict[str, Any] = {"action": action}
    if seconds is not None:
        args["seconds"] = seconds
    try:
        view = control.request(ctx.paths.control_socket, "window", args)
    except control.AgentNotRunning:
        raise UserError(
            "no agent is running: the pairing window belongs to a running agent (`tofu-agent run`)"
        ) from None
    ctx.out(view, _until(view))
    return EXIT_OK


def cmd_window(ctx: Ctx) -> int:
    action: str = ctx.args.window_action or "status"
    seconds = ctx.args.duration if action == "open" else None
    if action == "open" and seconds is None:
        seconds = window.DEFAULT_SECONDS
    return window_request(ctx, action, seconds)


def cmd_pending(ctx: Ctx) -> int:
    """Every device that asked to connect and waits for a person's answer."""
    from agent.cli.context import record_json

    with ctx.store() as store:
        waiting = [r for r in store.all() if r.trust is TrustLevel.PENDING]
    lines = [
        f"{r.name}  {r.device_id}  at {r.addresses[0] if r.addresses else '?'}\n"
        f"    fingerprint {format_fingerprint(r.fingerprint)}\n"
        f"    asked since {time.strftime('%Y-%m-%d %H:%M', time.localtime(r.first_seen))}"
        for r in waiting
    ]
    hint = "accept with `tofu-agent trust accept DEVICE`, or reject with `tofu-agent trust reject DEVICE`"
    text = "\n".join(lines) + f"\n\n{hint}" if waiting else "no device is waiting for approval"
    ctx.out([record_json(r) for r in waiting], text)
    return EXIT_OK


def cmd_ui(ctx: Ctx) -> int:
    """Print (and, on a desktop, open) a one-time login address for the running agent's web page."""
    import os

    nxt = f"/device/{ctx.args.device}" if ctx.args.device else None
    try:
        answer = control.request(ctx.paths.control_socket, "ui", {"next": nxt} if nxt else {})
    except control.AgentNotRunning:
        raise UserError("no agent is running: the web page is served by `tofu-agent run`") from None
    url = str(answer["url"])
    opened = False
    if not ctx.args.no_open and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        import webbrowser

        opened = webbrowser.open(url)
    note = "opened in your browser; " if opened else ""
    ctx.out(
        {"url": url, "opened": opened},
        f"{url}\n({note}the address works once, within 2 minutes, on this machine only)",
    )
    return EXIT_OK


def register(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    """Add `window` and `pending` to the `tofu-agent` parser."""
    w = sub.add_parser("window", parents=[common], help="open, close or show the pairing window")
    w.add_argument("window_action", nargs="?", choices=["open", "close", "status"], metavar="open|close|status")
    w.add_argument("duration", nargs="?", type=_duration, metavar="DURATION", help="with open: 10m (default), 1h ...")
    w.set_defaults(func=cmd_window)
    p = sub.add_parser("pending", parents=[common], help="devices waiting for approval")
    p.set_defaults(func=cmd_pending)
    u = sub.add_parser("ui", parents=[common], help="log in to the Trusted Devices web page")
    u.add_argument("--device", metavar="DEVICE", help="open this device's page")
    u.add_argument("--no-open", action="store_true", help="only print the login address")
    u.set_defaults(func=cmd_ui)
