"""The running agent's pairing window (trust policy `window`): opened at start or by a person.

While it is open, a new device is trusted on first use. It opens by itself for a fresh install
(a store that trusts no device yet) and when a person opens it (CLI, page); it closes when its
time is up or a person closes it. A handshake reads only `current` (`agent.trust.window`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from agent.errors import UserError
from agent.trust import window
from agent.trust.model import TrustPolicy
from agent.trust.store import TrustStore
from agent.ui.backend import ChangeFeed

# The logger these lines had before they left agent/app/daemon.py: journal filters keep working.
log = logging.getLogger("agent.app.daemon")


class WindowControl:
    """Holds the pairing window and changes it; every collaborator is the agent's own."""

    def __init__(
        self, store: TrustStore, policy: TrustPolicy, feed: ChangeFeed, cli: Callable[[str, str], str]
    ) -> None:
        self.store = store
        self.policy = policy
        self.feed = feed  # wakes the page when the window opens or closes
        self.cli = cli  # the command a person types (here: to close the window)
        self.current = window.close_window()  # opened in `Agent.run` by `open_at_start`

    def open_at_start(self) -> None:
        """In a worker thread: drop stale pending requests; open the window if this is a fresh install."""
        self.store.expire_pending(time.time())
        if self.policy is not TrustPolicy.WINDOW:
            return
        self.current = window.at_start(self.store.all(), time.monotonic(), time.time())
        if self.current.is_open(time.monotonic()):
            log.warning(
                "pairing window open for %d minutes (this agent trusts no device yet): every tofu-agent "
                "on the network in that time is trusted on first use; close it with `%s`",
                window.FRESH_INSTALL_SECONDS // 60,
                self.cli("window", "close"),
            )

    def set(self, seconds: float | None) -> dict[str, Any]:
        """Open the pairing window for `seconds`, or close it (None); what `window status` shows."""
        if self.policy is not TrustPolicy.WINDOW and seconds is not None:
            raise UserError(
                f"the trust policy is {self.policy.value!r}: a pairing window only applies to "
                f'trust_policy = "window" (the default)'
            )
        now = time.monotonic()
        if seconds is None:
            if self.current.is_open(now):
                log.info("pairing window closed")
            self.current = window.close_window()
        else:
            self.current = window.open_window(now, time.time(), seconds)
            log.warning("pairing window opened for %.0f minutes: new devices are trusted on first use", seconds / 60)
        self.feed.notify()
        return self.current.view(now)
