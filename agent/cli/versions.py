"""`tofu-agent versions [FOLDER] [PATH]` and `restore FOLDER PATH [--at TIME]`: what peers' changes replaced."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import TYPE_CHECKING, Any

from agent.app import control
from agent.errors import UserError

if TYPE_CHECKING:
    from agent.cli.context import Ctx

EXIT_OK = 0


def _when(wall: float) -> str:
    return dt.datetime.fromtimestamp(wall, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _device_names(ctx: Ctx) -> dict[str, str]:
    with ctx.store() as store:
        return {r.device_id: r.name for r in store.all()}


def _by(device_id: str, names: dict[str, str]) -> str:
    if not device_id:
        return "unknown"
    return f"{names[device_id]} ({device_id[:8]})" if device_id in names else device_id[:8]


def parse_time(text: str) -> float:
    """A wall time from `--at`: ISO 8601 (UTC if no zone), e.g. 2026-12-07T10:30 or 2026-12-07."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time (use ISO 8601, e.g. 2026-12-07T10:30): {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def cmd_versions(ctx: Ctx) -> int:
    args = {"folder": ctx.args.folder, "path": ctx.args.path or ""}
    result: dict[str, Any] = control.request(ctx.paths.control_socket, "versions", args, 30.0)
    kept = result["versions"]
    names = _device_names(ctx)
    lines = [
        f"{k['folder']}  {k['name']}  {k['size']:,} bytes  {_when(k['kept_at'])}  replaced by {_by(k['by'], names)}"
        for k in kept
    ]
    text = "\n".join(lines) or "no kept versions"
    if lines:
        text += "\n(restore one with `tofu-agent restore FOLDER PATH [--at TIME]`)"
    ctx.out(result, text)
    return EXIT_OK


def cmd_restore(ctx: Ctx) -> int:
    if not ctx.args.path.strip("/"):
        raise UserError("restore needs the path of a file in the folder")
    args = {"folder": ctx.args.folder, "path": ctx.args.path, "at": ctx.args.at}
    kept: dict[str, Any] = control.request(ctx.paths.control_socket, "restore", args, 60.0)
    when = _when(kept["kept_at"])
    text = f"restored {kept['name']} in {kept['folder']} as it was before {when}; it syncs to the peers now"
    ctx.out(kept, text)
    return EXIT_OK


def register(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    """Add `versions` and `restore` to the `tofu-agent` parser."""
    v = sub.add_parser("versions", parents=[common], help="kept versions of what peers' changes replaced or deleted")
    v.add_argument("folder", nargs="?", metavar="FOLDER", help="a folder id (default: every folder)")
    v.add_argument("path", nargs="?", metavar="PATH", help="a file, or a directory (default: everything)")
    v.set_defaults(func=cmd_versions)
    r = sub.add_parser("restore", parents=[common], help="put a kept version back (it then syncs to the peers)")
    r.add_argument("folder", metavar="FOLDER")
    r.add_argument("path", metavar="PATH")
    r.add_argument("--at", type=parse_time, metavar="TIME", help="the version kept at or before TIME (default: newest)")
    r.set_defaults(func=cmd_restore)
