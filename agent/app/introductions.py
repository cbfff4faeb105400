"""Household introductions over the agent's links: we send ours, and apply a marked introducer's.

When a link opens we introduce every device we trust (signed with our key); when a device is
admitted here we introduce it to every device connected now. A peer applies them only if it
marked us as an introducer, and we apply only those a device we marked signed, at most
`MAX_INTRODUCTIONS` per link. The store decides what an introduction may change (never a pin).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Mapping

import anyio
import anyio.abc
import anyio.to_thread

from agent.app.peers import PeerView
from agent.errors import ErrorCode, ProtocolError, RemoteProtocolError
from agent.identity.crypto import public_key_of_cert
from agent.identity.keys import Identity, format_fingerprint
from agent.net.link import PeerLink
from agent.trust import introduction
from agent.trust.introduction import Introduce
from agent.trust.model import DeviceRecord, EventKind
from agent.trust.store import TrustStore

# The logger these lines had before they left agent/app/daemon.py: journal filters keep working.
log = logging.getLogger("agent.app.daemon")

# Household introductions: at most this many sent when a link opens, and applied from one link.
MAX_INTRODUCTIONS = 256


class Introductions:
    """The agent's introductions, sent and received; every collaborator is the agent's own."""

    def __init__(
        self,
        store: TrustStore,
        identity: Callable[[], Identity],
        peers: Mapping[str, PeerView],
        task_group: Callable[[], anyio.abc.TaskGroup | None],
        trust_changed: Callable[[str, DeviceRecord | None], None],
        cli: Callable[[str, str], str],
    ) -> None:
        self.store = store
        self.identity = identity  # the agent's current one: a key rotation replaces it
        self.peers = peers  # the agent's live view (read only here)
        self.task_group = task_group  # the agent's, while it runs
        self.trust_changed = trust_changed  # the agent acts on a device the store just changed
        self.cli = cli  # the command a person types to act on a device
        # Introductions applied from each open link (bounded by MAX_INTRODUCTIONS).
        self._applied: weakref.WeakKeyDictionary[PeerLink, int] = weakref.WeakKeyDictionary()

    def sign(self, ident: Identity, records: list[DeviceRecord] | None, exclude: frozenset[str]) -> list[Introduce]:
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

    async def send(self, link: PeerLink, records: list[DeviceRecord] | None) -> None:
        """Send `link`'s peer our introductions (not of itself, nor of us); it applies them only if it
        marked us as an introducer. A link that closes meanwhile just gets none."""
        if link.peer is None:
            return
        ident = self.identity()
        exclude = frozenset({link.peer.device_id, ident.device_id})
        intros = await anyio.to_thread.run_sync(self.sign, ident, records, exclude)
        if not intros or not link.is_open:
            return
        try:
            await link.send_many(intros)
        except (anyio.BrokenResourceError, ProtocolError) as exc:
            log.debug("introductions to %s not sent: %s", link.peer.name, exc)

    def introduce_everywhere(self, record: DeviceRecord) -> None:
        """A device was admitted here: introduce it to every other device connected now."""
        tg = self.task_group()
        if not record.trust.may_sync or tg is None:
            return
        for view in self.peers.values():
            link = view.link
            if link is not None and link.is_open and view.device_id != record.device_id:
                tg.start_soon(self.send, link, [record])

    async def apply(self, link: PeerLink, intro: Introduce) -> None:
        """Apply a peer's introduction if we mark it as an introducer and it signed it; else ignore it.

        :raises RemoteProtocolError: a marked introducer sent a statement its key did not sign.
        """
        peer = link.peer
        assert peer is not None
        if intro.introducer != peer.device_id or intro.device_id == self.identity().device_id:
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
        applied = self._applied.get(link, 0)
        if applied >= MAX_INTRODUCTIONS:
            log.debug("ignored an introduction from %s: %d applied on this connection", peer.name, applied)
            return
        done = await anyio.to_thread.run_sync(
            lambda: self.store.introduce(intro, sender.name, time.time(), introducer_fingerprint=peer.fingerprint)
        )
        if done is None:
            return  # nothing new, or a person changed the introducer meanwhile
        self._applied[link] = applied + 1
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
                self.cli("trust retrust", intro.device_id),
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
        self.trust_changed(intro.device_id, done.record)
