"""The agent: wires listener, dialers, discovery, control socket and trust in one task group.

Theory of operation: every connection, inbound or outbound, runs the same `PeerLink` pump. When
a peer has proven its key, `authenticated` asks the trust store (`verify_device`, the one
decision point) and either accepts or refuses with the reason code. At most one link per device
survives: if two exist, the one dialled by the lower device id wins, on both sides alike. mDNS
only tells us where to dial (the lower device id dials); static peers are always dialled.
Liveness comes from the links' keepalives, never from mDNS. Nothing outlives `Agent.run`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
import signal
import ssl
import time
import weakref
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from anyio.streams.tls import TLSStream

from agent import config as config_file
from agent.app import control
from agent.app.report import LiveView, StatusSnapshot, build_status, rfc3339
from agent.app.ui_backend import AgentBackend
from agent.config import Config, resolve_devices
from agent.errors import ConnectionLost, ErrorCode, ProtocolError, RemoteProtocolError, TofuError, UserError
from agent.host import sdnotify
from agent.host.paths import Paths
from agent.identity import keys as identity
from agent.identity import rotation
from agent.identity.crypto import public_key_of_cert
from agent.identity.keys import Identity, format_fingerprint
from agent.net import transport
from agent.net.discovery import Discovery, DiscoveryError, PeerGone, PeerSeen
from agent.net.link import PeerLink, Verdict
from agent.sync.service import SyncService
from agent.trust import guard, introduction, window
from agent.trust.anomaly import AdvertObservation, LiveConnection, NameSighting, Observation
from agent.trust.introduction import Introduce
from agent.trust.model import Decision, DeviceRecord, EventKind, TrustLevel, TrustPolicy
from agent.trust.store import TrustStore
from agent.ui.backend import ChangeFeed, ThisDevice
from agent.ui.server import UiHandle, serve_ui
from agent.wire.handshake import PeerAuthenticated, Role
from agent.wire.messages import WireMessage

if TYPE_CHECKING:
    from agent.net.pairing_net import PairedPeer

log = logging.getLogger(__name__)

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
# A peer that refused us (key changed, revoked) waits for a person; retry, but slowly.
REFUSED_BACKOFF = 60.0
# A peer that has us waiting for approval (or refused our changed key) may decide any moment, a
# person standing at it: ask again every second for the first minutes (an accept or re-trust there
# connects within about a second, also when only we know the address), then as slowly as any refusal.
# ask again soon (a handshake every 2 s) for the first minutes, then as slowly as any refusal.
PENDING_RETRY = 1.0
PENDING_RETRY_FOR = 15 * 60.0
_PERSON_DECIDES = ("waiting for approval", "our key is refused")
SHUTDOWN_GRACE = 3.0
# Adverts seen this soon after we start browsing were up before we started (probing takes at least
# 0.75 s), so their owner runs already and cannot see us until our own advert is out: dial them at
# once whatever the device ids. Peers that start together see each other later than this and keep
# the lower-id-dials rule, so they do not dial each other twice.
EARLY_DIAL_WINDOW = 0.75
# Household introductions: at most this many sent when a link opens, and applied from one link.
MAX_INTRODUCTIONS = 256

_REFUSAL = {
    TrustLevel.KEY_CHANGED: ErrorCode.KEY_CHANGED,
    TrustLevel.REVOKED: ErrorCode.REVOKED,
    TrustLevel.PENDING: ErrorCode.PENDING,
}


def backoff_delay(attempt: int, *, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Capped exponential backoff with full jitter in [d/2, d] (so restarts do not synchronise)."""
    delay: float = min(cap, base * (2 ** min(attempt, 16)))
    return delay / 2 + random.random() * delay / 2  # noqa: S311 - jitter, not secrecy


@dataclass(eq=False)
class Target:
    """Somewhere to dial: a static peer, or a device seen over mDNS."""

    addresses: tuple[str, ...]
    port: int
    device_id: str | None = None  # known for mDNS targets, learned for static ones
    attempt: int = 0
    kick: anyio.Event = field(default_factory=anyio.Event)
    refused: bool = False
    pending_since: float | None = None  # monotonic: when the peer first said we wait for approval
    service_name: str | None = None  # the mDNS record this target came from
    # Dialled by the higher device id because the peer could not see us yet (our advert was not
    # out); dropped once it is, so the lower device id dials from then on.
    early: bool = False


@dataclass(eq=False)
class PeerView:
    """What the agent knows live about one device (beyond the trust store)."""

    device_id: str
    name: str = ""
    link: PeerLink | None = None
    address: str | None = None
    advertised_fp: str | None = None
    mdns_addresses: tuple[str, ...] = ()
    disconnected: anyio.Event = field(default_factory=anyio.Event)
    refused_us: str = ""  # why the device last refused us ("" once it accepts), e.g. waiting for approval


class Agent:
    """One running agent."""

    def __init__(
        self,
        paths: Paths,
        config: Config,
        ident: Identity,
        store: TrustStore,
        *,
        discovery_factory: Callable[[int], Discovery] | None = None,
        notifier: sdnotify.Notifier | None = None,
    ) -> None:
        self.paths = paths
        self.config = config
        self.identity = ident
        self.store = store
        self.port = 0
        self.started_at = time.time()
        self.peers: dict[str, PeerView] = {}
        self.targets: list[Target] = []
        self.notifier = notifier or sdnotify.Notifier()
        self._discovery_factory = discovery_factory
        self.discovery: Discovery | None = None
        self._client_ctx = transport.client_context()
        self._server_ctx = transport.server_context(paths.cert_file, paths.key_file)
        self._tg: anyio.abc.TaskGroup | None = None
        self._stopping = False
        self._advertised = False  # our mDNS advert is announced: peers can find (and dial) us
        self._browse_started = 0.0
        self.sync: SyncService | None = (
            SyncService(paths, config, ident, resolve_devices=lambda entries: resolve_devices(entries, store.all()))
            if config.folders
            else None
        )
        self.stop_requested = anyio.Event()
        # Live observations for the anomaly rules; bounded, since mDNS input is anyone's.
        self.observations: deque[Observation] = deque(maxlen=256)
        self.rotations: tuple[bytes, ...] = tuple(identity.load_rotations(paths))
        self.window = window.close_window()  # the pairing window (policy `window`); opened in `run`
        self.feed = ChangeFeed()  # wakes the web page and the notifier when what `status` shows changed
        self._pairing = False  # a code pairing started from the page runs
        self.ui: UiHandle | None = None
        # Introductions applied from each open link (bounded by MAX_INTRODUCTIONS).
        self._introductions_in: weakref.WeakKeyDictionary[PeerLink, int] = weakref.WeakKeyDictionary()

    # -- life cycle ------------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled or told to stop; then close links and withdraw the advert."""
        await anyio.to_thread.run_sync(self._open_window_at_start)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await tg.start(control.serve, self.paths.control_socket, self.handle_control)
                if self.sync is not None:
                    await tg.start(self.sync.run)
                self.port = await tg.start(self._serve)
                log.info(
                    "%s (%s) listening on %s:%d, fingerprint %s",
                    self.identity.name,
                    self.identity.device_id,
                    self.config.bind,
                    self.port,
                    format_fingerprint(self.identity.fingerprint),
                )
                for host, port in self.config.peers:
                    self._add_target(Target((host,), port))
                if self.config.mdns:
                    await self._start_discovery(tg)
                tg.start_soon(self._watchdog)
                await self._start_ui(tg)
                tg.start_soon(self._announce_ready)
                task_status.started()
        finally:
            self._tg = None

    def stop(self) -> None:
        """Ask for a clean shutdown (what SIGTERM does)."""
        self.stop_requested.set()

    async def shutdown(self) -> None:
        """Say goodbye: ERROR(shutting_down) on every link, wait for them, withdraw the mDNS record."""
        self._stopping = True
        self.notifier.notify("STOPPING=1")
        self.targets.clear()
        with anyio.move_on_after(SHUTDOWN_GRACE, shield=True):
            views = [v for v in self.peers.values() if v.link is not None]
            for view in views:
                assert view.link is not None
                view.link.close_soon(ErrorCode.SHUTTING_DOWN, "agent stopping")
            for view in views:
                await view.disconnected.wait()
            if self.discovery is not None:
                await self.discovery.stop()

    async def _serve(self, *, task_status: anyio.abc.TaskStatus[int]) -> None:
        await transport.serve(
            self.config.bind,
            self.config.port,
            lambda: self._server_ctx,
            self._inbound,
            task_status=task_status,
        )

    async def _start_discovery(self, tg: anyio.abc.TaskGroup) -> None:
        factory = self._discovery_factory or self._zeroconf
        discovery = factory(self.port)
        try:
            await discovery.start()
        except DiscoveryError as exc:
            # No multicast here (no interface, a firewall): static peers still work.
            log.warning("mDNS discovery is unavailable, using static peers only: %s", exc)
            return
        self.discovery = discovery
        self._browse_started = time.monotonic()
        tg.start_soon(self._discovery_events, discovery)
        tg.start_soon(self._await_advert, discovery)

    async def _await_advert(self, discovery: Discovery) -> None:
        try:
            await discovery.wait_advertised()  # mDNS probing takes ~1.2 s
        except DiscoveryError:
            return  # nobody can find us over mDNS: keep dialling whoever we see
        self._advertised = True

    def _zeroconf(self, port: int) -> Discovery:
        from agent.net.mdns import ZeroconfDiscovery  # imported only when mDNS is on (~5 MB)

        return ZeroconfDiscovery(
            device_id=self.identity.device_id,
            name=self.identity.name,
            fingerprint=self.identity.fingerprint,
            port=port,
        )

    async def _announce_ready(self) -> None:
        """READY=1 once listening and advertised (dialling has started already: no need to wait)."""
        if self.discovery is not None:
            with anyio.move_on_after(5.0):
                try:
                    await self.discovery.wait_advertised()
                except DiscoveryError as exc:
                    log.warning("%s; peers can still find us by static address", exc)
        self.notifier.notify("READY=1", f"STATUS=listening on port {self.port}")

    async def _start_ui(self, tg: anyio.abc.TaskGroup) -> None:
        """The Trusted Devices page on loopback, desktop notifications, and what wakes them."""
        backend = AgentBackend(
            store=self.store,
            feed=self.feed,
            this=lambda: ThisDevice(self.identity.device_id, self.identity.name, self.identity.fingerprint),
            status=self._status_now,
            trust_changed=self._person_changed_trust,
            set_window=self.set_window,
            rotate_key=self.rotate_key,
            folders_changed=self.folders_changed,
            paths=self.paths,
            start_pairing=self.start_pairing,
            join_pairing=self.join_pairing,
        )
        if self.config.ui_enabled:
            try:
                self.ui = await tg.start(serve_ui, backend, self.config.ui_port)
            except UserError as exc:  # the port is taken (another agent on this machine): run without it
                log.warning("%s; the web page is off (set [ui] port in config.toml)", exc)
        if self.config.notify_enabled:
            from agent.ui.notify import Notifier

            tg.start_soon(Notifier(backend, enabled=True, open_page=self._open_page).run)
        tg.start_soon(self._tick_folders)

    async def start_pairing(self) -> str:
        """Start waiting with a new one-time code (for the web page): "CODE" and the port it listens
        on, once it does. The pairing runs on in the agent's task group."""
        from agent.app import pairing_run  # pairing loads SPAKE2 and zeroconf: only when used

        session = pairing_run.waiting_session(self.identity)
        listening: list[int] = []
        ready = anyio.Event()

        def on_listening(port: int) -> None:
            listening.append(port)
            ready.set()

        self._begin_pairing(self._wait_pairing(session, on_listening))
        with anyio.move_on_after(5.0):
            await ready.wait()
        return f"{session.code} (port {listening[0]})" if listening else str(session.code)

    async def join_pairing(self, code: str) -> str:
        """Join the machine that shows `code` (for the web page); what to tell the person."""
        from agent.app import pairing_run
        from agent.pairing.code import parse_code

        parse_code(code)  # a typo is refused at once, not after a search
        self._begin_pairing(pairing_run.join(self.identity, self.store, code))
        return f"looking for the machine that shows {code.strip()}: it appears under Devices as verified when done"

    def _begin_pairing(self, run: Coroutine[Any, Any, PairedPeer]) -> None:
        if self._pairing or self._tg is None:
            run.close()
            raise UserError("a pairing is already running here; wait for it to end (at most 5 minutes)")
        self._pairing = True
        self._tg.start_soon(self._finish_pairing, run)

    async def _wait_pairing(self, session: Any, on_listening: Callable[[int], None]) -> PairedPeer:
        from agent.app import pairing_run

        server_ctx = transport.server_context(self.paths.cert_file, self.paths.key_file)
        return await pairing_run.wait(
            self.identity, server_ctx, self.store, session, advertise=self.config.mdns, on_listening=on_listening
        )

    async def _finish_pairing(self, run: Coroutine[Any, Any, PairedPeer]) -> None:
        try:
            from agent.app import pairing_run

            peer = await run
            record = await anyio.to_thread.run_sync(pairing_run.pin_peer, self.store, peer, time.time())
            log.info("paired with %s (%s) by code: verified", record.name, record.device_id)
            self._person_changed_trust(record.device_id, record)
        except (TofuError, ProtocolError, OSError) as exc:
            log.warning("pairing by code failed: %s", exc)
        finally:
            self._pairing = False
            self.feed.notify()

    async def _status_now(self) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(self.status_from, self._snapshot())

    async def _tick_folders(self) -> None:
        """Wake the page when folder progress moved (peers and trust changes notify by themselves)."""
        last: list[dict[str, Any]] = []
        while True:
            await anyio.sleep(0.5)
            now = self.sync.status() if self.sync is not None else []
            if now != last:
                last = now
                self.feed.notify()

    def _open_page(self, device_id: str) -> None:
        """A click on a notification: open the device's page in the person's browser."""
        if self.ui is None:
            return
        import subprocess  # only on a click

        url = self.ui.login_url(f"/device/{device_id}")
        try:
            subprocess.Popen(["xdg-open", url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError as exc:
            log.info("cannot open the web page (%s); run `tofu-agent ui`", exc)

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        while True:
            self.notifier.notify("WATCHDOG=1")
            await anyio.sleep(interval)

    # -- dialling --------------------------------------------------------------------------------

    def _add_target(self, target: Target) -> None:
        self.targets.append(target)
        assert self._tg is not None
        self._tg.start_soon(self._dial_loop, target)

    async def _dial_loop(self, target: Target) -> None:
        while any(t is target for t in self.targets):
            view = self.peers.get(target.device_id) if target.device_id else None
            if view is not None and view.link is not None:
                # Connected (either direction): nothing to do until that link ends.
                await view.disconnected.wait()
                target.attempt = 0
                continue
            if target.early and self._advertised:
                self.targets.remove(target)  # the peer sees us now; the lower device id dials
                return
            ok = await self._dial_once(target)
            if not any(t is target for t in self.targets):
                return
            target.attempt = 0 if ok else target.attempt + 1
            delay = REFUSED_BACKOFF if target.refused else backoff_delay(target.attempt)
            waiting = target.pending_since is not None and time.monotonic() - target.pending_since < PENDING_RETRY_FOR
            if target.refused and waiting:
                delay = PENDING_RETRY
            if ok and not target.refused:
                delay = backoff_delay(0)
            # A kick that came while we were dialling (a retrust, an address change) counts now.
            kicked, target.kick = target.kick.is_set(), anyio.Event()
            if not kicked:
                with anyio.move_on_after(delay):
                    await target.kick.wait()

    async def _dial_once(self, target: Target) -> bool:
        for host in target.addresses:
            try:
                async with transport.dial(host, target.port, self._client_ctx) as stream:
                    cert = transport.peer_certificate(stream)
                    try:
                        server_fp = identity.fingerprint_of_cert(cert)
                    except TofuError as exc:
                        log.warning("peer at %s:%d presented an unusable certificate: %s", host, target.port, exc)
                        continue
                    link = self._make_link(stream, Role.CLIENT, host, server_fp)
                    try:
                        await link.run(self)
                    except Exception:
                        # A bug must cost this one connection, never the agent (inbound links
                        # are guarded the same way in transport.serve).
                        log.exception("connection to %s:%d failed unexpectedly", host, target.port)
                        return False
                    if link.peer is not None:
                        target.device_id = link.peer.device_id
                    target.refused = link.peer is not None and not link.is_open and link.opened_at is None
                    view = self.peers.get(link.peer.device_id) if link.peer is not None else None
                    if target.refused and view is not None and view.refused_us.startswith(_PERSON_DECIDES):
                        if target.pending_since is None:
                            target.pending_since = time.monotonic()
                    else:
                        target.pending_since = None
                    return link.opened_at is not None
            except ConnectionLost as exc:
                log.debug("dial %s:%d: %s", host, target.port, exc)
        return False

    def _make_link(self, stream: anyio.abc.ByteStream, role: Role, address: str, server_fp: str | None) -> PeerLink:
        return PeerLink(
            stream,
            role,
            self.identity,
            address,
            server_fp_tls=server_fp,
            rotations=self.rotations,
            keepalive_idle=self.config.keepalive_idle,
            keepalive_timeout=self.config.keepalive_timeout,
        )

    async def _inbound(self, stream: TLSStream, address: str) -> None:
        link = self._make_link(stream, Role.SERVER, address, None)
        await link.run(self)

    async def _discovery_events(self, discovery: Discovery) -> None:
        async for event in discovery.events:
            match event:
                case PeerSeen():
                    self._on_seen(event)
                case PeerGone():
                    self._on_gone(event)

    def _on_gone(self, event: PeerGone) -> None:
        # A goodbye is a hint: a live link stays (keepalives decide), but we stop dialling.
        log.info("mDNS: %s withdrew its advertisement", event.device_id)
        # Only the record that created a target may end it: anyone can forge a goodbye for an id.
        for t in [t for t in self.targets if t.service_name == event.service_name]:
            self.targets.remove(t)
            t.kick.set()
        view = self.peers.get(event.device_id)
        if view is None:
            return
        if view.link is None and not any(t.device_id == event.device_id for t in self.targets):
            del self.peers[event.device_id]  # keep no state for every id anyone ever advertised
        else:
            view.advertised_fp = None
            view.mdns_addresses = ()

    def _on_seen(self, event: PeerSeen) -> None:
        # Unauthenticated: it may raise an anomaly only about the device id it names.
        self.observations.append(NameSighting(event.device_id, event.name, event.addresses[0], time.time()))
        view = self.peers.setdefault(event.device_id, PeerView(event.device_id))
        view.advertised_fp = event.fingerprint_hint
        view.mdns_addresses = event.addresses
        view.name = view.name or event.name
        for t in self.targets:
            if t.device_id == event.device_id and t.service_name in (None, event.service_name):
                # Follow address changes of the record we dial from; a waiting dialler retries at once.
                if t.service_name is not None:
                    t.addresses, t.port = event.addresses, event.port
                t.kick.set()
                return
        if self.identity.device_id < event.device_id:
            log.info("mDNS: found %s (%s) at %s; dialling", event.name, event.device_id, ", ".join(event.addresses))
            self._add_target(Target(event.addresses, event.port, event.device_id, service_name=event.service_name))
        elif not self._advertised and time.monotonic() - self._browse_started < EARLY_DIAL_WINDOW:
            # It was here first and cannot see us until our advert is out (~1.2 s): dial now, not then.
            log.info("mDNS: found %s (%s) before our advert is out; dialling", event.name, event.device_id)
            target = Target(event.addresses, event.port, event.device_id, service_name=event.service_name, early=True)
            self._add_target(target)
        else:
            log.info("mDNS: found %s (%s); it will dial us (higher device id)", event.name, event.device_id)

    def _open_window_at_start(self) -> None:
        """Drop stale pending requests; open the pairing window if this is a fresh install."""
        self.store.expire_pending(time.time())
        if self.config.trust_policy is not TrustPolicy.WINDOW:
            return
        self.window = window.at_start(self.store.all(), time.monotonic(), time.time())
        if self.window.is_open(time.monotonic()):
            log.warning(
                "pairing window open for %d minutes (this agent trusts no device yet): every tofu-agent "
                "on the network in that time is trusted on first use; close it with `%s`",
                window.FRESH_INSTALL_SECONDS // 60,
                self._cli("window", "close"),
            )

    def set_window(self, seconds: float | None) -> dict[str, Any]:
        """Open the pairing window for `seconds`, or close it (None); what `window status` shows."""
        if self.config.trust_policy is not TrustPolicy.WINDOW and seconds is not None:
            raise UserError(
                f"the trust policy is {self.config.trust_policy.value!r}: a pairing window only applies to "
                f'trust_policy = "window" (the default)'
            )
        now = time.monotonic()
        if seconds is None:
            if self.window.is_open(now):
                log.info("pairing window closed")
            self.window = window.close_window()
        else:
            self.window = window.open_window(now, time.time(), seconds)
            log.warning("pairing window opened for %.0f minutes: new devices are trusted on first use", seconds / 60)
        self.feed.notify()
        return self.window.view(now)

    # -- link hooks ------------------------------------------------------------------------------

    async def authenticated(self, link: PeerLink, peer: PeerAuthenticated) -> Verdict:
        """Decide whether an authenticated peer may stay: rotation, trust store, anomalies, duplicates."""
        if self._stopping:
            return Verdict(False, ErrorCode.SHUTTING_DOWN, "agent stopping")
        view = self.peers.setdefault(peer.device_id, PeerView(peer.device_id))
        view.name = peer.name
        now = time.time()
        # Observations and live links are read here, on the event loop that owns them; the
        # worker thread only touches the store.
        if view.advertised_fp is not None and view.advertised_fp != peer.fingerprint:
            self.observations.append(
                AdvertObservation(peer.device_id, view.advertised_fp, peer.fingerprint, link.address, now)
            )
        window_open = self.window.is_open(time.monotonic())
        reason = self.window.reason if window_open else ""
        decision, blocked, sighting = await anyio.to_thread.run_sync(
            self._decide, peer, link.address, now, self._live(), list(self.observations), window_open, reason
        )
        if sighting is not None:
            self.observations.append(sighting)
        if blocked:
            return Verdict(False, ErrorCode.REVOKED, _refusal_reason(ErrorCode.REVOKED))
        if not decision.may_sync:
            self._log_refusal(decision.record, peer, link.address)
            code = _REFUSAL.get(decision.level, ErrorCode.NOT_TRUSTED)
            return Verdict(False, code, _refusal_reason(code))
        if decision.event is EventKind.FIRST_USE:
            log.info(
                "new device %s (%s) at %s: pinned its key %s (trust on first use%s)",
                peer.name,
                peer.device_id,
                link.address,
                format_fingerprint(peer.fingerprint),
                ", inside the pairing window" if "via=window" in decision.detail else "",
            )
            self._introduce_everywhere(decision.record)  # admitted here: tell the household
        existing = view.link
        if existing is not None and existing is not link:
            if self._keep_new(existing, link):
                existing.close_soon(ErrorCode.DUPLICATE_CONNECTION, "a newer connection replaces this one")
            else:
                return Verdict(False, ErrorCode.DUPLICATE_CONNECTION, "already connected")
        view.link = link
        view.address = link.address
        view.disconnected = anyio.Event()
        self.feed.notify()
        return Verdict(True)

    def _decide(
        self,
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
        record = self.store.get(peer.device_id)
        sighting = NameSighting(peer.device_id, peer.name, address, now) if record is None else None
        if sighting is not None:
            observations = [*observations, sighting]
        chains: list[rotation.ChainResult] = []

        def follow(pinned: str) -> tuple[str, ...]:
            # Asked inside the store's transaction, from the pin it read there.
            chain = rotation.follow_chain(pinned, peer.device_id, peer.fingerprint, peer.rotations)
            chains.append(chain)
            return chain.path if chain.ok else ()

        review = guard.reviewer(self.config.anomaly, now, live, observations)
        outcome = self.store.handshake(
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

    def _live(self) -> list[LiveConnection]:
        return [
            LiveConnection(v.device_id, v.link.peer.fingerprint, v.link.address, v.link.opened_at or 0.0)
            for v in self.peers.values()
            if v.link is not None and v.link.peer is not None
        ]

    def _keep_new(self, old: PeerLink, new: PeerLink) -> bool:
        """Both sides agree: keep the link dialled by the lower device id; same dialler: the newer."""
        peer_id = new.device_id or ""

        def dialler(link: PeerLink) -> str:
            return self.identity.device_id if link.role is Role.CLIENT else peer_id

        if dialler(old) == dialler(new):
            return True
        return dialler(new) < dialler(old)

    def _cli(self, command: str, device_id: str) -> str:
        """The exact command a person types to act on `device_id` (with --home if we use one)."""
        home = f" --home {self.paths.home}" if self.paths.home else ""
        return f"tofu-agent{home} {command} {device_id}"

    def _log_refusal(self, record: DeviceRecord, peer: PeerAuthenticated, address: str) -> None:
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
                self._cli("trust retrust", record.device_id),
            )
        elif record.trust is TrustLevel.PENDING:
            log.warning(
                "new device %s (%s) at %s waits for approval (fingerprint %s); admit it with: %s",
                record.name,
                record.device_id,
                address,
                format_fingerprint(peer.fingerprint),
                self._cli("trust accept", record.device_id),
            )
        else:
            log.info(
                "refused %s (%s) at %s: trust is %s",
                record.name,
                record.device_id,
                address,
                record.trust.value,
            )

    async def opened(self, link: PeerLink) -> None:
        """A link is open: the peer is connected."""
        assert link.peer is not None
        log.info("connected to %s (%s) at %s", link.peer.name, link.peer.device_id, link.address)
        if self.sync is not None:
            await self.sync.peer_opened(link)
        if self._tg is not None:  # introduce every device we trust (applied if the peer marks us introducer)
            self._tg.start_soon(self._send_introductions, link, None)

    async def message(self, link: PeerLink, message: WireMessage) -> None:
        """An application message from a connected peer: introductions are ours, the rest is sync's."""
        if isinstance(message, Introduce):
            await self._introduced(link, message)
            return
        if self.sync is None:
            raise RemoteProtocolError(
                f"unexpected {type(message).__name__}: no folders here", ErrorCode.UNEXPECTED_MESSAGE
            )
        await self.sync.message(link, message)

    # -- household introductions -----------------------------------------------------------------

    def _sign_introductions(
        self, ident: Identity, records: list[DeviceRecord] | None, exclude: frozenset[str]
    ) -> list[Introduce]:
        """In a worker thread: our signed introductions of `records` (default: every device we trust)."""
        if records is None:
            records = self.store.all()
        now, out = int(time.time()), []
        for r in records:
            if not r.trust.may_sync or r.device_id in exclude:
                continue
            try:
                out.append(introduction.make(ident, r.device_id, r.name, r.fingerprint, now))
            except ProtocolError as exc:  # e.g. a name an introduction cannot carry
                log.debug("cannot introduce %s (%s): %s", r.name, r.device_id, exc)
            if len(out) >= MAX_INTRODUCTIONS:
                break
        return out

    async def _send_introductions(self, link: PeerLink, records: list[DeviceRecord] | None) -> None:
        """Send `link`'s peer our introductions (not of itself, nor of us); it applies them only if it
        marked us as an introducer. A link that closes meanwhile just gets none."""
        if link.peer is None:
            return
        exclude = frozenset({link.peer.device_id, self.identity.device_id})
        intros = await anyio.to_thread.run_sync(self._sign_introductions, self.identity, records, exclude)
        if not intros or not link.is_open:
            return
        try:
            await link.send_many(intros)
        except (anyio.BrokenResourceError, ProtocolError) as exc:
            log.debug("introductions to %s not sent: %s", link.peer.name, exc)

    def _introduce_everywhere(self, record: DeviceRecord) -> None:
        """A device was admitted here: introduce it to every other device connected now."""
        if not record.trust.may_sync or self._tg is None:
            return
        for view in self.peers.values():
            link = view.link
            if link is not None and link.is_open and view.device_id != record.device_id:
                self._tg.start_soon(self._send_introductions, link, [record])

    def _person_changed_trust(self, device_id: str, record: DeviceRecord | None) -> None:
        """A person changed trust here (CLI or page): act on it, and introduce an admitted device."""
        self._trust_changed(device_id, record)
        if record is not None:
            self._introduce_everywhere(record)

    async def _introduced(self, link: PeerLink, intro: Introduce) -> None:
        """Apply a peer's introduction if we mark it as an introducer and it signed it; else ignore it.

        :raises RemoteProtocolError: a marked introducer sent a statement its key did not sign.
        """
        peer = link.peer
        assert peer is not None
        if intro.introducer != peer.device_id or intro.device_id == self.identity.device_id:
            log.debug("ignored an introduction of %s relayed by %s", intro.device_id, peer.device_id)
            return
        sender = await anyio.to_thread.run_sync(self.store.get, peer.device_id)
        if (
            sender is None
            or not sender.introducer
            or not sender.trust.may_sync
            or sender.fingerprint != peer.fingerprint
        ):
            # An older agent, or one we did not mark, introduces to everyone: not an error.
            log.debug("ignored an introduction from %s (%s): not an introducer here", peer.name, peer.device_id)
            return
        if not intro.verify(public_key_of_cert(peer.cert_der)):
            raise RemoteProtocolError("an introduction its sender's key did not sign", ErrorCode.AUTH_FAILED)
        applied = self._introductions_in.get(link, 0)
        if applied >= MAX_INTRODUCTIONS:
            log.debug("ignored an introduction from %s: %d applied on this connection", peer.name, applied)
            return
        done = await anyio.to_thread.run_sync(
            lambda: self.store.introduce(intro, sender.name, time.time(), introducer_fingerprint=peer.fingerprint)
        )
        if done is None:
            return  # nothing new, or a person changed the introducer meanwhile
        self._introductions_in[link] = applied + 1
        if done.event is EventKind.KEY_CHANGED:
            log.warning(
                "introducer %s (%s) names key %s for %s (%s), which is pinned here to %s: key_changed; "
                "if the new key is right, accept it with: %s",
                sender.name,
                sender.device_id,
                format_fingerprint(intro.fingerprint),
                done.record.name,
                intro.device_id,
                format_fingerprint(done.record.fingerprint),
                self._cli("trust retrust", intro.device_id),
            )
        else:
            log.info(
                "learned device %s (%s) from introducer %s (%s): trust is now %s",
                done.record.name,
                intro.device_id,
                sender.name,
                sender.device_id,
                done.record.trust.value,
            )
        self._trust_changed(intro.device_id, done.record)

    async def closed(self, link: PeerLink, reason: str) -> None:
        """A link ended; forget it if it was the device's current one."""
        device_id = link.device_id
        if device_id is None:
            log.info("connection from %s ended before authentication: %s", link.address, reason)
            return
        view = self.peers.get(device_id)
        self.feed.notify()
        if view is not None and view.link is link:
            view.link = None
            view.disconnected.set()
            if link.opened_at is not None:
                log.info("disconnected from %s (%s): %s", view.name, device_id, reason)
                if self.sync is not None:
                    await self.sync.peer_closed(link)
                await anyio.to_thread.run_sync(self.store.count_sync, device_id, time.time())
        elif link.peer is not None and "refused" not in reason:
            log.debug("connection to %s ended: %s", device_id, reason)
        if link.peer is not None and view is not None:
            view.refused_us = ""
        if link.peer is not None and reason.startswith("peer closed:"):
            why = reason.removeprefix("peer closed: ")
            benign = (ErrorCode.SHUTTING_DOWN.value, ErrorCode.DUPLICATE_CONNECTION.value, ErrorCode.REKEY.value)
            refused = not why.startswith(benign)
            if refused and view is not None and link.opened_at is None:
                # The peer refused us after the handshake: say why in `status` (for a pending
                # request: which machine a person must approve it on).
                view.name = view.name or link.peer.name
                if why.startswith(ErrorCode.PENDING.value):
                    view.refused_us = f"waiting for approval on {link.peer.name}"
                elif why.startswith(ErrorCode.KEY_CHANGED.value):
                    view.refused_us = f"our key is refused by {link.peer.name} until a person there re-trusts it"
                else:
                    view.refused_us = f"refused by {link.peer.name}: {why}"
            log.log(logging.WARNING if refused else logging.INFO, "%s (%s) closed: %s", link.peer.name, device_id, why)

    # -- control ---------------------------------------------------------------------------------

    async def handle_control(self, cmd: str, args: dict[str, Any]) -> Any:
        """Answer one control-socket command."""
        match cmd:
            case "ping":
                return "pong"
            case "status":
                return await anyio.to_thread.run_sync(self.status_from, self._snapshot())
            case "trust_changed":
                device_id = args.get("device_id")
                if not isinstance(device_id, str):
                    raise UserError("trust_changed needs a device_id")
                record = await anyio.to_thread.run_sync(self.store.get, device_id)
                self._person_changed_trust(device_id, record)
                return {"ok": True}
            case "stop":
                self.stop()
                return {"ok": True}
            case "anomalies":
                live, observations = self._live(), list(self.observations)
                return await anyio.to_thread.run_sync(self.anomalies, live, observations)
            case "rotate_key":
                return await self.rotate_key()
            case "folders_changed":
                return await self.folders_changed()
            case "ui":
                if self.ui is None:
                    raise UserError("the web page is off ([ui] enabled = false, or its port was taken: see the log)")
                nxt = args.get("next")
                return {"url": self.ui.login_url(nxt if isinstance(nxt, str) else None), "port": self.ui.port}
            case "window":
                action = args.get("action")
                if action == "open":
                    seconds = args.get("seconds", window.DEFAULT_SECONDS)
                    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
                        raise UserError("window open needs seconds")
                    return self.set_window(float(seconds))
                if action == "close":
                    return self.set_window(None)
                if action == "status":
                    return self.window.view(time.monotonic())
                raise UserError("window needs action open, close or status")
        raise UserError(f"unknown control command {cmd!r}")

    async def folders_changed(self) -> dict[str, Any]:
        """config.toml's folders changed (`tofu-agent folder ...`): who gets which folder changes now."""
        cfg = await anyio.to_thread.run_sync(config_file.load, self.paths.config_file, self.paths.default_folder)
        if self.sync is None:
            why = "this agent was started without folders: a restart starts them"
            return {"changed": [], "added": [], "restart": [{"id": f.id, "why": why} for f in cfg.folders]}
        result = await self.sync.apply_folders(cfg)
        self.feed.notify()
        return result

    def _trust_changed(self, device_id: str, record: DeviceRecord | None) -> None:
        self.feed.notify()
        view = self.peers.get(device_id)
        if view is not None and view.link is not None and (record is None or not record.trust.may_sync):
            level = record.trust if record else TrustLevel.UNKNOWN
            code = _REFUSAL.get(level, ErrorCode.NOT_TRUSTED)
            log.info("dropping %s (%s): trust is now %s", view.name, device_id, level.value)
            view.link.close_soon(code, _refusal_reason(code))
        for t in self.targets:
            if t.device_id == device_id or t.device_id is None:
                # A retrust or accept may let a refused peer in: try again now, not in 5 minutes.
                t.refused = False
                t.attempt = 0
                t.kick.set()

    async def rotate_key(self) -> dict[str, Any]:
        """Rotate this device's key without a restart: new cert, re-announce, re-handshake every peer."""
        old = self.identity.fingerprint
        new = await anyio.to_thread.run_sync(identity.rotate, self.paths, self.identity, dt.datetime.now(dt.UTC))
        self.identity = new
        self.rotations = tuple(identity.load_rotations(self.paths))
        self._server_ctx = transport.server_context(self.paths.cert_file, self.paths.key_file)
        if self.discovery is not None:
            try:
                await self.discovery.update(new.fingerprint)
            except DiscoveryError as exc:
                log.warning("could not re-announce the new fingerprint over mDNS: %s", exc)
        for view in self.peers.values():
            if view.link is not None:
                view.link.close_soon(ErrorCode.REKEY, "key rotated; reconnect to see the new key")
        for t in self.targets:
            t.attempt = 0
            t.kick.set()
        return {"old_fingerprint": old, "fingerprint": new.fingerprint, "statements": len(self.rotations)}

    def anomalies(self, live: list[LiveConnection], observations: list[Observation]) -> list[dict[str, Any]]:
        """Every anomaly in force, as JSON objects (in a worker thread: reads the store)."""
        found = guard.current(self.store, self.config.anomaly, time.time(), live, observations)
        return [a.to_json() for a in found]

    def _snapshot(self) -> StatusSnapshot:
        """What `status` needs from the event loop's own state, copied on the loop."""
        views = {
            d: LiveView(
                name=v.name,
                connected=bool(v.link and v.link.is_open),
                address=(v.link.address if v.link else None) or v.address,
                advertised_fp=v.advertised_fp,
                refused_us=v.refused_us,
            )
            for d, v in self.peers.items()
        }
        folders = self.sync.status() if self.sync is not None else []
        offered = self.sync.offered() if self.sync is not None else []
        return StatusSnapshot(views, self._live(), list(self.observations), folders, offered)

    def status_from(self, snap: StatusSnapshot) -> dict[str, Any]:
        """The `status --json` object (in a worker thread: reads the store)."""
        own = {
            "device_id": self.identity.device_id,
            "name": self.identity.name,
            "fingerprint": self.identity.fingerprint,
            "bind": self.config.bind,
            "port": self.port,
            "pid": os.getpid(),
            "started_at": rfc3339(self.started_at),
            "trust_policy": self.config.trust_policy.value,
            "mdns": self.config.mdns,
            "pairing_window": self.window.view(time.monotonic()),
        }
        return build_status(own, snap, self.store.all(), self.anomalies(snap.live, snap.observations))


def _refusal_reason(code: ErrorCode) -> str:
    return {
        ErrorCode.KEY_CHANGED: "your key differs from the one pinned for your device id",
        ErrorCode.REVOKED: "your device is revoked here",
        ErrorCode.PENDING: "your device waits for approval here",
        ErrorCode.NOT_TRUSTED: "your device is not trusted here",
    }.get(code, code.value)


def _quiet_accept_race(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Loop exception handler: CPython 3.11's selector loop can call `_sock_accept` for an accept
    whose future was just cancelled (the listener closing while a peer connects) and report an
    InvalidStateError with a traceback; nothing is lost (the peer reconnects). Everything else
    goes to the default handler."""
    exc = context.get("exception")
    handle = repr(context.get("handle", ""))
    if isinstance(exc, asyncio.InvalidStateError) and "_sock_accept" in handle:
        log.debug("an accept raced the listener's close at shutdown (CPython 3.11): ignored")
        return
    loop.default_exception_handler(context)


async def serve_until_stopped(agent: Agent) -> None:
    """Run `agent` until SIGTERM, SIGINT or a `stop` command, then shut it down cleanly."""
    asyncio.get_running_loop().set_exception_handler(_quiet_accept_race)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)

        async def on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for sig in signals:
                    log.info("received %s, stopping", signal.Signals(sig).name)
                    agent.stop()
                    return

        tg.start_soon(on_signal)
        await agent.stop_requested.wait()
        await agent.shutdown()
        tg.cancel_scope.cancel()


def run(paths: Paths, config: Config) -> int:
    """`tofu-agent run`: load identity and store, serve until SIGTERM/SIGINT; the exit code."""
    paths.ensure()
    if control.agent_running(paths.control_socket):
        raise UserError(f"an agent is already running with this home ({paths.control_socket})")
    ident = identity.load_or_create(paths, config.name, dt.datetime.now(dt.UTC))
    if config.name:
        identity.write_private_file(paths.data_dir / "name", config.name.encode("utf-8"))
    store = TrustStore(paths.trust_db, config.trust_policy)
    try:
        agent = Agent(paths, config, ident, store)
        anyio.run(serve_until_stopped, agent, backend="asyncio")
    except* ssl.SSLError as group:
        raise TofuError(f"cannot set up TLS: {group.exceptions[0]}") from group
    except* OSError as group:
        exc = group.exceptions[0]
        what = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise UserError(f"cannot listen on {config.bind}:{config.port}: {what}") from group
    finally:
        store.close()
    log.info("stopped")
    return 0
