"""A hypothesis state machine over a client/server `Connection` pair and the two byte streams between them.

Each side's `data_to_send()` goes into a pipe towards the other side. The machine interleaves at
random: delivering the next 1..N bytes of either pipe (so frames are split at any point and
arrive in any chunking, and the two directions interleave in any order), corrupting a bit,
swapping two adjacent spans or deleting a span of the bytes still in a pipe, cutting a pipe short
with an early EOF, letting time pass (handshake deadline, keepalive), and the callers' own moves:
the trust decision after `PeerAuthenticated` (accept or refuse) and `close()`. When a side stops
(CLOSED or ERROR) its transport is closed after its last bytes: the peer then reads EOF.

The machine is honest about the API: it never feeds a side after EOF or after it failed, and it
decides only after `PeerAuthenticated`, so a `LocalProtocolError` (caller misuse) is a bug of
the connection. Checked throughout:

- nothing but `RemoteProtocolError` escapes any call, and after one the side is in ERROR;
- a client given the wrong server fingerprint never authenticates anyone, nor does the server;
- a client that shows Alice's certificate and device id without Alice's key (Mallory) is never
  authenticated by the server;
- a `PeerAuthenticated` always names the true peer's key; on the server also its device id (the
  client signs it); on the client also the server's device id unless the server-to-client bytes
  were tampered with (the server's HELLO is not signed; TLS is what protects it, and then the
  server refuses the AUTH, so the two never both open);
- both sides OPEN only with each other's true key and device id, and the same version;
- and at the end, if nothing was tampered with, cut, refused, closed or timed out and the key
  was right: delivering the rest (accepting every decision) opens both sides.
"""

from __future__ import annotations

import datetime as dt

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, event, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from agent.errors import ErrorCode, RemoteProtocolError
from agent.identity import keys as ident
from agent.identity.keys import Identity
from agent.wire.handshake import (
    Connection,
    ConnectionTerminated,
    Event,
    HandshakeComplete,
    PeerAuthenticated,
    PeerClosed,
    Role,
    State,
)

T0 = 1_000.0


def _identity(name: str) -> Identity:
    key = ec.generate_private_key(ec.SECP256R1())
    device_id = ident.new_device_id()
    cert = ident.make_certificate(key, device_id, dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    return Identity(device_id, name, key, cert.public_bytes(serialization.Encoding.DER))


ALICE, BOB, MALLORY = _identity("alice"), _identity("bob"), _identity("mallory")  # client, server, a stranger
# Mallory dialling as Alice: Alice's device id, name and certificate in HELLO, but only her own key to sign.
IMPOSTOR = Identity(ALICE.device_id, ALICE.name, MALLORY.key, ALICE.cert_der)
SIDES = ("client", "server")


class Pipe:
    """The bytes one side sent that the other has not read yet, and what happened to them."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False  # the sender closed its transport: EOF comes after `data`
        self.eof_delivered = False
        self.tampered = False  # bytes were changed, moved or removed in flight
        self.cut = False  # the stream ended early

    def __repr__(self) -> str:
        return f"Pipe({len(self.data)} bytes, eof={self.eof}, tampered={self.tampered}, cut={self.cut})"


class HandshakeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.conns: dict[str, Connection] = {}
        self.pipes = {"client": Pipe(), "server": Pipe()}  # keyed by the side that writes into it
        self.events: dict[str, list[Event]] = {"client": [], "server": []}
        self.failed: dict[str, ErrorCode | None] = {"client": None, "server": None}
        self.undecided = {"client": False, "server": False}
        self.expected_fp = BOB.fingerprint
        self.impostor = False  # the client is Mallory claiming to be Alice
        self.deliberate = False  # a caller refused or closed: no reason to expect OPEN
        self.broken = False

    # -- plumbing --------------------------------------------------------------------------------

    @staticmethod
    def other(side: str) -> str:
        return "server" if side == "client" else "client"

    def call(self, side: str, what: str, *args: object) -> None:
        """Call `what` on `side` as the shell does: only RemoteProtocolError may come out; then the
        side is ERROR and its shell sends what is queued and closes the transport."""
        conn = self.conns[side]
        try:
            getattr(conn, what)(*args)
            self.drain(side)  # calls make events too (accept: HandshakeComplete)
        except RemoteProtocolError as exc:  # the only error peer input may cause
            assert conn.state is State.ERROR, f"{side} raised {exc!r} but is {conn.state}"
            self.failed[side] = exc.code
            self.undecided[side] = False
            event(f"{side} failed: {exc.code}")
        except BaseException:
            self.broken = True  # anything else fails the example; teardown then only cleans up
            raise
        self.flush(side)

    def drain(self, side: str) -> None:
        conn = self.conns[side]
        while (ev := conn.next_event()) is not None:
            self.events[side].append(ev)
            if isinstance(ev, PeerAuthenticated):
                self.check_authenticated(side, ev)
                self.undecided[side] = True
            elif isinstance(ev, HandshakeComplete):
                assert conn.state is State.OPEN, f"{side}: HandshakeComplete in {conn.state}"

    def flush(self, side: str) -> None:
        conn, pipe = self.conns[side], self.pipes[side]
        data = conn.data_to_send()
        if data and not pipe.cut:  # after a cut, what the side still sends is lost
            assert not pipe.eof, f"{side} sent {len(data)} bytes after closing its transport"
            pipe.data += data
        if conn.state in (State.CLOSED, State.ERROR):
            pipe.eof = True

    def check_authenticated(self, side: str, ev: PeerAuthenticated) -> None:
        assert self.expected_fp == BOB.fingerprint, f"{side} authenticated {ev} with the wrong server key"
        if side == "client":
            assert ev.fingerprint == BOB.fingerprint, "the client authenticated another key than the server's"
            if not self.pipes["server"].tampered:
                assert (ev.device_id, ev.name, ev.cert_der) == (BOB.device_id, BOB.name, BOB.cert_der)
        else:
            assert not self.impostor, f"the server authenticated {ev.device_id} for a client without its key"
            assert (ev.fingerprint, ev.device_id) == (ALICE.fingerprint, ALICE.device_id), "server: not the client"
            if not self.pipes["client"].tampered:
                assert (ev.name, ev.cert_der) == (ALICE.name, ALICE.cert_der)

    def live(self, side: str) -> bool:
        return self.failed[side] is None

    def can_deliver(self, writer: str) -> bool:
        pipe = self.pipes[writer]
        reader_ok = self.live(self.other(writer)) and not pipe.eof_delivered
        return reader_ok and (bool(pipe.data) or pipe.eof)

    def deliver(self, writer: str, n: int) -> None:
        reader, pipe = self.other(writer), self.pipes[writer]
        if pipe.data:
            chunk = bytes(pipe.data[:n])
            del pipe.data[:n]
            self.call(reader, "receive_data", chunk, self.now)
        elif pipe.eof:
            pipe.eof_delivered = True
            self.call(reader, "receive_data", b"", self.now)

    # -- rules -----------------------------------------------------------------------------------

    @initialize(
        right_key=st.booleans() | st.just(True),
        impostor=st.sampled_from([False, False, True]),
        start_first=st.sampled_from(SIDES),
    )
    def start(self, right_key: bool, impostor: bool, start_first: str) -> None:
        """The client dials the server (Bob); it expects Bob's key, or by mistake Mallory's. The
        client is Alice, or Mallory pretending to be Alice without Alice's key."""
        self.expected_fp = BOB.fingerprint if right_key else MALLORY.fingerprint
        self.impostor = impostor
        event("right key" if right_key else "wrong key")
        event("impostor client" if impostor else "true client")
        client = IMPOSTOR if impostor else ALICE
        self.conns["client"] = Connection(Role.CLIENT, client, b"c" * 32, server_fp_tls=self.expected_fp)
        self.conns["server"] = Connection(Role.SERVER, BOB, b"s" * 32)
        for side in (start_first, self.other(start_first)):
            self.call(side, "initiate", self.now)

    @rule(writer=st.sampled_from(SIDES), n=st.integers(1, 300) | st.sampled_from([1, 4, 5, 10_000]))
    def deliver_bytes(self, writer: str, n: int) -> None:
        if self.can_deliver(writer):
            self.deliver(writer, n)

    @rule(writer=st.sampled_from(SIDES), at=st.integers(0, 1 << 16), bit=st.integers(0, 7))
    def corrupt(self, writer: str, at: int, bit: int) -> None:
        pipe = self.pipes[writer]
        if pipe.data:
            pipe.data[at % len(pipe.data)] ^= 1 << bit
            pipe.tampered = True

    @rule(writer=st.sampled_from(SIDES), at=st.integers(0, 1 << 16), span=st.integers(1, 64))
    def swap_spans(self, writer: str, at: int, span: int) -> None:
        """Reorder: two adjacent spans of the bytes in flight change places."""
        pipe = self.pipes[writer]
        if len(pipe.data) >= 2:
            i = at % (len(pipe.data) - 1)
            span = min(span, (len(pipe.data) - i) // 2) or 1
            a, b = pipe.data[i : i + span], pipe.data[i + span : i + 2 * span]
            if a != b:
                pipe.data[i : i + len(a) + len(b)] = b + a
                pipe.tampered = True

    @rule(writer=st.sampled_from(SIDES), at=st.integers(0, 1 << 16), span=st.integers(1, 64))
    def lose_span(self, writer: str, at: int, span: int) -> None:
        pipe = self.pipes[writer]
        if pipe.data:
            i = at % len(pipe.data)
            del pipe.data[i : i + span]
            pipe.tampered = True

    @rule(writer=st.sampled_from(SIDES), keep=st.integers(0, 1 << 16))
    def cut_short(self, writer: str, keep: int) -> None:
        """The stream ends early: the rest is lost and the reader sees EOF after what is kept."""
        pipe = self.pipes[writer]
        if not pipe.eof:
            del pipe.data[keep % (len(pipe.data) + 1) :]
            pipe.eof = pipe.cut = True

    @rule(side=st.sampled_from(SIDES), accept=st.booleans() | st.just(True))
    def decide(self, side: str, accept: bool) -> None:
        """The caller's trust decision, once its side has authenticated the peer."""
        if self.undecided[side] and self.live(side):
            self.undecided[side] = False
            if accept:
                self.call(side, "accept", self.now)
            else:
                self.deliberate = True
                self.call(side, "refuse", ErrorCode.NOT_TRUSTED, "not today", self.now)

    @rule(side=st.sampled_from(SIDES))
    def close(self, side: str) -> None:
        if self.live(side) and self.conns[side].state is not State.CLOSED:
            self.deliberate = True
            self.undecided[side] = False
            self.call(side, "close")

    @rule(seconds=st.sampled_from([0.01, 0.5, 2.0, 6.0, 16.0, 30.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        for side in SIDES:
            timer = self.conns[side].get_timer()
            if self.live(side) and timer is not None and timer <= self.now:
                self.call(side, "handle_timer", self.now)

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def open_only_with_the_true_peer(self) -> None:
        if not self.conns:
            return
        client, server = self.conns["client"], self.conns["server"]
        if self.expected_fp != BOB.fingerprint:
            assert client.peer is None and server.peer is None
        if self.impostor:
            assert server.peer is None
        if client.state is State.OPEN and server.state is State.OPEN:
            assert client.peer is not None and server.peer is not None
            assert (client.peer.device_id, client.peer.fingerprint) == (BOB.device_id, BOB.fingerprint)
            assert (server.peer.device_id, server.peer.fingerprint) == (ALICE.device_id, ALICE.fingerprint)
            assert client.version == server.version == 1
            event("both open")

    @precondition(lambda self: bool(self.conns))
    @rule()
    def finish(self) -> None:
        """Deliver everything that is left, intact and in order, accepting every decision; an
        untouched handshake with the right key then ends with both sides OPEN."""
        for _ in range(100):
            moved = False
            for side in SIDES:
                if self.undecided[side] and self.live(side):
                    self.undecided[side] = False
                    self.call(side, "accept", self.now)
                    moved = True
                if self.can_deliver(side):
                    self.deliver(side, 1 << 20)
                    moved = True
            if not moved:
                break
        self.open_only_with_the_true_peer()
        client, server = self.conns["client"], self.conns["server"]
        untouched = not (self.deliberate or any(p.tampered or p.cut for p in self.pipes.values()))
        closed_codes = {e.code for side in SIDES for e in self.events[side] if isinstance(e, PeerClosed)}
        timed_out = ErrorCode.TIMEOUT in {*self.failed.values(), *closed_codes}
        if untouched and not timed_out:
            if self.impostor and self.expected_fp == BOB.fingerprint:
                assert self.failed["server"] == ErrorCode.AUTH_FAILED, self.failed
            elif self.expected_fp == BOB.fingerprint:
                assert client.state is State.OPEN and server.state is State.OPEN, (client.state, server.state)
            else:
                assert self.failed == {"client": ErrorCode.CERT_MISMATCH, "server": None}, self.failed
                assert server.peer is None and server.state is State.CLOSED
        elif untouched:  # only the clock may have stopped it
            allowed = {None, ErrorCode.TIMEOUT, ErrorCode.CERT_MISMATCH, ErrorCode.AUTH_FAILED}
            assert set(self.failed.values()) <= allowed, self.failed
        for side in SIDES:
            evs = self.events[side]
            terminated = [i for i, e in enumerate(evs) if isinstance(e, ConnectionTerminated)]
            assert terminated in ([], [len(evs) - 1]), f"{side}: ConnectionTerminated is the last event, once"

    def teardown(self) -> None:
        if self.conns and not self.broken:
            self.finish()


HandshakeMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    database=None,  # with the fixed seed below: the same examples on every run
    suppress_health_check=[HealthCheck.too_slow],
)
seed(20261207)(HandshakeMachine)
TestHandshakeStateMachine = HandshakeMachine.TestCase
