"""Code pairing for the web page: wait with a new code, or join one, inside the running agent.

`tofu-agent pair` runs a pairing in its own process (`agent.app.pairing_run`); the running agent
runs at most one at a time for the page, in its own task group, and acts on the pinned peer as
on any trust change a person makes. The pairing modules load SPAKE2 and zeroconf, so they are
imported only when a pairing starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread

from agent.errors import ProtocolError, TofuError, UserError
from agent.host.paths import Paths
from agent.identity.keys import Identity
from agent.net import transport
from agent.trust.model import DeviceRecord
from agent.trust.store import TrustStore
from agent.ui.backend import ChangeFeed

if TYPE_CHECKING:
    from agent.net.pairing_net import PairedPeer
    from agent.pairing.code import PairingSession

# The logger these lines had before they left agent/app/daemon.py: journal filters keep working.
log = logging.getLogger("agent.app.daemon")


class PagePairing:
    """At most one code pairing at a time, started from the page; every collaborator is the agent's."""

    def __init__(
        self,
        identity: Callable[[], Identity],
        store: TrustStore,
        paths: Paths,
        *,
        advertise: bool,
        task_group: Callable[[], anyio.abc.TaskGroup | None],
        paired: Callable[[str, DeviceRecord | None], None],
        feed: ChangeFeed,
    ) -> None:
        self.identity = identity  # the agent's current one: a key rotation replaces it
        self.store = store
        self.paths = paths
        self.advertise = advertise  # announce the waiting side over mDNS (config `mdns`)
        self.task_group = task_group  # the agent's, while it runs
        self.paired = paired  # the agent acts on the device a pairing just pinned
        self.feed = feed
        self.running = False

    async def start(self) -> str:
        """Start waiting with a new one-time code: "CODE" and the port it listens on, once it does.
        The pairing runs on in the agent's task group."""
        from agent.app import pairing_run  # pairing loads SPAKE2 and zeroconf: only when used

        session = pairing_run.waiting_session(self.identity())
        listening: list[int] = []
        ready = anyio.Event()

        def on_listening(port: int) -> None:
            listening.append(port)
            ready.set()

        self._begin(self._wait(session, on_listening))
        with anyio.move_on_after(5.0):
            await ready.wait()
        return f"{session.code} (port {listening[0]})" if listening else str(session.code)

    async def join(self, code: str) -> str:
        """Join the machine that shows `code`; what to tell the person."""
        from agent.app import pairing_run
        from agent.pairing.code import parse_code

        parse_code(code)  # a typo is refused at once, not after a search
        self._begin(pairing_run.join(self.identity(), self.store, code))
        return f"looking for the machine that shows {code.strip()}: it appears under Devices as verified when done"

    def _begin(self, run: Coroutine[Any, Any, PairedPeer]) -> None:
        tg = self.task_group()
        if self.running or tg is None:
            run.close()
            raise UserError("a pairing is already running here; wait for it to end (at most 5 minutes)")
        self.running = True
        tg.start_soon(self._finish, run)

    async def _wait(self, session: PairingSession, on_listening: Callable[[int], None]) -> PairedPeer:
        from agent.app import pairing_run

        server_ctx = transport.server_context(self.paths.cert_file, self.paths.key_file)
        return await pairing_run.wait(
            self.identity(), server_ctx, self.store, session, advertise=self.advertise, on_listening=on_listening
        )

    async def _finish(self, run: Coroutine[Any, Any, PairedPeer]) -> None:
        try:
            from agent.app import pairing_run

            peer = await run
            record = await anyio.to_thread.run_sync(pairing_run.pin_peer, self.store, peer, time.time())
            log.info("paired with %s (%s) by code: verified", record.name, record.device_id)
            self.paired(record.device_id, record)
        except (TofuError, ProtocolError, OSError) as exc:
            log.warning("pairing by code failed: %s", exc)
        finally:
            self.running = False
            self.feed.notify()
