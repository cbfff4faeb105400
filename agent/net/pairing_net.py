"""The I/O of code pairing: the pairing connection, its two wire messages, and mDNS for the nameplate.

Theory of operation. The waiting side (`tofu-agent pair`) listens on a port of its own with the
same TLS server context as the agent (its certificate and key), and advertises
`_tofu-pair._tcp.local.` whose TXT holds only `v=1` and the nameplate `n=7`, never the secret words.
The joining side (`tofu-agent pair CODE`) finds it by nameplate (or is given `--peer HOST:PORT`),
dials, and both run the ordinary HELLO/AUTH handshake (`agent.wire.handshake.Connection`), so each
has the other's device id and the fingerprint *this connection* proved: the client's is the key TLS
showed it, the server's is the key that signed an AUTH transcript naming the server's TLS key. Both
accept (the pairing, not the trust store, decides), and on the open connection:

    joining -> waiting   PAIR_PAKE    {nameplate, msg_B}
    waiting -> joining   PAIR_PAKE    {nameplate, msg_A}, PAIR_CONFIRM {mac_A}
    joining -> waiting   PAIR_CONFIRM {mac_B}

`PairingExchange` (pure) feeds these to `agent.pairing.PairingSession`, passing the peer identity
from this handshake, so a relay that terminates TLS with keys of its own makes the two sides hash
different fingerprints and both confirmations fail. The waiting side takes the session only when a
PAIR_PAKE with its nameplate arrives, so a stray connection, a failed handshake or another
pairing's nameplate does not burn the code; from then on one failure burns it. `PairLink` only
pumps bytes through the `Connection`; it decides nothing.

The messages, `PairingExchange`, `PairLink` and `run_exchange` (one pairing connection) live in
`agent.net.pairing_wire` and are re-exported here; this module listens, dials and uses mDNS.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Final

import anyio
from anyio.streams.tls import TLSStream
from zeroconf import InterfaceChoice, IPVersion, ServiceInfo, ServiceListener, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from agent.errors import ConnectionLost, ErrorCode, IdentityError, UserError
from agent.identity.crypto import fingerprint_of_cert
from agent.net import transport
from agent.net.discovery import local_ipv4_addresses
from agent.net.pairing_wire import (
    ClosedByPeer,
    NotThisPairing,
    PairConfirm,
    PairedPeer,
    PairingExchange,
    PairLink,
    PairPake,
    PeerRefusedHere,
    PeerRefusedPairing,
    run_exchange,
)
from agent.net.peer_table import normalise_addresses
from agent.pairing.code import NAMEPLATE_MAX, PairingError, PairingExpired, PairingSession
from agent.wire.handshake import LocalIdentity, PeerAuthenticated, Role

log = logging.getLogger(__name__)

PAIR_SERVICE_TYPE: Final = "_tofu-pair._tcp.local."
PAIR_TXT_VERSION: Final = b"1"
# After finding one advertisement, keep listening this long for a second one with the same number.
MDNS_SETTLE: Final = 1.0
MDNS_MAX_SERVICES: Final = 64
RESOLVE_TIMEOUT_MS: Final = 2000
# The joining side waits this long for the waiting side's goodbye after it has paired.
LINGER: Final = 2.0


# -- the waiting side -----------------------------------------------------------------------------


@dataclass
class _Waiting:
    result: PairedPeer | None = None
    failure: UserError | None = None


async def wait_for_peer(
    *,
    identity: LocalIdentity,
    server_ctx: ssl.SSLContext,
    session: PairingSession,
    bind: str,
    port: int,
    advertise: bool,
    refuse: Callable[[PeerAuthenticated], str | None],
    on_listening: Callable[[int], None],
) -> PairedPeer:
    """Listen until one peer pairs with `session`, the session is burnt, or it expires.

    Connections that fail before the session is taken (a failed handshake, another nameplate, a
    second joiner) are logged and the code stays good; once a connection took it, its failure ends
    the wait.

    :raises PairingError: wrong code (burnt) or expired.
    :raises UserError: we refused the peer (`refuse`), or we cannot listen.
    """
    state = _Waiting()

    async def handle(stream: TLSStream, address: str) -> None:
        exchange = PairingExchange(session)
        link = PairLink(stream, Role.SERVER, identity, session.expires_at)
        try:
            state.result = await run_exchange(link, exchange, refuse)
            await link.close(ErrorCode.SHUTTING_DOWN, "paired")
        except (NotThisPairing, ConnectionLost, PeerRefusedPairing) as exc:
            if not exchange.started:
                log.warning("a connection from %s did not pair (the code is still good): %s", address, exc)
                return
            state.failure = exc if isinstance(exc, UserError) else PairingError(str(exc))
        except UserError as exc:  # a burnt session, or our own refusal of the peer
            state.failure = exc
        done.cancel()

    with anyio.move_on_after(max(0.0, session.expires_at - time.monotonic())) as done:
        try:
            async with anyio.create_task_group() as tg:
                bound = await tg.start(partial(transport.serve, bind, port, lambda: server_ctx, handle))
                on_listening(bound)
                if advertise:
                    tg.start_soon(_advertise, session.nameplate, bound)
        except OSError as exc:
            raise UserError(f"cannot listen on {bind or '*'}:{port}: {exc.strerror or exc}") from exc
    if state.result is not None:
        return state.result
    if state.failure is not None:
        raise state.failure
    raise PairingExpired()


# -- the joining side -----------------------------------------------------------------------------


async def join(
    *,
    identity: LocalIdentity,
    session: PairingSession,
    targets: Sequence[tuple[str, int]],
    deadline: float,
    refuse: Callable[[PeerAuthenticated], str | None],
) -> PairedPeer:
    """Dial the first reachable target and pair over that connection (one attempt, whatever happens).

    :raises UserError: no target reachable, refused, or pairing failed.
    """
    client_ctx = transport.client_context()
    errors: list[str] = []
    for host, port in targets:
        try:
            async with transport.dial(host, port, client_ctx) as tls:
                try:
                    server_fp = fingerprint_of_cert(transport.peer_certificate(tls))
                except IdentityError as exc:
                    raise UserError(f"{host}:{port} is not a tofu-agent waiting to pair ({exc})") from exc
                link = PairLink(tls, Role.CLIENT, identity, deadline, server_fp_tls=server_fp)
                exchange = PairingExchange(session)
                try:
                    result = await run_exchange(link, exchange, refuse)
                except ConnectionLost as exc:
                    raise UserError(f"pairing with {host}:{port} failed: {exc}") from exc
                except NotThisPairing as exc:
                    raise UserError(f"the device at {host}:{port} refused: {exc}") from exc
                await link.linger(LINGER)
                return result
        except ConnectionLost as exc:
            errors.append(str(exc))
    raise UserError(
        f"could not reach the waiting device ({'; '.join(errors) or 'no address to try'}); it may have paired, "
        "expired or refused a wrong code: ask for a new code"
    )


# -- mDNS for the nameplate -----------------------------------------------------------------------


def encode_pair_txt(nameplate: int) -> dict[bytes, bytes]:
    """The TXT of a waiting side: the version and the public nameplate, nothing else."""
    if not 1 <= nameplate <= NAMEPLATE_MAX:
        raise ValueError(f"nameplate out of range: {nameplate}")
    return {b"v": PAIR_TXT_VERSION, b"n": str(nameplate).encode("ascii")}


def parse_pair_txt(properties: dict[bytes, bytes | None]) -> int | None:
    """The nameplate in a received TXT, or None if it is not a version-1 pairing record. Never raises."""
    try:
        if properties.get(b"v") != PAIR_TXT_VERSION:
            return None
        raw = properties.get(b"n")
        if raw is None or not 1 <= len(raw) <= 3 or not raw.isdigit():
            return None
        value = int(raw)
    except (TypeError, AttributeError, ValueError):
        return None
    return value if 1 <= value <= NAMEPLATE_MAX else None


async def _advertise(nameplate: int, port: int) -> None:
    """Advertise the waiting side until cancelled; a failure is a warning (`--peer` still works)."""
    label = f"tofu-pair-{nameplate}-{secrets.token_hex(3)}"
    try:
        aiozc = AsyncZeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)
    except OSError as exc:
        log.warning("cannot advertise on mDNS (%s); the other side can use --peer HOST:%d", exc, port)
        return
    info = ServiceInfo(
        PAIR_SERVICE_TYPE,
        f"{label}.{PAIR_SERVICE_TYPE}",
        port=port,
        properties=dict(encode_pair_txt(nameplate)),
        server=f"{label}.local.",
        parsed_addresses=local_ipv4_addresses(),
    )
    registered = False
    try:
        announced = await aiozc.async_register_service(info, allow_name_change=True)
        registered = True
        await announced
        await anyio.sleep(math.inf)
    except Exception as exc:  # zeroconf raises a variety; pairing by --peer still works
        log.warning("advertising on mDNS failed (%s); the other side can use --peer HOST:%d", exc, port)
    finally:
        with anyio.move_on_after(2.0, shield=True):
            try:
                if registered:
                    await (await aiozc.async_unregister_service(info))
            finally:
                await aiozc.async_close()


class _PairListener(ServiceListener):
    def __init__(self, names: asyncio.Queue[str]) -> None:
        self._names = names

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        if self._names.qsize() < MDNS_MAX_SERVICES:
            self._names.put_nowait(name)

    update_service = add_service

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        pass


@asynccontextmanager
async def _zeroconf() -> AsyncIterator[AsyncZeroconf]:
    try:
        aiozc = AsyncZeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)
    except OSError as exc:
        raise UserError(f"cannot use mDNS here ({exc}); give the waiting side's address with --peer HOST:PORT") from exc
    try:
        yield aiozc
    finally:
        with anyio.move_on_after(2.0, shield=True):
            await aiozc.async_close()


async def find_waiting(nameplate: int, within: float) -> tuple[list[str], int]:
    """The addresses and port of the one waiting side advertising `nameplate`.

    :raises UserError: none found within `within` seconds, or more than one (someone may imitate it).
    """
    names: asyncio.Queue[str] = asyncio.Queue()
    found: dict[str, tuple[list[str], int]] = {}
    seen: set[str] = set()
    async with _zeroconf() as aiozc:
        browser = AsyncServiceBrowser(aiozc.zeroconf, PAIR_SERVICE_TYPE, listener=_PairListener(names))
        try:
            with anyio.move_on_after(within):
                settle_at = math.inf
                while anyio.current_time() < settle_at:
                    with anyio.move_on_after(max(0.0, settle_at - anyio.current_time())):
                        name = await names.get()
                        if name in seen or len(seen) >= MDNS_MAX_SERVICES:
                            continue
                        seen.add(name)
                        hit = await _resolve(aiozc, name, nameplate)
                        if hit is not None:
                            found[name.lower()] = hit
                            settle_at = min(settle_at, anyio.current_time() + MDNS_SETTLE)
        finally:
            await browser.async_cancel()
    if not found:
        raise UserError(
            f"found no device waiting with pairing number {nameplate} within {within:g} s; is "
            "`tofu-agent pair` running on the other machine, on this network? (or use --peer HOST:PORT)"
        )
    if len(found) > 1:
        raise UserError(
            f"{len(found)} devices advertise pairing number {nameplate} (someone may be imitating the real "
            "one); ask for a new code, or use --peer HOST:PORT"
        )
    return next(iter(found.values()))


async def _resolve(aiozc: AsyncZeroconf, name: str, nameplate: int) -> tuple[list[str], int] | None:
    try:
        info = AsyncServiceInfo(PAIR_SERVICE_TYPE, name)
        if not await info.async_request(aiozc.zeroconf, RESOLVE_TIMEOUT_MS):
            return None
        if parse_pair_txt(dict(info.properties)) != nameplate or info.port is None:
            return None
        addresses = list(normalise_addresses(info.parsed_scoped_addresses()))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # hostile records: ignore, never raise
        log.debug("ignoring mDNS record %.80r: %s", name, exc)
        return None
    return (addresses, info.port) if addresses and 0 < info.port < 65536 else None


__all__ = [
    "LINGER",
    "MDNS_MAX_SERVICES",
    "MDNS_SETTLE",
    "PAIR_SERVICE_TYPE",
    "PAIR_TXT_VERSION",
    "RESOLVE_TIMEOUT_MS",
    "ClosedByPeer",
    "NotThisPairing",
    "PairConfirm",
    "PairLink",
    "PairPake",
    "PairedPeer",
    "PairingExchange",
    "PeerRefusedHere",
    "PeerRefusedPairing",
    "encode_pair_txt",
    "find_waiting",
    "join",
    "parse_pair_txt",
    "run_exchange",
    "wait_for_peer",
]
