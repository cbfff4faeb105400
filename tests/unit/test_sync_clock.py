"""Timers of the sync shell and engine run on the monotonic clock; the wall clock only dates records.

The folder shell (`SyncService._work`, what the daemon's worker thread runs for each batch) reads
the clocks itself, so these tests drive two real folder shells, each with its engine, index and
folder on disk, and replace the clocks they read with a hand-set pair. Their messages go through
the wire codec between them. Stepping the wall clock (NTP, a person setting the date) or resuming
from suspend (on Linux CLOCK_MONOTONIC does not count the time asleep, the wall clock jumps) must
neither mark a peer's in-flight requests as stalled nor move the periodic rescan.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from agent.config import Config, FolderConfig
from agent.host.paths import Paths
from agent.identity.keys import Identity
from agent.net.link import PeerLink
from agent.sync import service as service_module
from agent.sync.engine import STALL_TIMEOUT
from agent.sync.messages import Index, Response, SyncMessage
from agent.sync.service import RESCAN_INTERVAL, SyncService
from agent.sync.state import InboxKind, _Folder, _Link
from testkit.engines import A_ID, B_ID, tree, wire, write

HOUR = 3600.0
DATA = os.urandom(3 * 1024 * 1024 + 17)  # 25 blocks of 128 KiB: many requests in flight at once


class Clock:
    """Stands in for the `time` module the shell reads: both clocks set by hand."""

    def __init__(self) -> None:
        self.mono = 5_000.0  # seconds since boot, say
        self.wall = 1_700_000_000.0

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall

    def run(self, seconds: float) -> None:
        """`seconds` pass with the machine awake and no clock step."""
        self.mono += seconds
        self.wall += seconds


Item = tuple[InboxKind, _Link, SyncMessage | None]


class Side:
    """One agent's shell of folder 'default', as the daemon runs it, without the event loop's tasks."""

    def __init__(self, tmp: Path, dev: str, peer: str) -> None:
        home = tmp / dev[:1].lower()
        self.root = tmp / dev[:1]
        self.root.mkdir(exist_ok=True)
        paths = Paths(config_dir=home / "config", data_dir=home / "data", runtime_dir=home / "run", home=home)
        config = Config(folders=(FolderConfig("default", self.root),))
        self.svc = SyncService(paths, config, cast(Identity, SimpleNamespace(device_id=dev)))
        self.svc._open_folders()
        self.folder: _Folder = self.svc.folders[0]
        self.link = _Link(cast(PeerLink, object()), peer, peer[:1].lower())  # our link to `peer`
        self.inbox: list[Item] = []

    def start(self) -> None:
        self.svc._start_engine(self.folder)

    def work(self, names: set[str] | None = None) -> list[tuple[_Link, SyncMessage]]:
        """One batch: the inbox, changed `names`, the timer if due. Returns what to send."""
        items, self.inbox = self.inbox, []
        out, errors = self.svc._work(self.folder, items, names or set(), False)
        assert not errors, errors
        return out

    def stalled(self, peer: str) -> bool:
        return self.folder.engine.peers[peer].stalled

    def close(self) -> None:
        self.svc._close_folder(self.folder)
        if self.svc._executor is not None:
            self.svc._executor.shutdown()


class Pair:
    """A holds a file B lacks; messages between them are delivered (or held) by the test."""

    def __init__(self, tmp: Path) -> None:
        self.a = Side(tmp, A_ID, B_ID)
        self.b = Side(tmp, B_ID, A_ID)
        write(self.a.root / "big.bin", DATA)
        write(self.a.root / "small.txt", b"small")
        self.a.start()
        self.b.start()
        self.held: list[tuple[Side, Item]] = []  # answers from A, not delivered yet

    def connect(self) -> None:
        self.a.inbox.append(("open", self.a.link, None))
        self.b.inbox.append(("open", self.b.link, None))

    def _route(self, src: Side, out: list[tuple[_Link, SyncMessage]], hold: bool) -> None:
        dst = self.b if src is self.a else self.a
        for _, msg in out:
            if isinstance(msg, Index):
                src.inbox.append(("sent", src.link, None))  # as the send loop reports
            item: Item = ("msg", dst.link, wire(msg))
            if hold and isinstance(msg, Response):
                self.held.append((dst, item))
            else:
                dst.inbox.append(item)

    def step(self, side: Side, names: set[str] | None = None) -> None:
        """One batch of `side` (as its timer or an event starts one); its messages are sent."""
        self._route(side, side.work(names), hold=False)

    def run(self, *, hold_answers: bool = False, rounds: int = 200) -> None:
        """Deliver until quiet; with `hold_answers`, A's answers to requests stay on the wire."""
        for _ in range(rounds):
            if not (self.a.inbox or self.b.inbox):
                return
            for side in (self.a, self.b):
                self._route(side, side.work(), hold_answers)
        raise AssertionError("the two shells did not go quiet")

    def release(self) -> None:
        """The held answers arrive."""
        for dst, item in self.held:
            dst.inbox.append(item)
        self.held.clear()

    def requests_in_flight(self) -> int:
        return len(self.b.folder.engine.requests)

    def close(self) -> None:
        self.a.close()
        self.b.close()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(service_module, "time", c)
    return c


@pytest.fixture
async def pair(tmp_path: Path, clock: Clock) -> AsyncIterator[Pair]:
    p = Pair(tmp_path)  # (in the event loop: a folder shell makes anyio objects)
    yield p
    p.close()


def _synced(p: Pair) -> bool:
    return tree(p.a.root) == tree(p.b.root)


@pytest.mark.anyio
@pytest.mark.parametrize("step", [HOUR, -HOUR], ids=["forward", "back"])
async def test_a_wall_clock_step_does_not_stall_requests_in_flight(pair: Pair, clock: Clock, step: float) -> None:
    pair.connect()
    pair.run(hold_answers=True)
    assert pair.requests_in_flight() > 1, "B asked A for blocks and waits for the answers"
    clock.run(1.0)
    clock.wall += step  # the clock is set while the answers travel
    pair.b.work()  # a batch runs (the timer, an event, anything)
    assert not pair.b.stalled(A_ID), "a clock step is not two minutes of silence"
    assert pair.requests_in_flight() > 1, "nothing was written off"
    clock.run(1.0)
    pair.release()
    pair.run()
    assert _synced(pair) and (pair.b.root / "big.bin").read_bytes() == DATA
    assert not pair.b.stalled(A_ID) and not pair.b.folder.engine.failed


@pytest.mark.anyio
async def test_a_suspend_does_not_stall_requests_in_flight(pair: Pair, clock: Clock) -> None:
    pair.connect()
    pair.run(hold_answers=True)
    assert pair.requests_in_flight() > 1
    # suspended for 10 minutes: CLOCK_MONOTONIC (Linux) stands still, the wall clock jumps on resume
    clock.wall += 600.0
    clock.mono += 0.5
    pair.b.work()
    assert not pair.b.stalled(A_ID), "a resume from suspend is not ten minutes of silence"
    pair.release()
    pair.run()
    assert _synced(pair) and (pair.b.root / "big.bin").read_bytes() == DATA
    assert not pair.b.stalled(A_ID) and not pair.b.folder.engine.failed


@pytest.mark.anyio
async def test_a_peer_silent_for_the_stall_timeout_is_still_stalled(pair: Pair, clock: Clock) -> None:
    """The stall timer still runs: on the monotonic clock (the wall clock is set back meanwhile)."""
    pair.connect()
    pair.run(hold_answers=True)
    assert pair.requests_in_flight() > 1
    clock.mono += STALL_TIMEOUT - 1
    clock.wall -= HOUR
    pair.b.work()
    assert not pair.b.stalled(A_ID)
    clock.mono += 1
    pair.b.work()
    assert pair.b.stalled(A_ID)
    pair.release()  # its late answers clear the stall; the file is fetched on its retry
    clock.run(120.0)
    pair.run()
    pair.b.work()
    pair.run()
    assert _synced(pair) and not pair.b.stalled(A_ID)


@pytest.mark.anyio
@pytest.mark.parametrize("step", [HOUR, -HOUR], ids=["forward", "back"])
async def test_a_wall_clock_step_neither_brings_forward_nor_holds_back_the_rescan(
    pair: Pair, clock: Clock, step: float
) -> None:
    pair.connect()
    pair.run()
    assert _synced(pair)
    index = pair.a.folder.engine.index
    # a change no file-system event reports (nothing watches here): only the periodic full
    # rescan finds it, RESCAN_INTERVAL after the last one
    write(pair.a.root / "unwatched.txt", b"found by the rescan")
    clock.run(1.0)
    clock.wall += step
    pair.step(pair.a)
    clock.run(RESCAN_INTERVAL / 2)
    pair.step(pair.a)
    assert index.local("unwatched.txt") is None, "the clock step brought the rescan forward"
    clock.run(RESCAN_INTERVAL / 2)
    pair.step(pair.a)
    assert index.local("unwatched.txt") is not None, "the clock step held the rescan back"
    pair.run()
    assert _synced(pair) and (pair.b.root / "unwatched.txt").read_bytes() == b"found by the rescan"


@pytest.mark.anyio
async def test_versions_are_dated_by_the_wall_clock(pair: Pair, clock: Clock) -> None:
    """What is recorded still uses the wall clock: a new version's counter is at least the Unix time."""
    pair.connect()
    pair.run()
    clock.run(10.0)
    clock.wall += HOUR
    write(pair.b.root / "later.txt", b"b")
    pair.step(pair.b, names={"later.txt"})  # its file-system event
    rec = pair.b.folder.engine.index.local("later.txt")
    assert rec is not None and rec.version.get(B_ID) >= int(clock.wall)
    pair.run()
    assert (pair.a.root / "later.txt").read_bytes() == b"b"
