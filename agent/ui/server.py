"""`serve_ui`: the page on 127.0.0.1 and [::1], inside the agent's task group, loaded on first use.

Memory. Starlette, Hypercorn and Jinja2 cost about 10 MB of RSS once imported, more than an agent
nobody looks at should pay (the budget is 8 MB). So `serve_ui` binds the two loopback sockets itself
and waits until one is readable (a browser connected; the connection waits in the kernel's accept
queue, nothing is read or lost), then imports the web stack and hands the very same listening
sockets to Hypercorn (`fd://` binds of duplicated descriptors). Until then the page costs two
sockets and one sleeping task.

Shutdown. Hypercorn never installs signal handlers here (a `shutdown_trigger` is given). When the
task group is cancelled, the trigger fires and Hypercorn gets `GRACEFUL` seconds to close its
connections (the live feed ends at once) before it is cancelled too.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode

import anyio
from anyio.abc import TaskStatus

from agent.errors import UserError
from agent.ui.auth import Auth
from agent.ui.backend import ChangeFeed, UiBackend

log = logging.getLogger(__name__)

DEFAULT_PORT = 39080
GRACEFUL = 1.0
HOSTS = ("127.0.0.1", "::1")


def _local_next(path: str | None) -> str | None:
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return None
    return path


def login_url(port: int, token: str, next_path: str | None = None) -> str:
    """The address `tofu-agent ui` prints and opens: it logs one browser in, once."""
    query = {"token": token}
    nxt = _local_next(next_path)
    if nxt:
        query["next"] = nxt
    return f"http://127.0.0.1:{port}/login?{urlencode(query)}"


@dataclass
class UiHandle:
    """What `serve_ui` hands back through `task_status.started`: the port and the login tokens."""

    port: int
    auth: Auth = field(default_factory=Auth)
    loaded: bool = False  # the web stack was imported (a browser connected)

    def login_url(self, next_path: str | None = None, now: float | None = None) -> str:
        """A fresh one-time login URL (the control socket's `ui` command answers with it)."""
        token = self.auth.issue_token(time.time() if now is None else now)
        return login_url(self.port, token, next_path)


def bind_loopback(port: int) -> list[socket.socket]:
    """Listening sockets on 127.0.0.1:port and [::1]:port (the same port; [::1] skipped without IPv6).

    :raises UserError: the port is taken or cannot be bound.
    """
    socks: list[socket.socket] = []
    try:
        for host in HOSTS:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                s = socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:
                if family == socket.AF_INET6 and socks:
                    log.info("web page: no IPv6 here (%s); listening on 127.0.0.1 only", exc)
                    continue
                raise
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((host, port))
                s.listen(64)
                s.setblocking(False)
            except OSError as exc:
                s.close()
                if family == socket.AF_INET6 and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    log.info("web page: [::1] is not available (%s); listening on 127.0.0.1 only", exc)
                    continue
                raise
            socks.append(s)
            port = s.getsockname()[1]  # port 0: [::1] takes the port 127.0.0.1 got
    except OSError as exc:
        for s in socks:
            s.close()
        raise UserError(f"the web page cannot listen on port {port}: {exc.strerror or exc}") from exc
    return socks


async def _first_connection(socks: list[socket.socket]) -> None:
    """Return once any of `socks` has a connection waiting (without accepting it)."""
    async with anyio.create_task_group() as tg:

        async def watch(s: socket.socket) -> None:
            await anyio.wait_readable(s)
            tg.cancel_scope.cancel()

        for s in socks:
            tg.start_soon(watch, s)


async def _pump(backend: UiBackend, feed: ChangeFeed) -> None:
    async for _ in backend.changes():
        feed.notify()


async def serve_ui(
    backend: UiBackend,
    port: int = DEFAULT_PORT,
    *,
    auth: Auth | None = None,
    task_status: TaskStatus[UiHandle] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the page until cancelled. Start it with `handle = await tg.start(serve_ui, backend, port)`.

    :raises UserError: the port cannot be bound (before `started`).
    """
    socks = bind_loopback(port)
    handle = UiHandle(socks[0].getsockname()[1], auth or Auth())
    log.info("web page on http://127.0.0.1:%d/ (run `tofu-agent ui` to log in)", handle.port)
    try:
        task_status.started(handle)
        await _first_connection(socks)
        await _serve_loaded(backend, socks, handle)
    finally:
        for s in socks:
            s.close()


async def _serve_loaded(backend: UiBackend, socks: list[socket.socket], handle: UiHandle) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    from agent.ui.app import create_app

    handle.loaded = True
    feed = ChangeFeed()
    app = create_app(backend, handle.auth, handle.port, feed)
    config = Config()
    config.bind = [f"fd://{os.dup(s.fileno())}" for s in socks]  # Hypercorn owns and closes the copies
    config.accesslog = None  # a login URL carries a token: no request is ever logged
    config.errorlog = logging.getLogger("agent.ui.http")
    config.graceful_timeout = GRACEFUL
    config.include_server_header = False
    stop = anyio.Event()
    done = anyio.Event()
    # Shielded so that cancelling the agent stops Hypercorn through its trigger, gracefully; the
    # deadline set below bounds how long that may take.
    server_scope = anyio.CancelScope(shield=True)

    async def trigger() -> None:
        await stop.wait()

    async def run() -> None:
        try:
            with server_scope:
                await serve(app, config, shutdown_trigger=trigger, mode="asgi")  # type: ignore[arg-type]  # ASGI typing differs
        finally:
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(_pump, backend, feed)
        tg.start_soon(run)
        try:
            await done.wait()  # Hypercorn returns on its own only if it failed
        finally:
            stop.set()
            feed.close()
            server_scope.deadline = anyio.current_time() + GRACEFUL + 1.0
            with anyio.CancelScope(shield=True):
                await done.wait()
            tg.cancel_scope.cancel()
