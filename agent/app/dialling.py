"""Outbound connections: whom to dial (static peers, devices seen over mDNS), when, and how often.

mDNS only tells us where to dial: the lower device id dials, except for a peer that was up before
we started browsing and cannot see us until our advert is out. Static peers are always dialled.
Each target has one loop that dials it with capped, jittered backoff until it connects, then waits
for that link (in either direction) to end. The link runs with the agent's hooks, which decide;
the dialler only reads the outcome to pick its next delay.
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.abc

from agent.app.peers import PeerView
from agent.errors import ConnectionLost, TofuError
from agent.identity import keys as identity
from agent.net import transport
from agent.net.discovery import Discovery, DiscoveryError, PeerGone, PeerSeen
from agent.net.link import LinkHooks, PeerLink
from agent.trust.anomaly import NameSighting, Observation
from agent.wire.handshake import Role

# The logger these lines had before they left agent/app/daemon.py: journal filters keep working.
log = logging.getLogger("agent.app.daemon")

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
# A peer that refused us (key changed, revoked) waits for a person; retry, but slowly.
REFUSED_BACKOFF = 60.0
# A peer that has us waiting for approval (or refused our changed key) may decide any moment, a
# person standing at it: ask again every second for the first minutes (an accept or re-trust there
# connects within about a second, also when only we know the address), then as slowly as any refusal.
PENDING_RETRY = 1.0
PENDING_RETRY_FOR = 15 * 60.0
_PERSON_DECIDES = ("waiting for approval", "our key is refused")
# Adverts seen this soon after we start browsing were up before we started (probing takes at least
# 0.75 s), so their owner runs already and cannot see us until our own advert is out: dial them at
# once whatever the device ids. Peers that start together see each other later than this and keep
# the lower-id-dials rule, so they do not dial each other twice.
EARLY_DIAL_WINDOW = 0.75

MakeLink = Callable[[anyio.abc.ByteStream, Role, str, str | None], PeerLink]


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


class Dialler:
    """The agent's outbound side: one dial loop per target, fed by static peers and mDNS events."""

    def __init__(
        self,
        device_id: str,
        peers: dict[str, PeerView],
        observations: deque[Observation],
        client_ctx: ssl.SSLContext,
        make_link: MakeLink,
        hooks: LinkHooks,
        task_group: Callable[[], anyio.abc.TaskGroup | None],
    ) -> None:
        self.device_id = device_id  # ours; a key rotation keeps it
        self.peers = peers  # the agent's live view, shared: links are recorded there by its hooks
        self.observations = observations  # the agent's anomaly input, shared: mDNS sightings go there
        self.client_ctx = client_ctx
        self.make_link = make_link  # with the agent's current key and rotation statements
        self.hooks = hooks
        self.task_group = task_group  # the agent's, while it runs
        self.targets: list[Target] = []
        self.advertised = False  # our mDNS advert is announced: peers can find (and dial) us
        self._browse_started = 0.0

    def add(self, target: Target) -> None:
        """Dial `target` from now on, in the agent's task group, until it is removed."""
        self.targets.append(target)
        tg = self.task_group()
        assert tg is not None
        tg.start_soon(self._dial_loop, target)

    def retry_refused(self, device_id: str) -> None:
        """Trust in `device_id` changed here: dial it (and every static peer) again now."""
        for t in self.targets:
            if t.device_id == device_id or t.device_id is None:
                # A retrust or accept may let a refused peer in: try again now, not in 5 minutes.
                t.refused = False
                t.attempt = 0
                t.kick.set()

    def redial_all(self) -> None:
        """Our key changed: dial every target again now (their links were just closed)."""
        for t in self.targets:
            t.attempt = 0
            t.kick.set()

    def watch(self, discovery: Discovery) -> None:
        """Dial what `discovery` finds from now on (it has started browsing)."""
        tg = self.task_group()
        assert tg is not None
        self._browse_started = time.monotonic()
        tg.start_soon(self._discovery_events, discovery)
        tg.start_soon(self._await_advert, discovery)

    async def _await_advert(self, discovery: Discovery) -> None:
        try:
            await discovery.wait_advertised()  # mDNS probing takes ~1.2 s
        except DiscoveryError:
            return  # nobody can find us over mDNS: keep dialling whoever we see
        self.advertised = True

    async def _dial_loop(self, target: Target) -> None:
        while any(t is target for t in self.targets):
            view = self.peers.get(target.device_id) if target.device_id else None
            if view is not None and view.link is not None:
                # Connected (either direction): nothing to do until that link ends.
                await view.disconnected.wait()
                target.attempt = 0
                continue
            if target.early and self.advertised:
                self.targets.remove(target)  # the peer sees us now; the lower device id dials
                return
            ok = await self.dial_once(target)
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

    async def dial_once(self, target: Target) -> bool:
        """Try each of `target`'s addresses until one answers; run that link to its end. Whether it opened."""
        for host in target.addresses:
            try:
                async with transport.dial(host, target.port, self.client_ctx) as stream:
                    cert = transport.peer_certificate(stream)
                    try:
                        server_fp = identity.fingerprint_of_cert(cert)
                    except TofuError as exc:
                        log.warning("peer at %s:%d presented an unusable certificate: %s", host, target.port, exc)
                        continue
                    link = self.make_link(stream, Role.CLIENT, host, server_fp)
                    try:
                        await link.run(self.hooks)
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

    async def _discovery_events(self, discovery: Discovery) -> None:
        async for event in discovery.events:
            match event:
                case PeerSeen():
                    self.on_seen(event)
                case PeerGone():
                    self.on_gone(event)

    def on_gone(self, event: PeerGone) -> None:
        """An mDNS record was withdrawn: stop dialling what it created; forget the device if idle."""
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

    def on_seen(self, event: PeerSeen) -> None:
        """An mDNS record appeared or changed: note it, and dial it if it is ours to dial."""
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
        if self.device_id < event.device_id:
            log.info("mDNS: found %s (%s) at %s; dialling", event.name, event.device_id, ", ".join(event.addresses))
            self.add(Target(event.addresses, event.port, event.device_id, service_name=event.service_name))
        elif not self.advertised and time.monotonic() - self._browse_started < EARLY_DIAL_WINDOW:
            # It was here first and cannot see us until our advert is out (~1.2 s): dial now, not then.
            log.info("mDNS: found %s (%s) before our advert is out; dialling", event.name, event.device_id)
            target = Target(event.addresses, event.port, event.device_id, service_name=event.service_name, early=True)
            self.add(target)
        else:
            log.info("mDNS: found %s (%s); it will dial us (higher device id)", event.name, event.device_id)
