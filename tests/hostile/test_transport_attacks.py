"""Attacks below the protocol: garbage before TLS, slowloris, connection floods, silence after TLS."""

from __future__ import annotations

import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from agent.errors import ErrorCode
from agent.net.transport import MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS, TLS_HANDSHAKE_TIMEOUT
from agent.wire.handshake import HANDSHAKE_TIMEOUT
from testkit.peer import HostileClient, client_hello_only, closed_within, frame, source_address, tcp_connect
from tests.hostile.conftest import PROBE_SOURCE, Victim

pytestmark = pytest.mark.slow  # a real agent under attack per test (one victim pair per session)

SLACK = 2.5  # seconds beyond a deadline before we call it missed (a loaded CI machine)


def _close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def _closed_times(socks: list[socket.socket], timeout: float) -> list[float | None]:
    with ThreadPoolExecutor(max_workers=64) as pool:
        return list(pool.map(lambda s: closed_within(s, timeout), socks))


GARBAGE = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x00" * 65536,
    secrets.token_bytes(4096),
    b"\x16\x03\x01\xff\xff" + secrets.token_bytes(300),  # a TLS record header announcing 64 KiB, then junk
    b"\x16\x03\x03\x00\x05\x01\x00\x00\x01\x00",  # a truncated, nonsensical ClientHello
    frame(b"\x81\xa1t\xa5hello"),  # our own framing, but without TLS
]


def test_garbage_before_tls_is_dropped(victim: Victim) -> None:
    before = victim.before()
    socks = []
    for i, junk in enumerate(GARBAGE * 3):
        s = tcp_connect(victim.port, source=source_address(i % 5))
        s.sendall(junk)
        socks.append(s)
    try:
        times = _closed_times(socks, TLS_HANDSHAKE_TIMEOUT + SLACK)
        assert all(t is not None for t in times), times
        assert max(t for t in times if t is not None) < 2.0, "garbage should fail TLS at once, not at the deadline"
    finally:
        _close_all(socks)
    victim.check_after(before)


def test_slowloris_half_open_tls_is_cut_at_the_tls_deadline(victim: Victim) -> None:
    """200 clients that send a ClientHello (or nothing) and then hang: all closed by the 5 s deadline."""
    before = victim.before()
    socks: list[socket.socket] = []
    t0 = time.monotonic()
    try:
        for i in range(200):
            src = source_address(i // MAX_CONNECTIONS_PER_ADDRESS)
            socks.append(client_hello_only(victim.port, source=src) if i % 2 else tcp_connect(victim.port, source=src))
        # While they hang (200 < 256), a legitimate peer from another address still gets in.
        victim.probe_handshake()
        times = _closed_times(socks, TLS_HANDSHAKE_TIMEOUT + SLACK)
        elapsed = time.monotonic() - t0
        assert all(t is not None for t in times), f"{times.count(None)} half-open connections survived"
        print(f"FIGURE slowloris: {len(socks)} half-open, all closed after {max(t for t in times if t):.1f} s")
        assert elapsed < TLS_HANDSHAKE_TIMEOUT + 2 * SLACK
    finally:
        _close_all(socks)
    victim.check_after(before)


def test_per_address_cap(victim: Victim) -> None:
    """One address gets 8 connections; the 9th and later are closed at once; others are unaffected."""
    before = victim.before()
    src = "127.0.0.2"
    socks = [tcp_connect(victim.port, source=src) for _ in range(MAX_CONNECTIONS_PER_ADDRESS + 6)]
    try:
        extra = [closed_within(s, 1.5) for s in socks[MAX_CONNECTIONS_PER_ADDRESS:]]
        assert all(t is not None for t in extra), f"connections over the per-address cap stayed open: {extra}"
        held = [closed_within(s, 0.2) for s in socks[:MAX_CONNECTIONS_PER_ADDRESS]]
        assert held == [None] * MAX_CONNECTIONS_PER_ADDRESS, "connections under the cap were closed early"
        # The cap is per address: the probe on another address is served while 127.0.0.2 is full.
        victim.probe_handshake()
    finally:
        _close_all(socks)
    victim.check_after(before)


def test_hundreds_of_connections_hit_the_total_cap_then_recover(victim: Victim) -> None:
    """320 connections from 40 addresses: about 256 are held (minus live links), the rest closed at once.

    While the total cap is full a *new* legitimate connection is refused too (that is what a global
    cap means); the already connected peer stays connected, and new peers get in as soon as the
    hostile connections time out or go.
    """
    before = victim.before()
    n_addr = 40
    socks = [
        tcp_connect(victim.port, source=source_address(i))
        for i in range(n_addr)
        for _ in range(MAX_CONNECTIONS_PER_ADDRESS)
    ]
    try:
        quick = _closed_times(socks, 1.0)
        refused = sum(t is not None for t in quick)
        held = len(socks) - refused
        print(f"FIGURE total-cap: {len(socks)} connections, {held} held, {refused} refused at once")
        assert MAX_CONNECTIONS - 4 <= held <= MAX_CONNECTIONS, f"held {held}, refused {refused}"
        # The established link survives the flood (keepalives are 1.5 s here).
        victim.agent.wait_peer(victim.legit_id, connected=True, timeout=3)
        # A new connection while the cap is full: refused at once, not hung.
        probe = tcp_connect(victim.port, source=PROBE_SOURCE)
        assert closed_within(probe, 1.5) is not None, "a connection over the total cap was not closed"
        probe.close()
    finally:
        _close_all(socks)
    victim.check_after(before)


def test_tls_then_silence_is_closed_at_the_handshake_deadline(victim: Victim) -> None:
    """Finished TLS, then nothing (or half a frame): ERROR(timeout) and close after 5 s."""
    before = victim.before()
    clients = [HostileClient(victim.port, source=source_address(i // 4)) for i in range(40)]
    try:
        for i, c in enumerate(clients):
            if i % 2:
                c.send_raw(b"\x00\x00\x10\x00" + b"\x81")  # a frame header and one byte of 4 KiB, then stall
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=40) as pool:
            codes = list(pool.map(lambda c: c.error_code(HANDSHAKE_TIMEOUT + SLACK), clients))
        elapsed = time.monotonic() - t0
        assert codes == [ErrorCode.TIMEOUT] * len(clients), codes
        print(f"FIGURE tls-silence: {len(clients)} silent after TLS, all ERROR(timeout) within {elapsed:.1f} s")
        assert elapsed < HANDSHAKE_TIMEOUT + SLACK
    finally:
        for c in clients:
            c.close()
    victim.check_after(before)
