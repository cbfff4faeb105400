"""Files written while an agent starts reach its peer within seconds, not at the 5-minute rescan.

A service that starts at login while a download or a backup writes into the folder: the first
scan hashed a file mid-write, skipped it ("the next event or scan finds it"), and no watcher
existed yet to send that event.
"""

from __future__ import annotations

import functools
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from testkit.agents import AgentProc
from testkit.homes import new_home
from testkit.wait import wait_for

MB = 1_000_000
FILES = 24
SIZE = 4 * MB
PIECE = 512 * 1024
PACE = 0.012  # seconds between pieces: the writing spans the agent's start and first scan (~2.5 s)
REPEAT = 20
WITHIN = 5.0  # seconds after the last write


class Writer(threading.Thread):
    """Writes FILES files of SIZE bytes into `folder` the way a program does, and notes when it ended."""

    def __init__(self, folder: Path) -> None:
        super().__init__(daemon=True)
        self.folder = folder
        self.data = {f"w{i}.bin": os.urandom(SIZE) for i in range(FILES)}
        self.finished = 0.0

    def run(self) -> None:
        for name, data in self.data.items():
            with open(self.folder / name, "wb") as out:
                for start in range(0, len(data), PIECE):  # in pieces, as a download arrives
                    out.write(data[start : start + PIECE])
                    out.flush()
                    time.sleep(PACE)  # the schedule of the writer, not a synchronisation
        self.finished = time.monotonic()


def _arrived(folder: Path, want: dict[str, bytes]) -> bool:
    for name, data in want.items():
        try:
            if (folder / name).read_bytes() != data:
                return False
        except FileNotFoundError:
            return False
    return True


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_files_written_while_the_agent_starts_reach_the_peer_within_seconds() -> None:
    lags: list[float] = []
    for _ in range(REPEAT):
        ha, hb = new_home(), new_home()
        fa, fb = ha / "f", hb / "f"
        fa.mkdir()
        (fa / "old.txt").write_text("there before the start")  # an existing folder, as at login
        b = AgentProc(hb, "beta").start("--folder", str(fb))
        a = AgentProc(ha, "alpha")
        writer = Writer(fa)
        try:
            writer.start()  # with the agent's start, not after it
            a.start("--folder", str(fa), peers=[b])
            writer.join(60)
            assert writer.finished, "the writer did not finish"
            try:
                wait_for(
                    functools.partial(_arrived, fb, writer.data),
                    max(0.0, writer.finished + WITHIN - time.monotonic()),
                    f"beta to hold all {FILES} files within {WITHIN:g} s of the last write",
                )
            except AssertionError as exc:
                missing = sorted(n for n in writer.data if not (fb / n).exists())
                raise AssertionError(f"{exc}; missing on beta: {missing}\n--- alpha ---\n{a.log()[-3000:]}") from None
            lags.append(time.monotonic() - writer.finished)
            st = a.status()
            assert st is not None
        finally:
            a.kill()
            b.kill()
            for home in (ha, hb):  # hundreds of MB a run: never left behind in /tmp
                shutil.rmtree(home, ignore_errors=True)
    print(f"seconds from the last write to the peer holding every file: {' '.join(f'{t:.1f}' for t in lags)}")
