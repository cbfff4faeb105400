"""The web page and desktop notifications inside the running agent, and what wakes them.

`Agent` builds the `AgentBackend` from its own methods; `start` serves the page on loopback
(unless it is off, or its port is taken), starts the notifier, and polls folder progress so both
wake when it moves (peers and trust changes notify the feed by themselves).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import anyio
import anyio.abc

from agent.app.ui_backend import AgentBackend
from agent.config import Config
from agent.errors import UserError
from agent.ui.backend import ChangeFeed
from agent.ui.server import UiHandle, serve_ui

# The logger these lines had before they left agent/app/daemon.py: journal filters keep working.
log = logging.getLogger("agent.app.daemon")


async def start(
    tg: anyio.abc.TaskGroup,
    backend: AgentBackend,
    config: Config,
    folder_status: Callable[[], list[dict[str, Any]]],
) -> UiHandle | None:
    """The Trusted Devices page on loopback, desktop notifications, and what wakes them; the page's handle."""
    ui: UiHandle | None = None
    if config.ui_enabled:
        try:
            ui = await tg.start(serve_ui, backend, config.ui_port)
        except UserError as exc:  # the port is taken (another agent on this machine): run without it
            log.warning("%s; the web page is off (set [ui] port in config.toml)", exc)
    if config.notify_enabled:
        from agent.ui.notify import Notifier

        tg.start_soon(Notifier(backend, enabled=True, open_page=partial(open_page, ui)).run)
    tg.start_soon(tick_folders, folder_status, backend.feed)
    return ui


async def tick_folders(folder_status: Callable[[], list[dict[str, Any]]], feed: ChangeFeed) -> None:
    """Wake the page when folder progress moved (peers and trust changes notify by themselves)."""
    last: list[dict[str, Any]] = []
    while True:
        await anyio.sleep(0.5)
        now = folder_status()
        if now != last:
            last = now
            feed.notify()


def open_page(ui: UiHandle | None, device_id: str) -> None:
    """A click on a notification: open the device's page in the person's browser."""
    if ui is None:
        return
    import subprocess  # only on a click

    url = ui.login_url(f"/device/{device_id}")
    try:
        subprocess.Popen(["xdg-open", url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError as exc:
        log.info("cannot open the web page (%s); run `tofu-agent ui`", exc)
