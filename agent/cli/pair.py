"""`tofu-agent verify DEVICE` (compare a safety number) and `tofu-agent pair [CODE]` (pair with a code).

Both work whether or not an agent runs here: they use the identity files and the trust store under
`--home`, and after a change they tell a running agent (control command `trust_changed`).

What a careful user expects, decided here:

- `verify` on a device in `key_changed` compares the NEW key it offered (the pending one): that is
  the key the other machine shows its number for if it really changed key, and the question the
  person has. The output says so; "yes" pins the new key as `verified` (the event logs the old
  one), "no" leaves the device blocked. A revoked device is not lifted by `verify`.
- Pairing admits new devices and raises known ones with the same key to `verified`; it never
  replaces a pin with another key, nor lifts a block: a leaked code then cannot take over an
  existing pin. The person resolves those with `trust retrust` / `trust forget` first.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from agent.app import control
from agent.cli.context import EXIT_OK, Ctx, port_arg, record_json
from agent.errors import UserError
from agent.identity import ids
from agent.trust import policy
from agent.trust.model import DeviceRecord, EventKind, TrustLevel

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

WAIT_DEFAULT = 300.0  # the waiting side: how long the code is good
JOIN_DEFAULT = 60.0  # the joining side: how long to look for the waiting side and finish

Transition = Callable[[DeviceRecord], tuple[DeviceRecord, EventKind]]


class OwnIdentity(Protocol):
    """What the safety number needs of this device (agent.identity.Identity fits)."""

    @property
    def device_id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def fingerprint(self) -> str: ...


# -- safety numbers for people (pure) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Comparison:
    """What `verify` shows: the number for (this device, one key of that device), and which key."""

    record: DeviceRecord
    key: Literal["pinned", "pending"]
    fingerprint: str
    number: str
    words: str


def comparison_for(record: DeviceRecord, own: OwnIdentity) -> Comparison:
    """The comparison a person wants: the pending key of a `key_changed` device, else the pinned one."""
    if record.trust is TrustLevel.KEY_CHANGED and record.pending_fingerprint:
        key: Literal["pinned", "pending"] = "pending"
        fingerprint = record.pending_fingerprint
    else:
        key, fingerprint = "pinned", record.fingerprint
    # Imported here: every command builds this module's parsers, and the word list is only for verifying.
    from agent.pairing.safety import safety_number, safety_words

    args = (own.device_id, own.fingerprint, record.device_id, fingerprint)
    return Comparison(record, key, fingerprint, safety_number(*args), safety_words(*args))


def comparison_text(c: Comparison, own: OwnIdentity) -> str:
    """The safety number as people read it, with what to compare it against."""
    from agent.pairing.safety import format_groups, format_words

    r = c.record
    lines = [f"Safety number for this device ({own.name}) and {r.name} ({r.device_id}):", ""]
    lines += ["    " + line for line in format_groups(c.number).splitlines()]
    lines += ["", "The same as words, for reading aloud:", ""]
    lines += ["    " + line for line in format_words(c.words).splitlines()]
    lines += [
        "",
        f"On {r.name}, run `tofu-agent verify {own.device_id}` and compare every group (or every word).",
    ]
    if c.key == "pending":
        lines += [
            "",
            f"NOTE: {r.name} is blocked because it showed a NEW key {ids.format_fingerprint(c.fingerprint)[:23]}...",
            f"instead of the pinned {ids.format_fingerprint(r.fingerprint)[:23]}... This number is for the NEW key:",
            "if it matches, the other machine really changed its key, and the new key is pinned as verified.",
            "If it does not match, the new key is not that machine's: leave the device blocked.",
        ]
    elif r.trust is TrustLevel.REVOKED:
        lines += ["", f"{r.name} is revoked; comparing does not lift that (see `tofu-agent trust retrust`)."]
    return "\n".join(lines)


def accept_prompt_text(store_record: DeviceRecord, own_identity: OwnIdentity) -> str:
    """What `trust accept DEVICE` shows before admitting a pending device: who it is and the number."""
    r = store_record
    comparison = comparison_for(r, own_identity)
    address = r.addresses[0] if r.addresses else "unknown"
    head = [
        f"{r.name} ({r.device_id}) is waiting for approval.",
        f"  last address: {address}",
        f"  fingerprint:  {ids.format_fingerprint(comparison.fingerprint)}",
        "",
    ]
    return "\n".join(head) + comparison_text(comparison, own_identity) + "\nAccept it only if they match."


# -- transitions a person's comparison or a pairing makes (pure) ----------------------------------


def verify_compared(record: DeviceRecord, shown: Comparison) -> tuple[DeviceRecord, EventKind]:
    """The person confirmed `shown`: pin that key as `verified`, if the record is still as shown.

    :raises UserError: the record changed since the number was shown, or the device is revoked.
    """
    was = shown.record
    if (record.trust, record.fingerprint, record.pending_fingerprint) != (
        was.trust,
        was.fingerprint,
        was.pending_fingerprint,
    ):
        raise UserError(f"{record.name}'s trust or key changed while you compared; run `tofu-agent verify` again")
    if record.trust is TrustLevel.REVOKED:
        raise UserError(
            f"{record.name} ({record.device_id}) is revoked; lift that first with "
            f"`tofu-agent trust retrust {record.device_id}`, then verify"
        )
    return policy.verify(record, shown.fingerprint)


pairing_conflict = policy.pairing_conflict  # why a device may not be paired here (pure)


def pin_paired(record: DeviceRecord, fingerprint: str) -> tuple[DeviceRecord, EventKind]:
    """A known device proved its pinned key in a pairing: `verified`.

    :raises UserError: it is pinned to another key or revoked (see `pairing_conflict`).
    """
    return policy.pair(record, record.device_id, record.name, fingerprint, record.last_seen)


# -- store and agent edges ------------------------------------------------------------------------


# -- verify ---------------------------------------------------------------------------------------


def _confirmed(prompt: str) -> bool:
    try:
        answer = input(prompt)
    except EOFError:
        answer = ""
    if not sys.stdin.isatty():
        print()  # the answer was not echoed: end the prompt's line
    return answer.strip().lower() in ("y", "yes")


def cmd_verify(ctx: Ctx) -> int:
    own = ctx.identity()
    with ctx.store() as store:
        record = store.resolve(ctx.args.device)
        shown = comparison_for(record, own)
        data: dict[str, Any] = {
            "device_id": record.device_id,
            "safety_number": shown.number,
            "words": shown.words,
            "key": shown.key,
            "fingerprint": shown.fingerprint,
            "trust": record.trust.value,
            "verified": False,
        }
        if ctx.json and not ctx.args.yes:
            ctx.out(data, "")
            return EXIT_OK
        if not ctx.json:
            print(comparison_text(shown, own) + "\n", flush=True)
        if not ctx.args.yes and not _confirmed("Do the numbers match on both machines? [y/N] "):
            raise UserError(
                f"nothing changed: {record.name} stays {record.trust.value}. If the numbers differ, someone may be "
                "in the middle: do not trust that device until they match"
            )
        after = store.change(
            record.device_id,
            time.time(),
            lambda r: verify_compared(r, shown),
            f"safety number compared ({shown.key} key)",
        )
    control.notify_trust_changed(ctx.paths.control_socket, after.device_id)
    data.update(trust=after.trust.value, verified=True, fingerprint=after.fingerprint)
    ctx.out(data, f"verified {after.name} ({after.device_id}): trust is now {after.trust.value}")
    return EXIT_OK


# -- pair -----------------------------------------------------------------------------------------


def _human_time(seconds: float) -> str:
    return f"{seconds / 60:g} minutes" if seconds >= 120 else f"{seconds:g} seconds"


def cmd_pair(ctx: Ctx) -> int:
    a = ctx.args
    if a.window is not None:
        from agent.cli import consent as cli_consent
        from agent.trust import window

        if a.code:
            raise UserError("`pair --window` opens the pairing window; it takes no code")
        return cli_consent.window_request(ctx, "open", window.parse_duration(a.window))

    import anyio

    from agent.app import pairing_run
    from agent.net import transport

    if a.code is None and a.peer is not None:
        raise UserError("--peer is for the joining side: `tofu-agent pair CODE --peer HOST:PORT`")
    if a.code is not None and (a.port is not None or a.bind is not None):
        raise UserError("--port and --bind are for the waiting side (`tofu-agent pair` without a code)")
    own = ctx.identity()
    cfg = ctx.config()
    with ctx.store() as store:
        if a.code is None:
            timeout = a.timeout if a.timeout is not None else WAIT_DEFAULT
            session = pairing_run.waiting_session(own, timeout)
            code = str(session.code)

            def listening(port: int) -> None:
                if ctx.json:
                    print(json.dumps({"code": code, "port": port, "expires_in": timeout}), flush=True)
                    return
                lines = [
                    f"Pairing code: {code}",
                    "",
                    f"On the other machine run:  tofu-agent pair {code}",
                    f"(or, without mDNS:  tofu-agent pair {code} --peer THIS-MACHINE'S-ADDRESS:{port})",
                    "Tell the code only to the person at that machine; it works once.",
                    f"Waiting up to {_human_time(timeout)} (port {port}) ...",
                ]
                print("\n".join(lines), flush=True)

            server_ctx = transport.server_context(ctx.paths.cert_file, ctx.paths.key_file)
            peer = anyio.run(
                lambda: pairing_run.wait(
                    own,
                    server_ctx,
                    store,
                    session,
                    bind=a.bind if a.bind is not None else "",
                    port=a.port if a.port is not None else 0,
                    advertise=cfg.mdns and not a.no_mdns,
                    on_listening=listening,
                ),
                backend="asyncio",
            )
        else:
            timeout = a.timeout if a.timeout is not None else JOIN_DEFAULT
            code_text, peer_arg = a.code, a.peer
            peer = anyio.run(
                lambda: pairing_run.join(own, store, code_text, within=timeout, peer=peer_arg), backend="asyncio"
            )
        record = pairing_run.pin_peer(store, peer, time.time())
    control.notify_trust_changed(ctx.paths.control_socket, record.device_id)
    ctx.out(
        {**record_json(record), "paired": True},
        f"paired with {record.name} ({record.device_id}): trust is now {record.trust.value}",
    )
    sys.stdout.flush()
    return EXIT_OK


# -- arguments ------------------------------------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 24 * 3600:
        raise argparse.ArgumentTypeError("must be more than 0 and at most a day")
    return value


def register(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    """Add `verify` and `pair` to the `tofu-agent` parser."""
    v = sub.add_parser(
        "verify", parents=[common], help="compare the safety number with another device, then mark it verified"
    )
    v.add_argument("device", metavar="DEVICE", help="device id or a unique prefix of one")
    v.add_argument("--yes", action="store_true", help="do not ask: mark it verified (for scripts)")
    v.set_defaults(func=cmd_verify)

    p = sub.add_parser("pair", parents=[common], help="pair with another device using a one-time code")
    p.add_argument("code", nargs="?", metavar="CODE", help="the code the other machine shows (joining side)")
    p.add_argument("--peer", metavar="HOST:PORT", help="joining side: the waiting side's address (skips mDNS)")
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help=f"waiting side: how long the code is good (default {WAIT_DEFAULT:g}); "
        f"joining side: how long to try (default {JOIN_DEFAULT:g})",
    )
    p.add_argument("--port", type=port_arg, default=None, help="waiting side: TCP port to listen on (default 0 = any)")
    p.add_argument("--bind", default=None, metavar="ADDRESS", help="waiting side: address to listen on (default all)")
    p.add_argument("--no-mdns", action="store_true", help="waiting side: do not advertise the code's number")
    p.add_argument(
        "--window",
        nargs="?",
        const="10m",
        default=None,
        metavar="DURATION",
        help="instead of a code: open the running agent's pairing window (default 10m, at most 1h)",
    )
    p.set_defaults(func=cmd_pair)
