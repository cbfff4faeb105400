"""The `tofu-agent` command line: argument parsing and output, human or `--json`.

Exit codes: 0 success, 1 a user error (one line on stderr, never a traceback), 3 `status` with no
agent running. Trust changes go to the store (safe beside a running agent) and then, if an agent
runs, to its control socket so it acts on them at once.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from agent import __version__, config
from agent.app import control
from agent.app.report import event_json, rfc3339
from agent.cli.context import (
    EXIT_OK,
    EXIT_USER_ERROR,
    Ctx,
    port_arg,
    record_json,
)
from agent.errors import ConfigError, TofuError, UnknownDeviceError, UserError
from agent.host import logs
from agent.host.paths import resolve_paths, write_private_file
from agent.identity import ids
from agent.trust.model import DeviceRecord, TrustLevel, TrustPolicy
from agent.trust.store import TrustStore

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line and exit code 1."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see `{self.prog} --help`)")


def parse_rfc3339(text: object, what: str) -> float:
    """RFC 3339 to Unix seconds; UserError naming `what` otherwise."""
    if not isinstance(text, str):
        raise UserError(f"{what} must be an RFC 3339 time string")
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"{what} is not an RFC 3339 time: {text!r}") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.timestamp()


def local_time(ts: float | None) -> str:
    """A time for people, in their own zone."""
    if not ts:
        return "never"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


# -- commands ---------------------------------------------------------------------------------


def cmd_id(ctx: Ctx) -> int:
    ident = ctx.identity()
    data = {"device_id": ident.device_id, "name": ident.name, "fingerprint": ident.fingerprint}
    if getattr(ctx.args, "uri", False) or getattr(ctx.args, "qr", False):
        from agent.pairing import safety as verification

        uri = verification.identity_uri(ident.device_id, ident.name, ident.fingerprint)
        data["uri"] = uri
        if ctx.args.qr and not ctx.json:
            print(verification.qr_text(uri))
        ctx.out(data, uri)
        return EXIT_OK
    ctx.out(
        data,
        f"Device id:   {ident.device_id}\nName:        {ident.name}\n"
        f"Fingerprint: {ids.format_fingerprint(ident.fingerprint)}",
    )
    return EXIT_OK


def format_peer_table(records: Sequence[DeviceRecord]) -> str:
    """The human table of known devices."""
    if not records:
        return "No known devices yet."
    lines = [f"{'NAME':<20} {'DEVICE ID':<12} {'TRUST':<11} {'LAST SEEN':<16} {'SYNCS':>5}  FINGERPRINT"]
    for r in records:
        lines.append(
            f"{r.name[:20]:<20} {r.device_id[:10] + '..':<12} {r.trust.value:<11} "
            f"{local_time(r.last_seen):<16} {r.sync_count:>5}  {ids.format_fingerprint(r.fingerprint)[:19]}..."
        )
        if r.pending_fingerprint:
            lines.append(f"{'':<20} offered new key {ids.format_fingerprint(r.pending_fingerprint)}")
    return "\n".join(lines)


def cmd_peers(ctx: Ctx) -> int:
    with ctx.store() as store:
        records = store.all()
    ctx.out([record_json(r) for r in records], format_peer_table(records))
    return EXIT_OK


_TRUST_ACTIONS: dict[str, Callable[[TrustStore, str, float], DeviceRecord]] = {
    "verify": lambda s, d, now: s.verify(d, now, "verified by user"),
    "revoke": lambda s, d, now: s.revoke(d, now),
    "retrust": lambda s, d, now: s.retrust(d, now),
    "accept": lambda s, d, now: s.accept(d, now),
    "forget": lambda s, d, now: s.forget(d, now),
    "reject": lambda s, d, now: s.revoke(d, now, "request rejected by user"),
}


def cmd_trust_change(ctx: Ctx) -> int:
    action: str = ctx.args.trust_command
    if action == "accept" and not ctx.json:
        # Admitting a device is the moment to compare keys: show who it is and the safety number.
        from agent.cli.pair import accept_prompt_text

        with ctx.store() as store:
            waiting = store.resolve(ctx.args.device)
        if waiting.trust is TrustLevel.PENDING:
            print(accept_prompt_text(waiting, ctx.identity()))
    with ctx.store() as store:
        record = _TRUST_ACTIONS[action](store, ctx.args.device, time.time())
    control.notify_trust_changed(ctx.paths.control_socket, record.device_id)
    verb = {"forget": "forgot"}.get(action, action + ("d" if action.endswith("e") else "ed"))
    level = "unknown" if action == "forget" else record.trust.value
    ctx.out(
        {**record_json(record), "trust": level, "action": action},
        f"{verb} {record.name} ({record.device_id}): trust is now {level}",
    )
    return EXIT_OK


def cmd_trust_introducer(ctx: Ctx) -> int:
    on = ctx.args.state == "on"
    with ctx.store() as store:
        record = store.set_introducer(ctx.args.device, on, time.time())
    control.notify_trust_changed(ctx.paths.control_socket, record.device_id)
    what = (
        "introducer: devices it introduces are trusted here"
        if on
        else "not an introducer (devices it introduced stay as they are)"
    )
    ctx.out({**record_json(record), "action": "introducer"}, f"{record.name} ({record.device_id}) is {what}")
    return EXIT_OK


def _log_device(store: TrustStore, text: str) -> str:
    """A known device by id or prefix, or the exact id of a forgotten one (the log keeps its history)."""
    try:
        return store.resolve(text).device_id
    except UnknownDeviceError:
        wanted = text.strip().upper()
        if ids.is_device_id(wanted) and store.events(wanted, 1):
            return wanted
        raise


def cmd_trust_log(ctx: Ctx) -> int:
    with ctx.store() as store:
        device = _log_device(store, ctx.args.device) if ctx.args.device else None
        events = store.events(device, ctx.args.limit)
    lines = [
        f"{local_time(e.time)}  {e.device_id[:10]}..  {e.kind.value:<16} "
        f"{(e.trust_after.value if e.trust_after else ''):<11} "
        + (f"{e.old_fingerprint[:16]}.. -> " if e.old_fingerprint else "")
        + (f"{e.fingerprint[:16]}.." if e.fingerprint else "")
        + (f"  {e.detail}" if e.detail else "")
        for e in events
    ]
    ctx.out([event_json(e) for e in events], "\n".join(lines) or "The trust log is empty.")
    return EXIT_OK


def export_document(records: Sequence[DeviceRecord]) -> dict[str, Any]:
    """The export format: the seed's trusted_peers.json fields plus trust, keyed by device id."""
    return {
        "version": 1,
        "peers": {
            r.device_id: {
                "name": r.name,
                "fingerprint": r.fingerprint,
                "first_seen": rfc3339(r.first_seen),
                "last_seen": rfc3339(r.last_seen),
                "trust": r.trust.value,
                "sync_count": r.sync_count,
                "addresses": list(r.addresses),
                "notes": r.notes,
            }
            for r in records
        },
    }


def cmd_trust_export(ctx: Ctx) -> int:
    with ctx.store() as store:
        doc = export_document(store.all())
    text = json.dumps(doc, indent=2, sort_keys=True)
    if ctx.args.file and ctx.args.file != "-":
        try:
            write_private_file(Path(ctx.args.file), (text + "\n").encode("utf-8"), 0o600)
        except OSError as exc:
            raise UserError(f"cannot write {ctx.args.file}: {exc.strerror or exc}") from exc
        if not ctx.json:
            print(f"exported {len(doc['peers'])} device(s) to {ctx.args.file}")
            return EXIT_OK
    print(text)
    return EXIT_OK


def parse_export(doc: object) -> list[DeviceRecord]:
    """Validate an export document; UserError says what is wrong with it."""
    if not isinstance(doc, dict) or not isinstance(doc.get("peers"), dict):
        raise UserError("not a tofu-agent trust export: expected an object with `peers`")
    if doc.get("version", 1) != 1:
        raise UserError(f"unsupported trust export version {doc.get('version')!r}")
    records = []
    for device_id, entry in doc["peers"].items():
        where = f"peer {device_id!r}"
        if not ids.is_device_id(device_id):
            raise UserError(f"{where}: not a device id")
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected an object")
        fp = entry.get("fingerprint")
        if not ids.is_fingerprint(fp):
            raise UserError(f"{where}: fingerprint must be 64 lower-case hex characters")
        try:
            trust = TrustLevel(entry.get("trust", "tofu"))
        except ValueError:
            raise UserError(f"{where}: unknown trust level {entry.get('trust')!r}") from None
        if trust is TrustLevel.UNKNOWN:
            raise UserError(f"{where}: trust level {trust.value} cannot be imported")
        # A key_changed device travels with its old pin and stays refused; the disputed key is
        # not exported, so the importing machine never learns to trust it.
        addresses = entry.get("addresses", [])
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise UserError(f"{where}: addresses must be a list of strings")
        sync_count = entry.get("sync_count", 0)
        if not isinstance(sync_count, int) or isinstance(sync_count, bool) or sync_count < 0:
            raise UserError(f"{where}: sync_count must be a non-negative number")
        records.append(
            DeviceRecord(
                device_id=device_id,
                name=ids.clean_name(str(entry.get("name", ""))),
                fingerprint=str(fp),
                trust=trust,
                first_seen=parse_rfc3339(entry.get("first_seen"), f"{where} first_seen"),
                last_seen=parse_rfc3339(entry.get("last_seen"), f"{where} last_seen"),
                sync_count=sync_count,
                addresses=tuple(addresses[:8]),
                notes=str(entry.get("notes", ""))[:500],
            )
        )
    return records


def cmd_trust_import(ctx: Ctx) -> int:
    try:
        raw = sys.stdin.read() if ctx.args.file == "-" else Path(ctx.args.file).read_text("utf-8")
        doc = json.loads(raw)
    except OSError as exc:
        raise UserError(f"cannot read {ctx.args.file}: {exc.strerror}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{ctx.args.file} is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise UserError(f"{ctx.args.file} is nested too deeply to be a trust export") from exc
    records = parse_export(doc)
    outcome: dict[str, list[str]] = {"added": [], "updated": [], "kept": [], "conflict": []}
    now = time.time()
    with ctx.store() as store:
        for r in records:
            outcome[store.import_record(r, now)].append(r.device_id)
    lines = [f"{k}: {len(v)}" for k, v in outcome.items()]
    lines += [f"conflict: {d} is pinned to another key here; kept the local pin" for d in outcome["conflict"]]
    ctx.out(outcome, "\n".join(lines))
    return EXIT_OK


def cmd_trust_add(ctx: Ctx) -> int:
    from agent.pairing import safety as verification

    parsed = verification.parse_identity_uri(ctx.args.uri)
    own = ctx.identity()
    if parsed.device_id == own.device_id:
        raise UserError("that URI is this device's own identity")
    with ctx.store() as store:
        record = store.add(parsed.device_id, parsed.name, parsed.fingerprint, time.time(), "added from URI")
    control.notify_trust_changed(ctx.paths.control_socket, record.device_id)
    ctx.out(record_json(record), f"added {record.name} ({record.device_id}) as verified")
    return EXIT_OK


def _check_folders(folders: tuple[config.FolderConfig, ...], data_dir: Path) -> None:
    """Refuse folders that cannot be synced safely: not a directory, overlapping each other, or
    holding (or inside) the agent's own data directory, whose private key must never sync.

    :raises ConfigError: naming the folder and the reason.
    """
    data = data_dir.resolve()
    roots: list[tuple[str, Path]] = []
    for f in folders:
        real = f.path.resolve()  # a symlinked root is followed, as the agent does
        if f.path.exists() and not f.path.is_dir():
            raise ConfigError(f"folder {f.id!r}: {f.path} is not a directory")
        if real == data or real in data.parents or data in real.parents:
            raise ConfigError(f"folder {f.id!r}: {f.path} overlaps the agent's data directory {data_dir}")
        for other_id, other in roots:
            if real == other or real in other.parents or other in real.parents:
                raise ConfigError(
                    f"folders {other_id!r} and {f.id!r} overlap ({other} and {real}): "
                    "a folder cannot be synced inside another"
                )
        roots.append((f.id, real))


def cmd_run(ctx: Ctx) -> int:
    from agent.app import daemon

    a = ctx.args
    cfg = ctx.config().with_overrides(
        name=a.name,
        port=a.port,
        bind=a.bind,
        mdns=False if a.no_mdns else None,
        trust_policy=config.parse_policy(a.trust_policy) if a.trust_policy else None,
    )
    if a.peer:
        cfg = cfg.with_overrides(peers=cfg.peers + tuple(config.parse_peer(p) for p in a.peer))
    if a.folder:
        cfg = cfg.with_overrides(folders=(config.FolderConfig("default", Path(a.folder).absolute()),))
    _check_folders(cfg.folders, ctx.paths.data_dir)
    return daemon.run(ctx.paths, cfg)


def cmd_status(ctx: Ctx) -> int:
    from agent.cli import status

    return status.show(ctx.paths, ctx.json, watch=ctx.args.watch)


def cmd_service(ctx: Ctx) -> int:
    from agent.host import unit as service

    message = service.install(ctx.paths) if ctx.args.action == "install" else service.uninstall()
    ctx.out({"ok": True, "message": message}, message)
    return EXIT_OK


# -- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser; every subcommand also takes --json and --home."""
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    common.add_argument("--home", default=argparse.SUPPRESS, help="keep all state under DIR")
    p = _Parser(prog="tofu-agent", description="Zero-setup LAN sync with trust-on-first-use key pinning.")
    p.add_argument("--version", action="version", version=f"tofu-agent {__version__}")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--home", metavar="DIR", help="keep all state under DIR (also $TOFU_AGENT_HOME)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("id", parents=[common], help="this device's id, name and fingerprint")
    s.add_argument("--qr", action="store_true", help="show a QR code of this device's identity URI")
    s.add_argument("--uri", action="store_true", help="print the identity URI only")
    s.set_defaults(func=cmd_id)

    sub.add_parser("peers", parents=[common], help="every known device").set_defaults(func=cmd_peers)

    t = sub.add_parser("trust", parents=[common], help="change or inspect trust")
    tsub = t.add_subparsers(dest="trust_command", metavar="ACTION", parser_class=_Parser)
    tsub.required = True
    helps = {
        "verify": "mark the pinned key as checked out of band (`tofu-agent verify` compares safety numbers)",
        "revoke": "block the device whatever key it shows",
        "retrust": "pin the new key a device offered after a key change",
        "forget": "delete the device; it is a stranger next time",
        "accept": "admit a device waiting for approval",
        "reject": "refuse a device waiting for approval, now and whenever it asks again (revoked)",
    }
    for action, text in helps.items():
        a = tsub.add_parser(action, parents=[common], help=text)
        a.add_argument("device", metavar="DEVICE", help="device id or a unique prefix of one")
        a.set_defaults(func=cmd_trust_change)
    for action, text in (("pause", "move no folder data with a device (trust and connection stay)"),
                         ("resume", "sync with a paused device again")):  # fmt: skip
        a = tsub.add_parser(action, parents=[common], help=text)
        a.add_argument("device", metavar="DEVICE", help="device id, a unique prefix of one, or its name")
        a.set_defaults(func=_device_pause)
    it = tsub.add_parser(
        "introducer", parents=[common], help="apply (on) or ignore (off) the devices this device introduces"
    )
    it.add_argument("device", metavar="DEVICE", help="device id or a unique prefix of one")
    it.add_argument("state", choices=["on", "off"])
    it.set_defaults(func=cmd_trust_introducer)
    lg = tsub.add_parser("log", parents=[common], help="the trust event log, newest first")
    lg.add_argument("device", nargs="?", metavar="DEVICE")
    lg.add_argument("--limit", type=_positive_int, default=None)
    lg.set_defaults(func=cmd_trust_log)
    ex = tsub.add_parser("export", parents=[common], help="write the trust store as JSON")
    ex.add_argument("file", nargs="?", default="-", metavar="FILE")
    ex.set_defaults(func=cmd_trust_export)
    im = tsub.add_parser("import", parents=[common], help="merge a JSON export (never replaces a pin)")
    im.add_argument("file", metavar="FILE")
    im.set_defaults(func=cmd_trust_import)
    ad = tsub.add_parser("add", parents=[common], help="pre-pin a device from its tofu-agent:// URI")
    ad.add_argument("uri", metavar="URI")
    ad.set_defaults(func=cmd_trust_add)

    r = sub.add_parser("run", parents=[common], help="run the agent in the foreground")
    r.add_argument("--port", type=port_arg, default=None, help="TCP port (default 39001; 0 = any)")
    r.add_argument("--bind", default=None, help="address to listen on (default all)")
    r.add_argument("--name", default=None, help="display name (default: host name)")
    r.add_argument("--peer", action="append", default=[], metavar="HOST:PORT", help="static peer")
    r.add_argument("--no-mdns", action="store_true", help="do not advertise or browse over mDNS")
    r.add_argument("--trust-policy", default=None, choices=[p.value for p in TrustPolicy])
    r.add_argument("--folder", default=None, metavar="PATH", help="sync this folder as id `default`")
    r.set_defaults(func=cmd_run)

    st = sub.add_parser("status", parents=[common], help="what the running agent is doing")
    st.add_argument("--watch", action="store_true", help="redraw every second")
    st.set_defaults(func=cmd_status)

    sv = sub.add_parser("service", parents=[common], help="install or remove the systemd user unit")
    sv.add_argument("action", choices=["install", "uninstall"])
    sv.set_defaults(func=cmd_service)
    _add_extensions(sub, common)
    return p


def _device_pause(ctx: Ctx) -> int:
    from agent.cli import folders as cli_folders

    return cli_folders.cmd_device_pause(ctx)


def _add_extensions(sub: argparse._SubParsersAction[_Parser], common: _Parser) -> None:
    """Commands that live in their own modules register here."""
    from agent.cli import consent as cli_consent
    from agent.cli import folders as cli_folders
    from agent.cli import keys as cli_keys
    from agent.cli import pair as cli_pairing
    from agent.cli import versions as cli_versions

    cli_keys.register(sub, common)  # anomalies, rotate-key
    cli_pairing.register(sub, common)  # verify, pair
    cli_consent.register(sub, common)  # window, pending
    cli_folders.register(sub, common)  # folders, folder accept|share|unshare|pause|resume|override|revert
    cli_versions.register(sub, common)  # versions, restore


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tofu-agent` command; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        # Commands other than `run` stay quiet unless something deserves a warning.
        quiet = logging.INFO if args.command == "run" else logging.WARNING
        logs.setup(logging.DEBUG if args.verbose else quiet)
        ctx = Ctx(paths=resolve_paths(args.home), json=bool(args.json), args=args)
        code: int = args.func(ctx)
        return code
    except UserError as exc:
        print(f"tofu-agent: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TofuError as exc:
        print(f"tofu-agent: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


__all__ = ["ConfigError", "main"]
