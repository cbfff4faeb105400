"""Two real `PeerLink`s over real TLS sockets with tiny socket buffers, both sides pulling at once.

Each side asks the other for many MiB of blocks at the same moment and answers the other's
requests from a send task of its own, as the sync service does. With socket buffers of a few KiB
both TCP send buffers fill at once, deterministically. A link whose reader waited for its own
writes (to flush a PONG, or behind a send lock) then never read again: each side waited for the
other to read, for good. The links must be full duplex: reading never waits on writing.
"""

from __future__ import annotations

import datetime as dt
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.streams.tls import TLSStream

from agent.host.paths import resolve_paths
from agent.identity import keys as identity
from agent.net import transport
from agent.net.link import PeerLink, Verdict
from agent.sync.messages import Request, Response
from agent.wire.frames import encode_frame
from agent.wire.handshake import Connection, PeerAuthenticated, Role, State
from agent.wire.messages import Ping, WireMessage, encode_message

pytestmark = pytest.mark.anyio

BUF = 4096  # SO_SNDBUF and SO_RCVBUF: the kernel doubles it, still far below one block
BLOCK = 1024 * 1024
BLOCKS = 24  # each way: 24 MiB


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Side:
    """One end: asks the other for BLOCKS blocks and answers its requests from a send task."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.received = 0
        self.done = anyio.Event()
        self.to_answer: list[Request] = []
        self.wake = anyio.Event()
        self.link: PeerLink | None = None

    async def authenticated(self, link: PeerLink, peer: PeerAuthenticated) -> Verdict:
        return Verdict(True)

    async def opened(self, link: PeerLink) -> None:
        self.link = link
        requests = [Request("default", f"{self.name}-{i}", i * BLOCK, BLOCK, bytes(32), i) for i in range(BLOCKS)]
        await link.send_many(requests)

    async def message(self, link: PeerLink, message: WireMessage) -> None:
        match message:
            case Request():
                self.to_answer.append(message)  # queued, never sent from the reader
                self.wake.set()
            case Response():
                self.received += len(message.data)
                if self.received >= BLOCKS * BLOCK:
                    self.done.set()

    async def closed(self, link: PeerLink, reason: str) -> None:
        self.reason = reason

    async def answer(self) -> None:
        """The send task: one Response per request, each awaited as the service's send loop does."""
        while True:
            if not self.to_answer:
                self.wake = anyio.Event()
                await self.wake.wait()
                continue
            req = self.to_answer.pop(0)
            assert self.link is not None
            await self.link.send(Response(req.request_id, b"\xab" * req.size))


def _tiny_buffers(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUF)


@asynccontextmanager
async def _tls_pair(tmp: Path) -> AsyncIterator[tuple[TLSStream, TLSStream, str]]:
    """A client and a server TLS stream on loopback with tiny buffers, and the server's fingerprint."""
    now = dt.datetime.now(dt.UTC)
    server_paths = resolve_paths(tmp / "server")
    server_paths.ensure()
    server_id = identity.load_or_create(server_paths, "server", now)
    with socket.socket() as listener:
        _tiny_buffers(listener)  # accepted sockets inherit them
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client_sock = socket.socket()
        _tiny_buffers(client_sock)
        client_sock.connect(listener.getsockname())  # completes from the backlog, before accept
        server_sock, _ = listener.accept()
    client_tcp = await anyio.abc.SocketStream.from_socket(client_sock)
    server_tcp = await anyio.abc.SocketStream.from_socket(server_sock)
    server_ctx = transport.server_context(server_paths.cert_file, server_paths.key_file)
    async with anyio.create_task_group() as tg:
        streams: dict[str, TLSStream] = {}

        async def wrap_server() -> None:
            streams["server"] = await transport.wrap_server(server_tcp, server_ctx)

        tg.start_soon(wrap_server)
        streams["client"] = await TLSStream.wrap(
            client_tcp, server_side=False, ssl_context=transport.client_context(), standard_compatible=False
        )
    try:
        yield streams["client"], streams["server"], server_id.fingerprint
    finally:
        for s in streams.values():
            await transport.close_quietly(s)


async def test_both_sides_pulling_many_mib_at_once_never_deadlock(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    client_paths = resolve_paths(tmp_path / "client")
    client_paths.ensure()
    client_id = identity.load_or_create(client_paths, "client", now)
    async with _tls_pair(tmp_path) as (client_tls, server_tls, server_fp):
        server_id = identity.load_or_create(resolve_paths(tmp_path / "server"), "server", now)
        a, b = Side("a"), Side("b")
        link_a = PeerLink(client_tls, Role.CLIENT, client_id, "127.0.0.1", server_fp_tls=server_fp)
        link_b = PeerLink(server_tls, Role.SERVER, server_id, "127.0.0.1")
        async with anyio.create_task_group() as tg:
            tg.start_soon(link_a.run, a)
            tg.start_soon(link_b.run, b)
            tg.start_soon(a.answer)
            tg.start_soon(b.answer)
            with anyio.move_on_after(20) as scope:
                await a.done.wait()
                await b.done.wait()
            tg.cancel_scope.cancel()
        assert not scope.cancelled_caught, (
            f"deadlock: a received {a.received} and b {b.received} of {BLOCKS * BLOCK} bytes each in 20 s"
        )


async def test_a_peer_that_sends_and_never_reads_is_held_up_not_buffered(tmp_path: Path) -> None:
    """PINGs from a peer that never reads: our PONGs queue up to the read-stop mark, then we stop reading."""
    now = dt.datetime.now(dt.UTC)
    client_paths = resolve_paths(tmp_path / "client")
    client_paths.ensure()
    client_id = identity.load_or_create(client_paths, "client", now)
    stop_at = 64 * 1024
    async with _tls_pair(tmp_path) as (client_tls, server_tls, server_fp):
        server_id = identity.load_or_create(resolve_paths(tmp_path / "server"), "server", now)
        victim = PeerLink(server_tls, Role.SERVER, server_id, "127.0.0.1", read_stop_backlog=stop_at)
        hooks = Side("victim")
        # the flooder speaks the handshake with its own machine, then writes PINGs and reads nothing
        flooder = Connection(Role.CLIENT, client_id, bytes(32), server_fp_tls=server_fp)
        flooder.initiate(time.monotonic())
        peak = 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(victim.run, hooks)
            await client_tls.send(flooder.data_to_send())
            while flooder.state is not State.OPEN:
                flooder.receive_data(await client_tls.receive(), time.monotonic())
                while (event := flooder.next_event()) is not None:
                    if isinstance(event, PeerAuthenticated):
                        flooder.accept(time.monotonic())
                await client_tls.send(flooder.data_to_send())
            pings = encode_frame(encode_message(Ping(1))) * 4096
            with anyio.move_on_after(3):
                while True:  # stops when the victim stops reading and our buffers fill
                    await client_tls.send(pings)
                    peak = max(peak, victim.backlog)
            peak = max(peak, victim.backlog)
            tg.cancel_scope.cancel()
        assert stop_at < peak < stop_at + 4 * 1024 * 1024, f"backlog peaked at {peak} bytes"


class _ClosedByPeer(anyio.abc.ByteStream):
    """A stream whose peer has gone: every send raises EndOfStream (as a TLS stream that is not
    standard-compatible does), every receive waits."""

    async def send(self, item: bytes) -> None:
        raise anyio.EndOfStream

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.sleep_forever()
        return b""

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def test_a_peer_gone_while_we_write_ends_the_link_quietly(tmp_path: Path) -> None:
    """Soak finding (5 agents, 30 min): the writer met EndOfStream, which escaped the link as an
    exception group and was logged as an unexpected failure with a traceback."""
    paths = resolve_paths(tmp_path / "x")
    paths.ensure()
    ident = identity.load_or_create(paths, "x", dt.datetime.now(dt.UTC))
    hooks = Side("x")
    link = PeerLink(_ClosedByPeer(), Role.SERVER, ident, "192.0.2.1")
    with anyio.fail_after(5):
        await link.run(hooks)
    assert hooks.reason.startswith("connection lost")
