"""Two agents that each start with data the other lacks: both directions at once, as on a first day.

Every earlier sync test wrote on one side and read on the other. Here both sides request many MiB
of blocks from each other at the same moment, which deadlocked the links (each side's reader
waited for its own writer while neither read).
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from pathlib import Path

import pytest

from testkit.agents import AgentProc
from testkit.homes import new_home
from testkit.wait import wait_for

MB = 1_000_000


def _fill(folder: Path, sub: str, count: int, size: int) -> dict[str, bytes]:
    (folder / sub).mkdir(parents=True)
    made: dict[str, bytes] = {}
    for i in range(count):
        data = os.urandom(size)
        (folder / sub / f"f{i}.bin").write_bytes(data)
        made[f"{sub}/f{i}.bin"] = data
    return made


def _has_all(folder: Path, want: dict[str, bytes]) -> bool:
    for name, data in want.items():
        path = folder / name
        try:
            if path.stat().st_size != len(data) or path.read_bytes() != data:
                return False
        except FileNotFoundError:
            return False
    return True


def _both_have(fa: Path, fb: Path, want: dict[str, bytes]) -> bool:
    return _has_all(fa, want) and _has_all(fb, want)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_both_sides_with_data_the_other_lacks_converge() -> None:
    """20 files of 6 MB a side, 10 times over: both converge byte for byte in under 20 s each time."""
    times: list[float] = []
    for _ in range(10):
        ha, hb = new_home(), new_home()
        fa, fb = ha / "f", hb / "f"
        want = _fill(fa, "t1", 20, 6 * MB) | _fill(fb, "t0", 20, 6 * MB)
        b = AgentProc(hb, "beta")
        a = AgentProc(ha, "alpha")
        try:
            t0 = time.monotonic()
            b.start("--folder", str(fb))
            a.start("--folder", str(fa), peers=[b])
            try:
                wait_for(functools.partial(_both_have, fa, fb, want), 20, "both sides to hold all 40 files")
            except AssertionError as exc:
                raise AssertionError(
                    f"{exc}\n--- alpha ---\n{a.log()[-3000:]}\n--- beta ---\n{b.log()[-3000:]}"
                ) from None
            times.append(time.monotonic() - t0)
        finally:
            a.kill()
            b.kill()
            for home in (ha, hb):  # hundreds of MB a run: never left behind in /tmp
                shutil.rmtree(home, ignore_errors=True)
    print(f"two-way convergence, s: {' '.join(f'{t:.1f}' for t in times)}")
