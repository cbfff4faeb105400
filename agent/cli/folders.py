"""`tofu-agent folders`, `folder accept|share|unshare|pause|resume|override|revert`, `trust
pause|resume`: which folders sync, with whom, which way, and offers."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.app import control
from agent.app import folders as edit
from agent.config import FolderConfig
from agent.errors import UnknownDeviceError, UserError
from agent.sync.offers import load_offers, offers_path, save_offers

if TYPE_CHECKING:
    from agent.cli.context import Ctx
    from agent.trust.model import DeviceRecord
    from agent.trust.store import TrustStore

EXIT_OK = 0


def _device(store: TrustStore, text: str) -> DeviceRecord:
    """A device by id, unique id prefix, or unique name."""
    try:
        return store.resolve(text)
    except UnknownDeviceError:
        named = [r for r in store.all() if r.name == text]
        if len(named) == 1:
            return named[0]
        if named:
            raise UserError(f"several devices are called {text!r}: name one by its id") from None
        raise


def _offers(ctx: Ctx) -> list[dict[str, Any]]:
    """The folders peers offer: from the running agent, else from its file."""
    try:
        st = control.request(ctx.paths.control_socket, "status", {})
        return list(st.get("offered_folders") or [])
    except control.AgentNotRunning:
        return [o.to_json() for o in load_offers(offers_path(ctx.paths.data_dir))]


def _apply(ctx: Ctx, folder: FolderConfig, done: str, pairs: set[tuple[str, str]] | None = None) -> int:
    """Tell the running agent (if any) and print what happened, and what waits for a restart."""
    try:
        result = control.request(ctx.paths.control_socket, "folders_changed", {})
    except control.AgentNotRunning:
        if pairs:  # no agent holds the offers in memory: drop the accepted ones from the file
            path = offers_path(ctx.paths.data_dir)
            save_offers(path, [o for o in load_offers(path) if (o.folder, o.device_id) not in pairs])
        result = None
    with ctx.store() as store:
        records = store.all()
    text = f"{done}\n  {folder.id}  {folder.path}\n  shared with: {edit.devices_text(folder.devices, records)}"
    restart = [r for r in (result or {}).get("restart", []) if r.get("id") == folder.id]
    if result is None:
        text += "\n(no agent is running: it applies this when it starts)"
    elif restart:
        text += f"\nRESTART NEEDED: {restart[0]['why']} (`systemctl --user restart tofu-agent`, or stop and run again)"
    else:
        text += "\nthe running agent applied it"
    data = {
        "id": folder.id,
        "path": str(folder.path),
        "devices": "household" if folder.devices is None else list(folder.devices),
        "agent": result,
        "restart_needed": bool(restart),
    }
    ctx.out(data, text)
    return EXIT_OK


def cmd_folders(ctx: Ctx) -> int:
    cfg = ctx.config()
    offers = _offers(ctx)
    with ctx.store() as store:
        records = store.all()
    folders = [
        {"id": f.id, "path": str(f.path), "devices": "household" if f.devices is None else list(f.devices)}
        for f in cfg.folders
    ]
    lines = [f"{f.id}  {f.path}\n    shared with: {edit.devices_text(f.devices, records)}" for f in cfg.folders]
    text = "\n".join(lines) or "no folders are configured"
    if offers:
        text += "\n\noffered by peers (accept with `tofu-agent folder accept ID [PATH]`):\n" + "\n".join(
            f"  {o['id']}  from {o['name']} ({str(o['device_id'])[:8]})" for o in offers
        )
    ctx.out({"folders": folders, "offered_folders": offers}, text)
    return EXIT_OK


def cmd_accept(ctx: Ctx) -> int:
    folder_id: str = ctx.args.folder_id
    with ctx.store() as store:
        if ctx.args.device:
            devices = [_device(store, d).device_id for d in ctx.args.device]
        else:
            devices = list(dict.fromkeys(str(o["device_id"]) for o in _offers(ctx) if o["id"] == folder_id))
            if not devices:
                raise UserError(
                    f"no device offers folder {folder_id!r} (see `tofu-agent folders`); "
                    "name the devices to share it with: --device DEVICE"
                )
        for d in devices:
            record = store.get(d)
            if record is None or not record.trust.may_sync:
                raise UserError(f"device {d} is not trusted (tofu or verified): it cannot get a folder")
    path = Path(ctx.args.path).expanduser().absolute() if ctx.args.path else None
    folder = edit.accept(ctx.paths, folder_id, devices, path)
    return _apply(ctx, folder, f"accepted folder {folder_id!r}", {(folder_id, d) for d in devices})


def cmd_share(ctx: Ctx) -> int:
    with ctx.store() as store:
        record = _device(store, ctx.args.device)
    if not record.trust.may_sync:
        raise UserError(f"{record.name} is {record.trust.value}: trust it first (`tofu-agent trust accept`)")
    folder = edit.share(ctx.paths, ctx.args.folder_id, record.device_id)
    done = f"folder {folder.id!r} is shared with {record.name}"
    return _apply(ctx, folder, done, {(folder.id, record.device_id)})


def cmd_unshare(ctx: Ctx) -> int:
    with ctx.store() as store:
        record = _device(store, ctx.args.device)
        records = store.all()
    folder = edit.unshare(ctx.paths, ctx.args.folder_id, record, records)
    return _apply(ctx, folder, f"folder {folder.id!r} is no longer shared with {record.name}")


def cmd_pause(ctx: Ctx) -> int:
    paused = ctx.args.folder_action == "pause"
    folder = edit.set_paused(ctx.paths, ctx.args.folder_id, paused)
    return _apply(ctx, folder, f"folder {folder.id!r} is {'paused: no data moves' if paused else 'syncing again'}")


def cmd_override_revert(ctx: Ctx) -> int:
    action = ctx.args.folder_action
    result = control.request(ctx.paths.control_socket, f"folder_{action}", {"folder": ctx.args.folder_id}, 60.0)
    if action == "override":
        text = f"folder {ctx.args.folder_id!r}: our state now wins on every peer ({result['overridden']} names)"
    else:
        text = f"folder {ctx.args.folder_id!r}: {result['reverted']} local changes undone (kept as versions)"
    ctx.out(result, text)
    return EXIT_OK


def cmd_device_pause(ctx: Ctx) -> int:
    paused = ctx.args.trust_command == "pause"
    with ctx.store() as store:
        record = _device(store, ctx.args.device)
    edit.set_device_paused(ctx.paths, record.device_id, paused)
    try:
        control.request(ctx.paths.control_socket, "folders_changed", {})
        applied = "the running agent applied it"
    except control.AgentNotRunning:
        applied = "(no agent is running: it applies this when it starts)"
    what = "paused: no folder data moves (the connection and trust stay)" if paused else "syncing again"
    text = f"{record.name} ({record.device_id[:8]}) is {what}\n{applied}"
    ctx.out({"device_id": record.device_id, "paused": paused}, text)
    return EXIT_OK


def register(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    """Add `folders` and `folder accept|share|unshare` to the `tofu-agent` parser."""
    p = sub.add_parser("folders", parents=[common], help="configured folders, who gets them, and offers")
    p.set_defaults(func=cmd_folders)
    f = sub.add_parser("folder", parents=[common], help="accept an offered folder, share or unshare one")
    fsub = f.add_subparsers(
        dest="folder_action", required=True, metavar="accept|share|unshare|pause|resume|override|revert"
    )
    a = fsub.add_parser("accept", parents=[common], help="sync a folder a peer offers")
    a.add_argument("folder_id", metavar="ID")
    a.add_argument("path", nargs="?", metavar="PATH", help="where (default ~/TofuSync-ID, or HOME/ID with --home)")
    a.add_argument("--device", action="append", metavar="DEVICE", help="share with it (default: who offers it)")
    a.set_defaults(func=cmd_accept)
    s = fsub.add_parser("share", parents=[common], help="share a folder with one more device")
    s.add_argument("folder_id", metavar="ID")
    s.add_argument("device", metavar="DEVICE")
    s.set_defaults(func=cmd_share)
    u = fsub.add_parser("unshare", parents=[common], help="stop sharing a folder with a device")
    u.add_argument("folder_id", metavar="ID")
    u.add_argument("device", metavar="DEVICE")
    u.set_defaults(func=cmd_unshare)
    for action, text in (("pause", "stop moving data for a folder"), ("resume", "sync a paused folder again")):
        pp = fsub.add_parser(action, parents=[common], help=text)
        pp.add_argument("folder_id", metavar="ID")
        pp.set_defaults(func=cmd_pause)
    for action, text in (
        ("override", "send-only folder: make our state win on every peer"),
        ("revert", "receive-only folder: undo local changes (kept as versions)"),
    ):
        op = fsub.add_parser(action, parents=[common], help=text)
        op.add_argument("folder_id", metavar="ID")
        op.set_defaults(func=cmd_override_revert)
