"""The agent: wires listener, dialers, discovery, control socket and trust in one task group.

Theory of operation: every connection, inbound or outbound, runs the same `PeerLink` pump. When
a peer has proven its key, `authenticated` asks the trust store (`TrustStore.handshake`, the one
decision point) and either accepts or refuses with the reason code. At most one link per device
survives: if two exist, the one dialled by the lower device id wins, on both sides alike. mDNS
only tells us where to dial (the lower device id dials); static peers are always dialled.
Liveness comes from the links' keepalives, never from mDNS. Nothing outlives `Agent.run`.

`Agent` owns the state (the live view of `peers`, the task group, the identity) and the link
hooks; each collaborator is handed what it needs when the agent is made: `dialling.Dialler`
(outbound links, mDNS events), `admission` (the trust decision, refusals, duplicate links),
`introductions.Introductions` (household introductions), `window_control.WindowControl` (the
pairing window), `page_pairing.PagePairing` (code pairing for the page), `ui_tasks` (page and
notifier).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import signal
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
from anyio.streams.tls import TLSStream

from agent import config as config_file
from agent.app import admission, control, ui_tasks
from agent.app.dialling import Dialler, Target
from agent.app.folder_requests import folder_request
from agent.app.introductions import Introductions
from agent.app.page_pairing import PagePairing
from agent.app.peers import PeerView, live_connections
from agent.app.report import LiveView, StatusSnapshot, build_status, rfc3339
from agent.app.ui_backend import AgentBackend
from agent.app.window_control import WindowControl
from agent.config import Config, resolve_devices
from agent.errors import ErrorCode, RemoteProtocolError, TofuError, UserError
from agent.host import sdnotify
from agent.host.memtrim import settle_gc
from agent.host.paths import Paths
from agent.identity import keys as identity
from agent.identity.keys import Identity, format_fingerprint
from agent.net import transport
from agent.net.discovery import Discovery, DiscoveryError
from agent.net.link import PeerLink, Verdict
from agent.sync.service import SyncService
from agent.trust import guard, window
from agent.trust.anomaly import AdvertObservation, LiveConnection, NameSighting, Observation
from agent.trust.introduction import Introduce
from agent.trust.model import Decision, DeviceRecord, EventKind, TrustLevel
from agent.trust.store import TrustStore
from agent.trust.window import PairingWindow
from agent.ui.backend import ChangeFeed, ThisDevice
from agent.ui.server import UiHandle
from agent.wire.handshake import PeerAuthenticated, Role
from agent.wire.messages import WireMessage

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 3.0


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
        self.notifier = notifier or sdnotify.Notifier()
        self._discovery_factory = discovery_factory
        self.discovery: Discovery | None = None
        self._client_ctx = transport.client_context()
        self._server_ctx = transport.server_context(paths.cert_file, paths.key_file)
        self._tg: anyio.abc.TaskGroup | None = None
        self._stopping = False
        self.sync: SyncService | None = (
            SyncService(paths, config, ident, resolve_devices=lambda entries: resolve_devices(entries, store.all()))
            if config.folders
            else None
        )
        self.stop_requested = anyio.Event()
        # Live observations for the anomaly rules; bounded, since mDNS input is anyone's.
        self.observations: deque[Observation] = deque(maxlen=256)
        self.rotations: tuple[bytes, ...] = tuple(identity.load_rotations(paths))
        self.feed = ChangeFeed()  # wakes the web page and the notifier when what `status` shows changed
        self.windows = WindowControl(store, config.trust_policy, self.feed, self._cli)  # opened in `run`
        self.ui: UiHandle | None = None
        # Collaborators share the agent's state only through what they are handed here; they read
        # the task group and the identity through getters, as `run` and `rotate_key` replace them.
        tg, me = self._task_group, self._identity
        self.dialler = Dialler(
            ident.device_id, self.peers, self.observations, self._client_ctx, self._make_link, self, tg
        )
        self.introductions = Introductions(store, me, self.peers, tg, self._trust_changed, self._cli)
        self.pairing = PagePairing(
            me, store, paths, advertise=config.mdns, task_group=tg, paired=self._person_changed_trust, feed=self.feed
        )

    @property
    def targets(self) -> list[Target]:
        """Where the agent dials (the dialler's list, changed in place)."""
        return self.dialler.targets

    @property
    def window(self) -> PairingWindow:
        """The pairing window now (policy `window`)."""
        return self.windows.current

    def _task_group(self) -> anyio.abc.TaskGroup | None:
        return self._tg

    def _identity(self) -> Identity:
        return self.identity

    # -- life cycle ------------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled or told to stop; then close links and withdraw the advert."""
        await anyio.to_thread.run_sync(self.windows.open_at_start)
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
                    self.dialler.add(Target((host,), port))
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
        self.dialler.watch(discovery)

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
            sync=lambda: self.sync,
        )
        self.ui = await ui_tasks.start(tg, backend, self.config, self._folder_status)

    async def start_pairing(self) -> str:
        """Start waiting with a new one-time code (for the web page): "CODE" and the port it listens
        on, once it does. The pairing runs on in the agent's task group."""
        return await self.pairing.start()

    async def join_pairing(self, code: str) -> str:
        """Join the machine that shows `code` (for the web page); what to tell the person."""
        return await self.pairing.join(code)

    def set_window(self, seconds: float | None) -> dict[str, Any]:
        """Open the pairing window for `seconds`, or close it (None); what `window status` shows."""
        return self.windows.set(seconds)

    async def _status_now(self) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(self.status_from, self._snapshot())

    def _folder_status(self) -> list[dict[str, Any]]:
        return self.sync.status() if self.sync is not None else []

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        while True:
            self.notifier.notify("WATCHDOG=1")
            await anyio.sleep(interval)

    # -- links and their hooks -------------------------------------------------------------------

    def _make_link(self, stream: anyio.abc.ByteStream, role: Role, address: str, server_fp: str | None) -> PeerLink:
        """A link over `stream` with our key and rotation statements now (a rotation replaces them)."""
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
        live = live_connections(self.peers)
        decision, blocked, sighting = await anyio.to_thread.run_sync(
            self._decide, peer, link.address, now, live, list(self.observations), window_open, reason
        )
        if sighting is not None:
            self.observations.append(sighting)
        if blocked:
            return Verdict(False, ErrorCode.REVOKED, admission.refusal_reason(ErrorCode.REVOKED))
        if not decision.may_sync:
            admission.log_refusal(decision.record, peer, link.address, self._cli)
            code = admission.refusal_code(decision.level)
            return Verdict(False, code, admission.refusal_reason(code))
        if decision.event is EventKind.FIRST_USE:
            log.info(
                "new device %s (%s) at %s: pinned its key %s (trust on first use%s)",
                peer.name,
                peer.device_id,
                link.address,
                format_fingerprint(peer.fingerprint),
                ", inside the pairing window" if "via=window" in decision.detail else "",
            )
            self.introductions.introduce_everywhere(decision.record)  # admitted here: tell the household
        existing = view.link
        if existing is not None and existing is not link:
            if admission.keep_new(self.identity.device_id, existing, link):
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
        """In a worker thread: `admission.decide` with this agent's store and anomaly rules."""
        return admission.decide(
            self.store, self.config.anomaly, peer, address, now, live, observations, window_open, window_reason
        )

    def _cli(self, command: str, device_id: str) -> str:
        """The exact command a person types to act on `device_id` (with --home if we use one)."""
        home = f" --home {self.paths.home}" if self.paths.home else ""
        return f"tofu-agent{home} {command} {device_id}"

    async def opened(self, link: PeerLink) -> None:
        """A link is open: the peer is connected."""
        assert link.peer is not None
        log.info("connected to %s (%s) at %s", link.peer.name, link.peer.device_id, link.address)
        if self.sync is not None:
            await self.sync.peer_opened(link)
        if self._tg is not None:  # introduce every device we trust (applied if the peer marks us introducer)
            self._tg.start_soon(self.introductions.send, link, None)

    async def message(self, link: PeerLink, message: WireMessage) -> None:
        """An application message from a connected peer: introductions are ours, the rest is sync's."""
        if isinstance(message, Introduce):
            await self.introductions.apply(link, message)
            return
        if self.sync is None:
            raise RemoteProtocolError(
                f"unexpected {type(message).__name__}: no folders here", ErrorCode.UNEXPECTED_MESSAGE
            )
        await self.sync.message(link, message)

    def _person_changed_trust(self, device_id: str, record: DeviceRecord | None) -> None:
        """A person changed trust here (CLI or page): act on it, and introduce an admitted device."""
        self._trust_changed(device_id, record)
        if record is not None:
            self.introductions.introduce_everywhere(record)

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
                live, observations = live_connections(self.peers), list(self.observations)
                return await anyio.to_thread.run_sync(self.anomalies, live, observations)
            case "rotate_key":
                return await self.rotate_key()
            case "folders_changed":
                return await self.folders_changed()
            case "versions" | "restore" | "folder_override" | "folder_revert":
                if self.sync is None:
                    raise UserError("this agent syncs no folders")
                return await folder_request(self.sync, cmd, args)
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
            code = admission.refusal_code(level)
            log.info("dropping %s (%s): trust is now %s", view.name, device_id, level.value)
            view.link.close_soon(code, admission.refusal_reason(code))
        self.dialler.retry_refused(device_id)

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
        self.dialler.redial_all()
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
        folders = self._folder_status()
        offered = self.sync.offered() if self.sync is not None else []
        return StatusSnapshot(views, live_connections(self.peers), list(self.observations), folders, offered)

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
        settle_gc()
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
