"""A file a scan skipped because it was being written is looked at again within seconds, with no
file-system event (none comes while the agent starts, before its watch is in place)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.sync.engine import RECHECK_FIRST, RECHECK_MAX, SyncEngine
from agent.sync.model import FileInfo
from testkit.engines import A_ID, B_ID, Net, tree, write


def _changing(eng: SyncEngine, name: str, times: int) -> list[int]:
    """Make the scanner see `name` change while hashing it the next `times` times; counts the calls."""
    real = eng.scanner.hash_file
    calls = [0]

    def hash_file(n: str) -> FileInfo | None:
        if n == name:
            calls[0] += 1
            if calls[0] <= times:
                return None  # as when its size or mtime moved during the hash
        return real(n)

    eng.scanner.hash_file = hash_file  # type: ignore[method-assign,assignment]
    return calls


def test_a_file_skipped_mid_write_reaches_the_peer_without_an_event(tmp_path: Path) -> None:
    net = Net(tmp_path, [A_ID, B_ID])
    net.connect(A_ID, B_ID)
    net.settle()
    eng = net.engines[A_ID]
    write(net.root(A_ID) / "download.bin", b"d" * 100_000)
    calls = _changing(eng, "download.bin", 1)
    net.change(A_ID, ["download.bin"])
    net.settle()
    assert calls[0] == 1 and "download.bin" not in tree(net.root(B_ID))
    assert eng.status().state == "scanning", "a folder with a file to look at again is not idle"
    assert eng.get_timer() <= net.mono + RECHECK_FIRST
    net.advance(RECHECK_FIRST)
    net._send(A_ID, eng.handle_timer(net.now))  # the timer alone, no event
    net.settle()
    assert tree(net.root(B_ID))["download.bin"][0] == b"d" * 100_000
    assert eng.status().state == "idle" and not eng.recheck


@pytest.mark.parametrize("start", [True, False], ids=["at-start", "on-event"])
def test_a_file_that_keeps_changing_is_looked_at_with_backoff(tmp_path: Path, start: bool) -> None:
    net = Net(tmp_path, [A_ID])
    eng = net.engines[A_ID]
    write(net.root(A_ID) / "log.bin", b"l" * 10_000)
    calls = _changing(eng, "log.bin", 6)
    if start:
        eng.start(net.now)
    else:
        net.change(A_ID, ["log.bin"])
    delays = []
    while calls[0] <= 6:
        due = eng.get_timer()
        delays.append(due - net.mono)
        net.advance(due - net.mono)
        eng.handle_timer(net.now)
        while eng.scan_pending:
            eng.continue_scan(net.now)
    assert delays == [min(RECHECK_MAX, RECHECK_FIRST * 2**i) for i in range(6)]
    assert eng.index.local("log.bin") is not None and not eng.recheck
