"""msgpack bombs: deep nesting, huge declared lengths, and containers that expand in memory."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agent.app import control
from agent.errors import ErrorCode
from agent.host.paths import resolve_paths
from agent.wire.frames import MAX_FRAME, PRE_AUTH_MAX_FRAME
from testkit.peer import HostileClient, ProtocolClient, frame, source_address
from tests.hostile.conftest import Victim

pytestmark = pytest.mark.slow  # a real agent under attack per test (one victim pair per session)

SRC = source_address(20)

# Each body fits the frame it is sent in; every one must end in ERROR(malformed) and nothing else.
DECLARED_LENGTH_BOMBS = [
    b"\xdd\xff\xff\xff\xff",  # array32 of 4 G items, then nothing
    b"\xdf\xff\xff\xff\xff",  # map32 of 4 G pairs
    b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
    b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
    b"\xc9\xff\xff\xff\xff\x01",  # ext32 of 4 GiB
    b"\x81\xa1t\xa5hello\xdd\x7f\xff\xff\xff",  # a plausible start, then a huge array
    b"\x82\xa1t\xa4auth\xa9signature\xc6\x00\x00\x10\x00" + b"\x00" * 64,  # a field claiming 4 KiB, 64 B given
]


def _nested(depth: int, opener: bytes) -> bytes:
    return opener * depth + b"\xc0"


def _pre_auth_bombs() -> list[bytes]:
    room = PRE_AUTH_MAX_FRAME - 1
    return [
        *DECLARED_LENGTH_BOMBS,
        _nested(room, b"\x91"),  # 8 K nested one-element arrays
        _nested(room // 2, b"\x81\xa0"),  # nested maps {"": {"": ...}}
        b"\xdc\x1f\xfd" + b"\x90" * (room - 3),  # an array of 8 K empty arrays
    ]


def test_pre_auth_bombs_are_malformed(victim: Victim) -> None:
    before = victim.before()
    for body in _pre_auth_bombs():
        assert len(body) <= PRE_AUTH_MAX_FRAME
        with HostileClient(victim.port, source=SRC) as c:
            c.send_raw(frame(body))
            assert c.error_code() is ErrorCode.MALFORMED, body[:16]
    victim.check_after(before)


def test_post_auth_bombs_are_malformed(victim: Victim) -> None:
    """A trusted peer's bombs of declared length and deep nesting (4 MiB frames allowed)."""
    before = victim.before()
    for body in [*DECLARED_LENGTH_BOMBS, _nested(MAX_FRAME - 1, b"\x91"), _nested(100_000, b"\x81\xa0")]:
        with ProtocolClient(victim.port, victim.probe, source=SRC) as c:
            assert c.handshake()
            c.send_raw(frame(body))
            assert c.wait_closed() is ErrorCode.MALFORMED, body[:16]
    victim.check_after(before)


def _reset_peak_rss(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        return False
    return True


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _container_bomb() -> bytes:
    """4 MiB: one array of ~4 M empty arrays. Each byte becomes a 56-byte Python list."""
    n = MAX_FRAME - 5
    return b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n


def test_container_bomb_stays_within_a_memory_and_latency_budget(victim: Victim) -> None:
    if not _reset_peak_rss(victim.pid):
        pytest.skip("cannot reset VmHWM here")
    before = victim.before()
    socket_path = resolve_paths(victim.agent.home).control_socket
    latencies: list[float] = []
    done = threading.Event()

    def ping() -> None:
        while not done.is_set():
            t0 = time.monotonic()
            control.request(socket_path, "ping", timeout=10)
            latencies.append(time.monotonic() - t0)
            done.wait(0.02)

    pinger = threading.Thread(target=ping)
    pinger.start()
    try:
        for _ in range(2):
            with ProtocolClient(victim.port, victim.probe, source=SRC) as c:
                assert c.handshake()
                c.send_raw(frame(_container_bomb()))
                assert c.wait_closed(15) is ErrorCode.MALFORMED
    finally:
        done.set()
        pinger.join()
    peak_growth = _peak_rss_kib(victim.pid) - before.rss
    stall = max(latencies)
    print(f"FIGURE container bomb: peak RSS +{peak_growth // 1024} MiB, control socket stalled {stall:.2f} s")
    victim.check_after(before, rss_slack_kib=32 * 1024)
    assert peak_growth < 64 * 1024, f"peak RSS grew by {peak_growth // 1024} MiB for one 4 MiB frame"
    assert stall < 1.0, f"the event loop stalled for {stall:.2f} s"
