"""A code pairing run for a person: wait with a new code, or join with a code typed in; then pin.

`tofu-agent pair` runs one in its own process; the running agent runs one for the web page. Both
pin the peer the same way (`TrustStore.pair`: verified, never over another pin).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent import config
from agent.identity import ids
from agent.net import pairing_net
from agent.net.pairing_net import PairedPeer
from agent.pairing import code as pairing
from agent.trust.model import DeviceRecord
from agent.trust.policy import pairing_conflict
from agent.trust.store import TrustStore

if TYPE_CHECKING:
    from agent.wire.handshake import LocalIdentity, PeerAuthenticated

WAIT_DEFAULT = pairing.DEFAULT_TTL  # the waiting side: how long the code is good
JOIN_DEFAULT = 60.0  # the joining side: how long to look for the waiting side and finish
MDNS_SEARCH_MAX = 30.0
PAIR_DETAIL = "paired with a one-time code"


def refuser(store: TrustStore) -> Callable[[PeerAuthenticated], str | None]:
    """Why a device may not pair here (pinned to another key, revoked), checked during the run."""

    def refuse(peer: PeerAuthenticated) -> str | None:
        return pairing_conflict(store.get(peer.device_id), peer.fingerprint)

    return refuse


def pin_peer(store: TrustStore, peer: PairedPeer, now: float) -> DeviceRecord:
    """Pin a paired peer as `verified`: add a new device, or raise a known one with the same key.

    :raises UserError: it is pinned to another key or revoked here.
    """
    return store.pair(peer.device_id, ids.clean_name(peer.name), peer.fingerprint, now, PAIR_DETAIL)


def waiting_session(identity: LocalIdentity, timeout: float = WAIT_DEFAULT) -> pairing.PairingSession:
    """A new code for the waiting side."""
    code = pairing.new_code()
    return pairing.PairingSession("waiting", code, identity.device_id, identity.fingerprint, time.monotonic(), timeout)


async def wait(
    identity: LocalIdentity,
    server_ctx: ssl.SSLContext,
    store: TrustStore,
    session: pairing.PairingSession,
    *,
    bind: str = "",
    port: int = 0,
    advertise: bool = True,
    on_listening: Callable[[int], None] = lambda _: None,
) -> PairedPeer:
    """Wait for the device that types `session`'s code.

    :raises UserError: the code expired or the pairing failed.
    """
    return await pairing_net.wait_for_peer(
        identity=identity, server_ctx=server_ctx, session=session, bind=bind, port=port, advertise=advertise,
        refuse=refuser(store), on_listening=on_listening,
    )  # fmt: skip


async def join(
    identity: LocalIdentity,
    store: TrustStore,
    code_text: str,
    *,
    within: float = JOIN_DEFAULT,
    peer: str | None = None,
) -> PairedPeer:
    """Find the machine that shows `code_text` (over mDNS, or at `peer` HOST:PORT) and pair with it
    within `within` seconds.

    :raises UserError: a malformed code, nobody found, refused, or the pairing failed.
    """
    parsed = pairing.parse_code(code_text)
    session = pairing.PairingSession(
        "joining", str(parsed), identity.device_id, identity.fingerprint, time.monotonic(), within
    )
    if peer is not None:
        targets = [config.parse_peer(peer)]
    else:
        left = session.expires_at - time.monotonic()
        addresses, port = await pairing_net.find_waiting(parsed.nameplate, min(left, MDNS_SEARCH_MAX))
        targets = [(address, port) for address in addresses]
    return await pairing_net.join(
        identity=identity, session=session, targets=targets, deadline=session.expires_at, refuse=refuser(store)
    )
