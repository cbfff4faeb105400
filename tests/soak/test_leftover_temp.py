"""Soak finding (seeds 1 and 3): the temp file of a pull that the source cancels mid-transfer stays.

The soak saw `.tofu-tmp-*` files left in folders that had converged (every agent idle, nothing
needed), each the temp of a name its writer deleted or renamed away while a peer was pulling it.
The agent removed stale temps only when it started (`SyncEngine.start`), so a long-running agent
kept them, up to the size of the file, until its next restart; since d3d9ca5 the engine deletes
the temp of a name once it is no longer needed.

Deterministic: B starts pulling a 64 MB file from A; A is paused (SIGSTOP) as soon as B holds a
temp file, so the pull cannot finish; the file is deleted on A, A resumes and announces the
deletion. B must end idle without the file and without the temp file.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from testkit.agents import AgentProc
from testkit.homes import new_home
from testkit.wait import wait_for


def _temps(folder: Path) -> list[Path]:
    return list(folder.rglob(".tofu-tmp-*"))


def _idle_without(agent: AgentProc, path: Path) -> bool:
    st = agent.status() or {}
    folders = st.get("folders", [])
    return bool(folders) and folders[0]["state"] == "idle" and folders[0]["need_files"] == 0 and not path.exists()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_temp_of_a_pull_cancelled_by_a_deletion_is_removed() -> None:
    ha, hb = new_home(), new_home()
    fa, fb = ha / "f", hb / "f"
    fa.mkdir()
    (fa / "big.bin").write_bytes(os.urandom(64 * 1024 * 1024))
    a, b = AgentProc(ha, "alpha"), AgentProc(hb, "beta")
    try:
        a.start("--folder", str(fa))
        b.start("--folder", str(fb), peers=[a])
        wait_for(lambda: _temps(fb), 30, "beta to start pulling big.bin")
        assert a.proc is not None
        a.proc.send_signal(signal.SIGSTOP)
        (fa / "big.bin").unlink()
        a.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: _idle_without(b, fb / "big.bin"), 30, "beta idle without big.bin")
        wait_for(lambda: not _temps(fb), 10, f"beta to drop its temp file ({_temps(fb)})")
    finally:
        a.kill()
        b.kill()
        shutil.rmtree(ha, ignore_errors=True)
        shutil.rmtree(hb, ignore_errors=True)
