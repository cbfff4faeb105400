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
import anyio.abc
from anyio.streams.tls import TLSStream
from zeroconf import InterfaceChoice, IPVersion, ServiceInfo, ServiceListener, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from agent.errors import (
    ConnectionLost,
    ErrorCode,
    IdentityError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    TofuError,
    UserError,
)
from agent.identity.crypto import fingerprint_of_cert
from agent.net import transport
from agent.net.discovery import local_ipv4_addresses, normalise_addresses
from agent.pairing.code import (
    CONFIRM_LEN,
    NAMEPLATE_MAX,
    PAKE_MESSAGE_LEN,
    BadPairingMessage,
    PairingError,
    PairingExpired,
    PairingSession,
    State,
    WrongCodeError,
)
from agent.wire.handshake import (
    Connection,
    ConnectionTerminated,
    HandshakeComplete,
    LocalIdentity,
    MessageReceived,
    PeerAuthenticated,
    PeerClosed,
    Role,
)
from agent.wire.messages import WireMessage, check, field_bytes, field_int, register

log = logging.getLogger(__name__)

PAIR_SERVICE_TYPE: Final = "_tofu-pair._tcp.local."
PAIR_TXT_VERSION: Final = b"1"
READ_SIZE: Final = 64 * 1024
# After finding one advertisement, keep listening this long for a second one with the same number.
MDNS_SETTLE: Final = 1.0
MDNS_MAX_SERVICES: Final = 64
RESOLVE_TIMEOUT_MS: Final = 2000
# The joining side waits this long for the waiting side's goodbye after it has paired.
LINGER: Final = 2.0


# -- wire messages --------------------------------------------------------------------------------


@register("pair_pake")
@dataclass(frozen=True, slots=True)
class PairPake(WireMessage):
    """A SPAKE2 message, and the nameplate the sender holds (public, bound into the password)."""

    nameplate: int
    msg: bytes

    def __post_init__(self) -> None:
        check(1 <= self.nameplate <= NAMEPLATE_MAX, f"nameplate must be in 1..{NAMEPLATE_MAX}")
        check(len(self.msg) == PAKE_MESSAGE_LEN, f"msg must be {PAKE_MESSAGE_LEN} bytes")

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> PairPake:
        return cls(
            nameplate=field_int(fields, "nameplate", min_value=1, max_value=NAMEPLATE_MAX),
            msg=field_bytes(fields, "msg", exact=PAKE_MESSAGE_LEN),
        )


@register("pair_confirm")
@dataclass(frozen=True, slots=True)
class PairConfirm(WireMessage):
    """The sender's key confirmation: HMAC over the transcript, under a key from SPAKE2."""

    mac: bytes

    def __post_init__(self) -> None:
        check(len(self.mac) == CONFIRM_LEN, f"mac must be {CONFIRM_LEN} bytes")

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> PairConfirm:
        return cls(mac=field_bytes(fields, "mac", exact=CONFIRM_LEN))


# -- errors that do not burn the code -------------------------------------------------------------


class NotThisPairing(RemoteProtocolError):
    """The peer holds another nameplate (or came while a pairing runs); its connection is refused."""


class PeerRefusedPairing(UserError):
    """The other device closed the connection before pairing finished; the message says why."""


# -- the exchange (pure) --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PairedPeer:
    """The peer of a successful pairing: its id, the name it gave, and the key it proved."""

    device_id: str
    name: str
    fingerprint: str


class PairingExchange:
    """The pairing messages of one connection, over one `PairingSession`; no I/O, time passed in."""

    def __init__(self, session: PairingSession) -> None:
        self.session = session
        self._peer: PeerAuthenticated | None = None
        self._owns = False
        self.result: PairedPeer | None = None

    @property
    def started(self) -> bool:
        """True once this connection uses the session: from then on any failure burns the code."""
        return self._owns

    def authenticated(self, peer: PeerAuthenticated) -> None:
        """The handshake proved `peer`; remember who, for the transcript."""
        self._peer = peer

    def opened(self, now: float) -> list[WireMessage]:
        """The connection is open: the joining side speaks first.

        :raises PairingError: the session expired or was used before.
        """
        if self.session.role == "waiting":
            return []
        self._owns = True
        return [PairPake(self.session.nameplate, self.session.start(now))]

    def received(self, message: WireMessage, now: float) -> list[WireMessage]:
        """A pairing message from the peer: what to send back.

        :raises NotThisPairing: (waiting side, session not taken by this connection) another
            nameplate, or another connection holds the session; the code is not burnt.
        :raises PairingError: the session failed and is burnt; send `code` to the peer.
        """
        peer = self._peer
        if peer is None:
            raise LocalProtocolError("a pairing message before the handshake finished")
        if not self._owns:  # only a waiting side gets here: the joining side owns from `opened`
            if not isinstance(message, PairPake):
                raise NotThisPairing("the first pairing message must be pair_pake", ErrorCode.UNEXPECTED_MESSAGE)
            if message.nameplate != self.session.nameplate:
                raise NotThisPairing(
                    f"this device waits for pairing number {self.session.nameplate}, not {message.nameplate}",
                    ErrorCode.NOT_TRUSTED,
                )
            if self.session.state is not State.EXPECT_START:
                raise NotThisPairing("this device is already pairing with another one", ErrorCode.NOT_TRUSTED)
            self._owns = True
            ours = self.session.start(now)
            mac = self.session.receive_pake(message.msg, peer.device_id, peer.fingerprint, now)
            return [PairPake(self.session.nameplate, ours), PairConfirm(mac)]
        match message:
            case PairPake(nameplate=nameplate, msg=msg) if self.session.state is State.EXPECT_PAKE:
                if nameplate != self.session.nameplate:
                    self.session.abort()
                    raise BadPairingMessage(f"the other device waits for pairing number {nameplate}, not this one")
                return [PairConfirm(self.session.receive_pake(msg, peer.device_id, peer.fingerprint, now))]
            case PairConfirm(mac=mac) if self.session.state is State.EXPECT_CONFIRM:
                done = self.session.receive_confirm(mac, now)
                self.result = PairedPeer(done.peer_device_id, peer.name, done.peer_fingerprint)
                return []
        self.session.abort()
        raise BadPairingMessage(f"the other device sent {message.TYPE} out of turn; ask for a new code")

    def peer_closed(self, code: ErrorCode, reason: str) -> UserError:
        """The error to report when the peer closes before pairing finished (the session is burnt)."""
        if self._owns:
            self.session.abort()
        if code is ErrorCode.AUTH_FAILED and self._owns:
            return WrongCodeError()
        if code is ErrorCode.TIMEOUT:
            return PairingExpired()
        text = f": {reason}" if reason else ""
        return PeerRefusedPairing(f"the other device ended the pairing ({code.value}){text}")


# -- the pump -------------------------------------------------------------------------------------


class PairLink:
    """One pairing connection: pumps a byte stream through a `Connection`; decides nothing."""

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        role: Role,
        identity: LocalIdentity,
        deadline: float,
        *,
        server_fp_tls: str | None = None,
    ) -> None:
        self.stream = stream
        self.deadline = deadline
        self.conn = Connection(role, identity, secrets.token_bytes(32), server_fp_tls=server_fp_tls)
        self.peer: PeerAuthenticated | None = None

    async def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.stream.send(data)

    async def _event(self) -> HandshakeComplete | MessageReceived | PeerAuthenticated:
        """The next event that needs the caller; PeerClosed and EOF become exceptions.

        :raises ClosedByPeer: the peer sent ERROR or hung up.
        :raises TimeoutError: `deadline` passed.
        :raises RemoteProtocolError: the peer broke the protocol (the ERROR is sent first).
        """
        while True:
            try:
                event = self.conn.next_event()
            except ProtocolError:
                await self._flush_quietly()
                raise
            match event:
                case PeerClosed(code=code, reason=reason):
                    raise ClosedByPeer(code, reason)
                case ConnectionTerminated():
                    raise ClosedByPeer(None, "")
                case HandshakeComplete() | MessageReceived() | PeerAuthenticated():
                    return event
            await self._flush()
            now = time.monotonic()
            if now >= self.deadline:
                raise TimeoutError
            timer = self.conn.get_timer()
            wait = self.deadline - now if timer is None else min(self.deadline, timer) - now
            data: bytes | None = None
            with anyio.move_on_after(max(0.0, wait)):
                try:
                    data = await self.stream.receive(READ_SIZE)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    data = b""
            try:
                if data is None:
                    self.conn.handle_timer(time.monotonic())
                else:
                    self.conn.receive_data(data, time.monotonic())
            except ProtocolError:
                await self._flush_quietly()
                raise

    async def open(self, refuse: Callable[[PeerAuthenticated], str | None] = lambda _: None) -> PeerAuthenticated:
        """Run the handshake until the connection is OPEN; `refuse` may veto the peer with a reason.

        :raises PeerRefusedHere: `refuse` gave a reason (it was sent to the peer).
        """
        self.conn.initiate(time.monotonic())
        await self._flush()
        while True:
            event = await self._event()
            if isinstance(event, PeerAuthenticated):
                self.peer = event
                reason = refuse(event)
                if reason is not None:
                    self.conn.refuse(ErrorCode.NOT_TRUSTED, reason, time.monotonic())
                    await self._flush_quietly()
                    raise PeerRefusedHere(reason)
                self.conn.accept(time.monotonic())
                await self._flush()
            elif isinstance(event, HandshakeComplete):
                assert self.peer is not None  # the machine authenticates before it opens
                return self.peer
            else:
                raise LocalProtocolError("an application message before the connection opened")

    async def receive(self) -> WireMessage:
        """The next application message."""
        while True:
            event = await self._event()
            if isinstance(event, MessageReceived):
                return event.message

    async def send(self, messages: Sequence[WireMessage]) -> None:
        """Send messages on the open connection."""
        for message in messages:
            self.conn.send(message)
        await self._flush()

    async def close(self, code: ErrorCode, reason: str) -> None:
        """Send ERROR(code, reason) if still possible; never raises."""
        try:
            self.conn.close(code, reason)
        except ProtocolError:
            pass  # poisoned: the machine already queued its own ERROR
        await self._flush_quietly()

    async def linger(self, seconds: float) -> None:
        """Wait up to `seconds` for the peer to close first, so our last message is read."""
        with anyio.move_on_after(seconds):
            try:
                while True:
                    await self._event()
            except (ClosedByPeer, TimeoutError, ProtocolError, OSError, anyio.BrokenResourceError):
                return

    async def _flush_quietly(self) -> None:
        with anyio.move_on_after(1.0):
            try:
                await self._flush()
            except (OSError, ssl.SSLError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass


class ClosedByPeer(TofuError):
    """Internal: the peer sent ERROR (`code`) or hung up (`code` None)."""

    def __init__(self, code: ErrorCode | None, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class PeerRefusedHere(UserError):
    """We refused the authenticated peer before pairing (e.g. pinned to another key)."""


async def run_exchange(
    link: PairLink, exchange: PairingExchange, refuse: Callable[[PeerAuthenticated], str | None]
) -> PairedPeer:
    """Handshake, then pairing messages, until the exchange has a result.

    :raises PairingError: the pairing failed (burnt if `exchange.started`); the peer was told.
    :raises NotThisPairing, PeerRefusedHere, PeerRefusedPairing: refused before the session was used.
    :raises ConnectionLost: the connection broke or broke the protocol before pairing.
    """
    try:
        peer = await link.open(refuse)
        exchange.authenticated(peer)
        await link.send(exchange.opened(time.monotonic()))
        while exchange.result is None:
            message = await link.receive()
            await link.send(exchange.received(message, time.monotonic()))
        return exchange.result
    except (PairingError, NotThisPairing) as exc:
        await link.close(exc.code, str(exc))
        raise
    except ClosedByPeer as exc:
        if exc.code is None:
            if exchange.started:
                raise PairingError("the other device hung up before pairing finished; ask for a new code") from exc
            raise ConnectionLost("the other side closed the connection before pairing") from exc
        raise exchange.peer_closed(exc.code, exc.reason) from exc
    except TimeoutError as exc:
        await link.close(ErrorCode.TIMEOUT, "pairing took too long")
        raise PairingExpired() from exc
    except RemoteProtocolError as exc:
        if exchange.started:
            raise PairingError(f"the other device broke the pairing protocol: {exc}") from exc
        raise ConnectionLost(_handshake_failure(exc)) from exc
    except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
        raise ConnectionLost(f"the pairing connection broke: {exc}") from exc


def _handshake_failure(exc: RemoteProtocolError) -> str:
    if exc.code in (ErrorCode.CERT_MISMATCH, ErrorCode.AUTH_FAILED):
        return (
            "the connection is not end to end: the keys on it do not match (someone may be in the middle); "
            "nothing was pinned"
        )
    return f"the pairing connection failed: {exc}"


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
