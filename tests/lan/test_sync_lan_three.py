"""Three agents on a LAN, each starting with 50 MB the two others lack, all converge (issue 20).

The first day of three machines: each already holds its own files when the agents first start,
find each other over mDNS and pin each other on first use (the default trust policy). Every link
then carries blocks both ways at once, which deadlocked two-way links before they were full duplex.
Done: every agent holds all 150 MB byte for byte within the deadline, and `status --json` shows
each folder idle with nothing needed.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from testkit.lan import LanAgent, cleanup_all
from testkit.netns import Lan
from testkit.wait import wait_for

pytestmark = [pytest.mark.lan, pytest.mark.slow, pytest.mark.timeout(300)]

MB = 1_000_000
FILES = 10  # per agent
SIZE = 5 * MB  # per file: 50 MB per agent, 150 MB in all
DEADLINE = 120.0  # s from spawning the first agent until all three hold everything


def _fill(folder: Path, sub: str) -> dict[str, tuple[int, str]]:
    """FILES random files under folder/sub; {relative name: (size, sha256)}."""
    (folder / sub).mkdir(parents=True)
    made: dict[str, tuple[int, str]] = {}
    for i in range(FILES):
        data = os.urandom(SIZE)
        (folder / sub / f"f{i:02d}.bin").write_bytes(data)
        made[f"{sub}/f{i:02d}.bin"] = (len(data), hashlib.sha256(data).hexdigest())
    return made


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> set[str]:
    """Every file name under `root`, our temp files and the folder marker left out."""
    out: set[str] = set()
    for dirpath, dirs, files in os.walk(root):
        if Path(dirpath) == root:
            dirs[:] = [d for d in dirs if not d.startswith(".tofu-")]  # marker, kept versions
        out.update(str((Path(dirpath) / f).relative_to(root)) for f in files if not f.startswith(".tofu-tmp-"))
    return out


def _sizes_match(folder: Path, want: dict[str, tuple[int, str]]) -> bool:
    for name, (size, _) in want.items():
        try:
            if (folder / name).stat().st_size != size:
                return False
        except FileNotFoundError:
            return False
    return True


def _converged(folders: list[Path], want: dict[str, tuple[int, str]], hashed: dict[tuple[Path, str], str]) -> bool:
    """Every folder holds exactly `want`, byte for byte (sizes first; a file is hashed once it is whole)."""
    if not all(_sizes_match(f, want) for f in folders):
        return False
    for folder in folders:
        for name, (_, sha) in want.items():
            key = (folder, name)
            if hashed.get(key) != sha:
                hashed[key] = _sha(folder / name)
                if hashed[key] != sha:
                    return False
    return all(_files(f) == set(want) for f in folders)


def _idle_with_nothing_needed(agent: LanAgent, want_bytes: int) -> dict[str, Any] | None:
    """The folder entry of `status --json` (the real CLI) if it is idle, complete and needs nothing."""
    st = agent.status()
    if st is None or len(st.get("folders", [])) != 1:
        return None
    f: dict[str, Any] = st["folders"][0]
    done = (
        f["state"] == "idle"
        and f["need_files"] == 0
        and f["need_bytes"] == 0
        and f["failed_files"] == 0
        and f["files"] == 3 * FILES
        and f["bytes"] == want_bytes
        and len(f["peers"]) == 2
        and all(p["need_files"] == 0 and p["need_bytes"] == 0 for p in f["peers"])
    )
    return f if done else None


def test_three_agents_each_with_50_mb_the_others_lack_converge(lan3: Lan) -> None:
    agents = [LanAgent(lan3, i, f"host{i}") for i in range(3)]
    try:
        folders = [a.home / "f" for a in agents]
        want: dict[str, tuple[int, str]] = {}
        for i, folder in enumerate(folders):
            want |= _fill(folder, f"host{i}")
        want_bytes = sum(size for size, _ in want.values())
        hashed: dict[tuple[Path, str], str] = {}
        t0 = time.monotonic()
        for a, folder in zip(agents, folders, strict=True):
            a.spawn("--folder", str(folder))
        try:
            wait_for(lambda: _converged(folders, want, hashed), DEADLINE, "all three agents to hold all 150 MB",
                       poll=0.2)  # fmt: skip
            converged = time.monotonic() - t0
            for a in agents:
                wait_for(lambda a=a: _idle_with_nothing_needed(a, want_bytes), 30,  # type: ignore[misc]
                           f"{a.name}'s status to show its folder idle with nothing needed", poll=0.2)  # fmt: skip
        except AssertionError:
            for a in agents:
                print(f"--- {a.name} status ---\n{a.status_fast()}\n--- {a.name} log ---\n{a.log()[-5000:]}")
            raise
        for a in agents:
            assert not a.exited(), f"{a.name} exited with {a.returncode()}:\n{a.log()[-5000:]}"
            others = {b.device_id for b in agents if b is not a}
            peers = a.peers()
            assert {d for d in others if peers.get(d, {}).get("trust") == "tofu"} == others, peers
        print(f"three agents, 3 x 50 MB: converged byte for byte in {converged:.1f} s (deadline {DEADLINE:g} s)")
    finally:
        cleanup_all(agents)
