"""A scripted malicious peer: raw TCP, raw TLS, and a client or server that speaks the protocol.

Everything here is blocking and synchronous (plain sockets with timeouts), so a test reads like
the attack it performs. Three levels:

- `tcp_connect` / `client_hello_only`: bytes below TLS (garbage, a half-open TLS handshake).
- `HostileClient`: a finished TLS 1.3 connection over which any frame or message can be sent at
  any time; it also reads what the agent answers (`messages`, `error_code`). Its `hello` and
  `auth` build real handshake messages from any identity, device id, nonce or signer, so forged,
  replayed and impersonating handshakes are one call each.
- `ProtocolClient` / `HostileServer`: the real `agent.wire.handshake.Connection` with its own key,
  so a peer can first be honest (reach OPEN) and then misbehave.

Network rule: every address used here must be in 127.0.0.0/8 (`check_loopback`); the agent under
test listens on 127.0.0.1, and attackers bind other loopback sources (127.0.0.2, ...) so the
per-address connection cap can be hit without touching the legitimate peer's address.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import ErrorCode, ProtocolError
from agent.identity import keys as ident
from agent.identity.keys import Identity
from agent.sync.blocks import block_size_for, hash_bytes
from agent.sync.messages import Request  # also registers the sync messages, so they decode
from agent.wire.frames import MAX_FRAME, FrameDecoder
from agent.wire.handshake import (
    Connection,
    ConnectionTerminated,
    Event,
    HandshakeComplete,
    PeerAuthenticated,
    PeerClosed,
    Role,
    auth_transcript,
)
from agent.wire.messages import NONCE_LEN, Auth, Error, Hello, WireMessage, decode_message, encode_message
from agent.wire.session import MessageReceived

_HEADER_LEN = 4
DEFAULT_TIMEOUT = 10.0


def check_loopback(host: str) -> str:
    """`host` if it is a loopback IPv4 address; anything else is refused (tests stay on loopback)."""
    if ipaddress.ip_address(host) not in ipaddress.ip_network("127.0.0.0/8"):
        raise ValueError(f"hostile peers only talk to loopback, not {host}")
    return host


def source_address(index: int) -> str:
    """The `index`-th attacker source address: 127.0.0.2, 127.0.0.3, ... (127.0.x.y beyond 253)."""
    n = index + 2
    return f"127.0.{n // 254}.{n % 254 or 254}" if n >= 254 else f"127.0.0.{n}"


def new_identity(name: str, device_id: str | None = None) -> Identity:
    """A fresh key pair, self-signed certificate and device id (or the given one: impersonation)."""
    key = ec.generate_private_key(ec.SECP256R1())
    device_id = device_id or ident.new_device_id()
    cert = ident.make_certificate(key, device_id, dt.datetime.now(dt.UTC))
    return Identity(device_id, name, key, cert.public_bytes(serialization.Encoding.DER))


def frame(body: bytes) -> bytes:
    """`body` with a 4-byte length header, whatever its size (no limit: we are the attacker)."""
    return len(body).to_bytes(_HEADER_LEN, "big") + body


def message_frame(message: WireMessage) -> bytes:
    """A registered message as one frame."""
    return frame(encode_message(message))


# -- below TLS ------------------------------------------------------------------------------------


def tcp_connect(
    port: int, *, source: str = "127.0.0.2", host: str = "127.0.0.1", timeout: float = 5.0
) -> socket.socket:
    """A TCP connection to host:port from `source` (both loopback)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.bind((check_loopback(source), 0))
        sock.connect((check_loopback(host), port))
    except OSError:
        sock.close()
        raise
    return sock


def client_hello_only(port: int, *, source: str = "127.0.0.2", host: str = "127.0.0.1") -> socket.socket:
    """A TCP connection that sent a TLS 1.3 ClientHello and will never say anything more (slowloris)."""
    sock = tcp_connect(port, source=source, host=host)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = _client_context().wrap_bio(incoming, outgoing, server_side=False)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    sock.sendall(outgoing.read())
    return sock


def closed_within(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the peer closed `sock` (EOF or reset), reading and dropping what it sends; None if it did not."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return time.monotonic() - t0
        except TimeoutError:
            return None
        except (ConnectionError, ssl.SSLError, OSError):
            return time.monotonic() - t0
    return None


def _client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _server_context(identity: Identity, directory: Path) -> ssl.SSLContext:
    pem = directory / f"hostile-{secrets.token_hex(4)}.pem"
    pem.write_bytes(identity.cert_pem + identity.key_pem())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(pem)
    pem.unlink()
    return ctx


def tls_connect(
    port: int, *, source: str = "127.0.0.2", host: str = "127.0.0.1", timeout: float = DEFAULT_TIMEOUT
) -> tuple[ssl.SSLSocket, str]:
    """A finished TLS 1.3 connection and the fingerprint of the certificate the server showed."""
    raw = tcp_connect(port, source=source, host=host, timeout=timeout)
    try:
        tls = _client_context().wrap_socket(raw)
    except (OSError, ssl.SSLError):
        raw.close()
        raise
    cert = tls.getpeercert(binary_form=True) or b""
    return tls, ident.fingerprint_of_cert(cert)


# -- a TLS peer that sends anything ---------------------------------------------------------------


class HostileClient:
    """A TLS connection to an agent over which the attacker sends whatever it likes.

    Reading is independent of sending: `messages()` decodes whatever the agent sends (frames up
    to MAX_FRAME) until EOF, without any state machine, so the agent's answer to each attack can
    be asserted exactly.
    """

    def __init__(self, port: int, *, source: str = "127.0.0.2", host: str = "127.0.0.1") -> None:
        self.sock, self.server_fp = tls_connect(port, source=source, host=host)
        self._decoder = FrameDecoder(MAX_FRAME)
        self.received: list[WireMessage] = []
        self.eof = False
        self.nonce = secrets.token_bytes(NONCE_LEN)

    def __enter__(self) -> HostileClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the connection without a goodbye."""
        try:
            self.sock.close()
        except OSError:
            pass

    def send_raw(self, data: bytes) -> bool:
        """Write bytes to the TLS stream; False if the agent already closed it."""
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError):
            return False
        return True

    def send(self, *messages: WireMessage) -> bool:
        """Frame and send messages, in any state the attacker likes."""
        return self.send_raw(b"".join(message_frame(m) for m in messages))

    def hello(
        self,
        who: Identity,
        *,
        device_id: str | None = None,
        nonce: bytes | None = None,
        versions: tuple[int, ...] = (1,),
        cert: bytes | None = None,
    ) -> Hello:
        """Send a HELLO as `who` (optionally claiming another id, certificate or nonce); returns it."""
        if nonce is not None:
            self.nonce = nonce
        hello = Hello(versions, device_id or who.device_id, who.name, cert or who.cert_der, self.nonce)
        self.send(hello)
        return hello

    def server_hello(self, timeout: float = DEFAULT_TIMEOUT) -> Hello:
        """Wait for the agent's HELLO.

        :raises AssertionError: it closed or sent something else first.
        """
        for message in self.messages(timeout, stop=lambda m: isinstance(m, Hello)):
            if isinstance(message, Hello):
                return message
        raise AssertionError(f"no HELLO from the agent; got {self.received}")

    def auth(
        self, signer: Identity, server: Hello, *, client_fp: str | None = None, device_id: str | None = None
    ) -> Auth:
        """Send AUTH: `signer` signs the transcript of this session (or what the caller bends)."""
        transcript = auth_transcript(
            version=1,
            server_fingerprint=self.server_fp,
            client_fingerprint=client_fp or signer.fingerprint,
            client_nonce=self.nonce,
            server_nonce=server.nonce,
            client_device_id=device_id or signer.device_id,
            server_device_id=server.device_id,
        )
        auth = Auth(signer.sign(transcript))
        self.send(auth)
        return auth

    def messages(
        self, timeout: float = DEFAULT_TIMEOUT, stop: Callable[[WireMessage], bool] | None = None
    ) -> Iterator[WireMessage]:
        """Messages from the agent as they arrive, until EOF, `stop(message)`, or `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            while (body := self._decoder.next_frame()) is not None:
                message = decode_message(body)
                self.received.append(message)
                yield message
                if stop is not None and stop(message):
                    return
            if self.eof or (left := deadline - time.monotonic()) <= 0:
                return
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return
            except (OSError, ssl.SSLError):
                data = b""
            if not data:
                self.eof = True
            else:
                self._decoder.feed(data)

    def error_code(self, timeout: float = DEFAULT_TIMEOUT) -> ErrorCode | None:
        """Read until the agent closes; the code of its ERROR, or None if it sent none.

        :raises AssertionError: the agent kept the connection open for `timeout` seconds.
        """
        for message in self.messages(timeout):
            if isinstance(message, Error):
                code = message.code
                # After ERROR the agent must close: wait for EOF.
                for _ in self.messages(timeout):
                    pass
                if not self.eof:
                    raise AssertionError(f"the agent sent ERROR {code} but kept the connection open")
                return code
        if not self.eof:
            raise AssertionError(f"the agent neither closed nor sent ERROR within {timeout} s: {self.received}")
        return None


# -- the real machine, driven by an attacker ------------------------------------------------------


@dataclass
class Transcript:
    """What one `ProtocolClient` session saw: events, and the raw bytes each way."""

    events: list[Event] = field(default_factory=list)
    sent: bytearray = field(default_factory=bytearray)


class ProtocolClient:
    """An honest protocol client (the real `Connection`) with its own key, that can turn hostile.

    `handshake()` reaches OPEN (or a refusal); afterwards `send_raw`/`send` put anything on the
    wire, bypassing the machine, and `pump()` feeds the agent's answers back through it.
    """

    def __init__(
        self,
        port: int,
        who: Identity,
        *,
        source: str = "127.0.0.2",
        host: str = "127.0.0.1",
        nonce: bytes | None = None,
    ) -> None:
        self.who = who
        self.sock, self.server_fp = tls_connect(port, source=source, host=host)
        self.conn = Connection(Role.CLIENT, who, nonce or secrets.token_bytes(NONCE_LEN), server_fp_tls=self.server_fp)
        self.log = Transcript()
        self.peer: PeerAuthenticated | None = None
        self.closed_with: ErrorCode | None = None
        self.eof = False

    def __enter__(self) -> ProtocolClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.log.sent += data
            self.send_raw(data)

    def send_raw(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError):
            return False
        return True

    def send(self, *messages: WireMessage) -> bool:
        """Frames straight onto the wire, whatever our machine's state."""
        return self.send_raw(b"".join(message_frame(m) for m in messages))

    def pump(self, until: Callable[[Event], bool], timeout: float = DEFAULT_TIMEOUT) -> Event | None:
        """Feed the agent's bytes through our machine until an event satisfies `until`, EOF or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            while (event := self.conn.next_event()) is not None:
                self.log.events.append(event)
                if isinstance(event, PeerAuthenticated):
                    self.peer = event
                    self.conn.accept(time.monotonic())
                elif isinstance(event, PeerClosed):
                    self.closed_with = event.code
                self._flush()
                if until(event):
                    return event
                if isinstance(event, ConnectionTerminated):
                    return None
            # A PING is answered inside the machine without an event: its PONG goes out here, or
            # an honest peer that is only waiting would look dead to the agent's keepalive.
            self._flush()
            if self.eof or (left := deadline - time.monotonic()) <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            except (OSError, ssl.SSLError):
                data = b""
            self.eof = not data
            self.conn.receive_data(data, time.monotonic())

    def handshake(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """Run the honest handshake; True once OPEN, False if the agent refused or closed."""
        self.conn.initiate(time.monotonic())
        self._flush()
        try:
            event = self.pump(lambda e: isinstance(e, HandshakeComplete | PeerClosed), timeout)
        except ProtocolError:
            return False
        return isinstance(event, HandshakeComplete)

    def wait_closed(self, timeout: float = DEFAULT_TIMEOUT) -> ErrorCode | None:
        """Drain until EOF; the ERROR code the agent sent, if any (our machine may fail first)."""
        try:
            self.pump(lambda e: False, timeout)
        except ProtocolError:
            # Our machine gave up on the agent's bytes (as it should after our own garbage);
            # read the rest raw until EOF.
            closed_within(self.sock, timeout)
            self.eof = True
        return self.closed_with


# -- a hostile server the agent dials -------------------------------------------------------------

ServerScript = Callable[[ssl.SSLSocket, Identity], object]


class HostileServer:
    """A TLS listener on loopback with its own identity; each accepted connection runs `script`.

    Point an agent at it with `--peer 127.0.0.1:PORT`; set `script` to change what the next
    connection does. `connections` counts accepted TLS sessions.
    """

    def __init__(self, who: Identity, directory: Path, *, host: str = "127.0.0.1") -> None:
        self.who = who
        self._ctx = _server_context(who, directory)
        self._sock = socket.create_server((check_loopback(host), 0))
        self.port: int = self._sock.getsockname()[1]
        self.script: ServerScript | None = None
        self.started = 0  # TLS sessions accepted
        self.connections = 0  # ... whose script has finished
        self.results: list[object] = []
        self._lock = threading.Condition()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                raw, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        raw.settimeout(DEFAULT_TIMEOUT)
        try:
            tls = self._ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        with self._lock:
            self.started += 1
            script = self.script
        result: object = None
        try:
            if script is not None:
                result = script(tls, self.who)
        except Exception as exc:  # a script's failure is a test result, reported by wait_result
            result = exc
        finally:
            try:
                tls.close()
            except OSError:
                pass
        with self._lock:
            self.connections += 1
            self.results.append(result)
            self._lock.notify_all()

    def wait_idle(self, timeout: float = DEFAULT_TIMEOUT) -> list[object]:
        """Wait until every accepted connection has finished its script; all results so far, in order."""
        with self._lock:
            if not self._lock.wait_for(lambda: self.connections >= self.started, timeout):
                raise AssertionError(f"{self.started - self.connections} connections still running after {timeout} s")
            return list(self.results)

    def close(self) -> None:
        self._stop = True
        self._sock.close()


def read_messages(
    tls: ssl.SSLSocket, timeout: float, stop: Callable[[WireMessage], bool] = lambda m: False
) -> tuple[list[WireMessage], bool]:
    """Messages the agent sends on a server-side connection until `stop`, EOF or `timeout`; and if EOF came."""
    decoder = FrameDecoder(MAX_FRAME)
    out: list[WireMessage] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        while (body := decoder.next_frame()) is not None:
            out.append(decode_message(body))
            if stop(out[-1]):
                return out, False
        tls.settimeout(left)
        try:
            data = tls.recv(65536)
        except TimeoutError:
            break
        except (OSError, ssl.SSLError):
            data = b""
        if not data:
            return out, True
        decoder.feed(data)
    return out, False


def agent_error(tls: ssl.SSLSocket, timeout: float = DEFAULT_TIMEOUT) -> ErrorCode | None:
    """Read until the agent closes; the code of the ERROR it sent (None: closed without one).

    :raises AssertionError: it did not close within `timeout`.
    """
    messages, eof = read_messages(tls, timeout)
    if not eof:
        raise AssertionError(f"the agent did not close within {timeout} s: {messages}")
    codes = [m.code for m in messages if isinstance(m, Error)]
    return codes[0] if codes else None


# -- a pinned peer that shares a folder and says anything in sync messages -----------------------


def sync_body(kind: str, **fields: object) -> bytes:
    """The msgpack body of a sync message with arbitrary field values (no validation: we are the attacker)."""
    return msgpack.packb({"t": kind, **fields}, use_bin_type=True)


def wire_file(
    name: object,
    data: bytes | None,
    device_id: str,
    *,
    sequence: int = 1,
    version: dict[object, object] | None = None,
    size: int | None = None,
    block_size: int | None = None,
    hashes: bytes | None = None,
    flags: int = 0,
    mtime_ns: int = 1_700_000_000 * 10**9,
) -> list[object]:
    """A FileInfo as the wire list; `data` None is a directory. Any field can be bent."""
    if data is None:
        ftype, dsize, bs, hs = 1, 0, 0, b""
    else:
        ftype, dsize = 0, len(data)
        bs = block_size_for(len(data))
        hs = hash_bytes(data, bs)
    return [
        name, ftype, dsize if size is None else size, mtime_ns, flags,
        version if version is not None else {device_id: int(time.time())},
        sequence, bs if block_size is None else block_size, hs if hashes is None else hashes, device_id,
    ]  # fmt: skip


class SyncPeer(ProtocolClient):
    """A peer pinned on the victim that shares folder `folder`: honest handshake, then any sync message.

    `incoming()` pumps the agent's bytes through our machine (so its keepalive PINGs are answered)
    and collects the sync messages it sends; `serve()` answers its block requests.
    """

    def __init__(self, port: int, who: Identity, *, source: str = "127.0.0.3", folder: str = "default") -> None:
        super().__init__(port, who, source=source)
        self.folder = folder
        self.inbox: list[WireMessage] = []
        self.failure: ProtocolError | None = None  # our own machine refused the agent's bytes

    def __enter__(self) -> SyncPeer:
        return self

    def start(self, *, index_id: bytes | None = None) -> None:
        """Handshake, then FOLDER_HELLO with a fresh index id (the victim forgets our previous records)."""
        assert self.handshake(), f"the attacker was not admitted: {self.log.events}"
        self.send_body("folder_hello", folder=self.folder, index_id=index_id or secrets.token_bytes(16),
                       have_index_id=b"", have_sequence=0)  # fmt: skip

    def send_body(self, kind: str, **fields: object) -> bool:
        return self.send_raw(frame(sync_body(kind, **fields)))

    def announce(self, files: list[list[object]], kind: str = "index") -> bool:
        return self.send_body(kind, folder=self.folder, files=files)

    def incoming(self, until: Callable[[WireMessage], bool] = lambda m: False, timeout: float = 5.0) -> bool:
        """Collect the agent's messages into `inbox` until one satisfies `until` (True), EOF or timeout."""

        def stop(event: Event) -> bool:
            if isinstance(event, MessageReceived):
                self.inbox.append(event.message)
                return until(event.message)
            return False

        try:
            return self.pump(stop, timeout) is not None
        except ProtocolError as exc:
            self.failure = exc
            return False

    def serve(
        self,
        contents: dict[str, bytes],
        until: Callable[[], bool],
        timeout: float = 10.0,
        corrupt: Callable[[bytes], bytes] | None = None,
    ) -> int:
        """Answer block requests from `contents` (through `corrupt` if given) until `until()` or EOF; requests seen."""
        seen = 0
        deadline = time.monotonic() + timeout
        while not until() and not self.eof and self.closed_with is None and time.monotonic() < deadline:
            self.incoming(lambda m: isinstance(m, Request), timeout=0.1)
            for msg in [m for m in self.inbox if isinstance(m, Request)]:
                self.inbox.remove(msg)
                seen += 1
                data = contents.get(msg.name, b"")[msg.offset : msg.offset + msg.size]
                if corrupt is not None:
                    data = corrupt(data)
                self.send_body("response", request_id=msg.request_id, data=data, error="")
        return seen
