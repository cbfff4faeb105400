"""TLS 1.3 listener and dialer: contexts, per-address connection caps, handshake deadlines.

Only the server is authenticated by TLS itself; the client proves its key in the AUTH message
(`agent.wire.handshake`), because Python's `ssl` cannot accept an arbitrary self-signed client
certificate. Neither side trusts a CA: the client reads the server certificate with
`TLSAttribute.peer_certificate_binary` and the handshake layer checks it against the pin.
"""

from __future__ import annotations

import logging
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
from anyio.streams.tls import TLSAttribute, TLSStream

from agent.errors import ConnectionLost

log = logging.getLogger(__name__)

TLS_HANDSHAKE_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5.0
MAX_CONNECTIONS_PER_ADDRESS = 8
MAX_CONNECTIONS = 256


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """TLS 1.3 server context presenting this device's certificate; no client certificates."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert_file, key_file)
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context() -> ssl.SSLContext:
    """TLS 1.3 client context that accepts any certificate: the pin is checked after the handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    # No CA can vouch for a self-signed peer; the certificate is pinned by fingerprint instead.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def peer_certificate(stream: TLSStream) -> bytes:
    """The DER certificate the TLS peer presented (empty if none)."""
    cert = stream.extra(TLSAttribute.peer_certificate_binary, None)
    return cert or b""


def remote_address(stream: anyio.abc.ByteStream) -> str:
    """The peer's IP address as text ("?" if the stream does not know it)."""
    try:
        addr = stream.extra(anyio.abc.SocketAttribute.remote_address)
    except anyio.TypedAttributeLookupError:
        return "?"
    return str(addr[0]) if isinstance(addr, tuple) else str(addr)


@dataclass
class ConnectionLimiter:
    """Caps concurrent connections in total and per remote address."""

    per_address: int = MAX_CONNECTIONS_PER_ADDRESS
    total: int = MAX_CONNECTIONS
    _open: Counter[str] = field(default_factory=Counter)

    def try_acquire(self, address: str) -> bool:
        """Count one more connection from `address`, or False if a cap is reached."""
        if self._open[address] >= self.per_address or sum(self._open.values()) >= self.total:
            return False
        self._open[address] += 1
        return True

    def release(self, address: str) -> None:
        """Forget one connection from `address`."""
        self._open[address] -= 1
        if self._open[address] <= 0:
            del self._open[address]


async def wrap_server(stream: anyio.abc.SocketStream, ctx: ssl.SSLContext) -> TLSStream:
    """Run the server side of the TLS handshake with a deadline.

    :raises ConnectionLost: the handshake failed or took too long.
    """
    try:
        with anyio.fail_after(TLS_HANDSHAKE_TIMEOUT):
            return await TLSStream.wrap(stream, server_side=True, ssl_context=ctx, standard_compatible=False)
    except TimeoutError as exc:
        raise ConnectionLost("TLS handshake timed out") from exc
    except (ssl.SSLError, OSError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
        raise ConnectionLost(f"TLS handshake failed: {exc}") from exc


@asynccontextmanager
async def dial(host: str, port: int, ctx: ssl.SSLContext) -> AsyncIterator[TLSStream]:
    """Connect over TCP and TLS 1.3 with deadlines; the stream is closed on exit.

    :raises ConnectionLost: the peer could not be reached or the handshake failed.
    """
    try:
        with anyio.fail_after(CONNECT_TIMEOUT):
            tcp = await anyio.connect_tcp(host, port)
    except TimeoutError as exc:
        raise ConnectionLost(f"connecting to {host}:{port} timed out") from exc
    except OSError as exc:
        raise ConnectionLost(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
    try:
        with anyio.fail_after(TLS_HANDSHAKE_TIMEOUT):
            tls = await TLSStream.wrap(tcp, server_side=False, ssl_context=ctx, standard_compatible=False)
    except TimeoutError as exc:
        await tcp.aclose()
        raise ConnectionLost(f"TLS handshake with {host}:{port} timed out") from exc
    except (ssl.SSLError, OSError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
        await tcp.aclose()
        raise ConnectionLost(f"TLS handshake with {host}:{port} failed: {exc}") from exc
    try:
        yield tls
    finally:
        await close_quietly(tls)


async def close_quietly(stream: anyio.abc.AsyncResource) -> None:
    """Close a stream without waiting on a peer that stopped reading."""
    with anyio.move_on_after(1.0, shield=True):
        try:
            await stream.aclose()
        except (OSError, ssl.SSLError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass


async def serve(
    bind: str,
    port: int,
    ctx_factory: Callable[[], ssl.SSLContext],
    handler: Callable[[TLSStream, str], Awaitable[None]],
    *,
    limiter: ConnectionLimiter | None = None,
    task_status: anyio.abc.TaskStatus[int],
) -> None:
    """Accept TCP connections on bind:port, wrap them in TLS and hand them to `handler`.

    `task_status.started` receives the port actually bound (useful with port 0). One failing
    connection never stops the listener.
    """
    limiter = limiter or ConnectionLimiter()
    listener = await anyio.create_tcp_listener(local_host=bind or None, local_port=port, reuse_port=False)
    bound = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def one(tcp: anyio.abc.SocketStream) -> None:
        address = remote_address(tcp)
        if not limiter.try_acquire(address):
            log.warning("refusing connection from %s: too many connections from that address", address)
            await close_quietly(tcp)
            return
        try:
            try:
                tls = await wrap_server(tcp, ctx_factory())
            except ConnectionLost as exc:
                log.info("connection from %s closed before authentication: %s", address, exc)
                await close_quietly(tcp)
                return
            try:
                await handler(tls, address)
            finally:
                await close_quietly(tls)
        except Exception:
            # A bug in one connection must not take the listener down; it is logged loudly.
            log.exception("connection from %s failed unexpectedly", address)
        finally:
            limiter.release(address)

    async with listener:
        task_status.started(bound)
        await listener.serve(one)
