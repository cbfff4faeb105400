"""Nothing lost to a peer, with real agents: kept versions, `versions`/`restore`, folder types and
pausing, all through the command line a person uses. Waits are conditions with deadlines."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testkit.agents import AgentProc, cli
from testkit.homes import new_home, write_config
from testkit.wait import wait_for

pytestmark = pytest.mark.slow

X = b"x: the only copy of a week's work\n" * 300
Y = b"y: an original that a peer overwrites\n" * 5000


def _ok(home: Path, *args: str) -> Any:
    r = cli(home, *args, "--json", timeout=60)
    assert r.returncode == 0, f"{args}: {r.stdout}\n{r.stderr}"
    return json.loads(r.stdout)


def _has(path: Path, data: bytes | None) -> bool:
    try:
        return path.read_bytes() == data
    except FileNotFoundError:
        return data is None


def _folder(agent: AgentProc) -> dict[str, Any]:
    st = agent.status() or {}
    return next(f for f in st.get("folders", []) if f["id"] == "docs")


def _pair(a_type: str = "sendreceive") -> tuple[AgentProc, AgentProc]:
    ha, hb = new_home("tv-"), new_home("tv-")
    write_config(ha, f'[[folder]]\nid = "docs"\npath = "{ha / "docs"}"\ntype = "{a_type}"\n')
    write_config(hb, f'[[folder]]\nid = "docs"\npath = "{hb / "docs"}"\n')
    (hb / "docs").mkdir()
    (hb / "docs" / "x.txt").write_bytes(X)
    (hb / "docs" / "y.txt").write_bytes(Y)
    a, b = AgentProc(ha, "alpha"), AgentProc(hb, "beta")
    a.start()
    b.start(peers=[a])
    return a, b


@pytest.fixture
def pair() -> Iterator[tuple[AgentProc, AgentProc]]:
    a, b = _pair()
    try:
        yield a, b
    finally:
        for p in (a, b):
            p.kill()
            shutil.rmtree(p.home, ignore_errors=True)


def test_a_peers_deletion_and_overwrite_are_recoverable_and_restore_syncs(pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    fa, fb = a.home / "docs", b.home / "docs"
    wait_for(lambda: _has(fa / "x.txt", X) and _has(fa / "y.txt", Y), 30, "A to receive x.txt and y.txt")

    (fb / "x.txt").unlink()
    (fb / "y.txt").write_bytes(b"y, overwritten on B by mistake")
    wait_for(lambda: _has(fa / "x.txt", None) and _has(fa / "y.txt", b"y, overwritten on B by mistake"), 30,
             "B's deletion and overwrite to reach A")  # fmt: skip

    kept = _ok(a.home, "versions")["versions"]
    by_name = {k["name"]: k for k in kept}
    assert set(by_name) == {"x.txt", "y.txt"}, kept
    assert (fa / by_name["x.txt"]["path"]).read_bytes() == X  # byte for byte
    assert (fa / by_name["y.txt"]["path"]).read_bytes() == Y
    idb = _ok(b.home, "id")["device_id"]
    assert {k["by"] for k in kept} == {idb}  # which device's change replaced them
    assert _ok(a.home, "versions", "docs", "y.txt")["versions"] == [by_name["y.txt"]]
    text = cli(a.home, "versions").stdout
    assert "x.txt" in text and "replaced by beta" in text

    _ok(a.home, "restore", "docs", "x.txt")
    _ok(a.home, "restore", "docs", "y.txt")
    wait_for(lambda: _has(fb / "x.txt", X) and _has(fb / "y.txt", Y), 30, "the restored files to reach B")
    assert _has(fa / "x.txt", X) and _has(fa / "y.txt", Y)
    # B's overwrite, which the restore replaced on B, is kept there too
    assert any(k["name"] == "y.txt" for k in _ok(b.home, "versions")["versions"])

    r = cli(a.home, "restore", "docs", "never-there.txt")
    assert r.returncode != 0 and "no kept version" in r.stderr


def test_pausing_a_folder_or_a_device_moves_no_data_until_resumed(pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    fa, fb = a.home / "docs", b.home / "docs"
    wait_for(lambda: _has(fa / "y.txt", Y), 30, "A to receive y.txt")
    idb = _ok(b.home, "id")["device_id"]

    _ok(a.home, "folder", "pause", "docs")
    wait_for(lambda: _folder(a)["state"] == "paused" and not _folder(a)["peers"], 15, "A's folder to be paused")
    (fb / "z.txt").write_bytes(b"z while A's folder is paused")
    wait_for(lambda: _folder(b)["files"] == 3, 15, "B to record z.txt")
    assert not (fa / "z.txt").exists()
    _ok(a.home, "folder", "resume", "docs")
    wait_for(lambda: _has(fa / "z.txt", b"z while A's folder is paused"), 30, "z.txt to reach A after resume")

    _ok(a.home, "trust", "pause", idb)
    wait_for(lambda: not _folder(a)["peers"], 15, "A to stop syncing with B")
    assert a.wait_peer(idb, connected=True, trust="tofu")  # the connection and trust stay
    (fb / "w.txt").write_bytes(b"w while B is paused on A")
    wait_for(lambda: _folder(b)["files"] == 4, 15, "B to record w.txt")
    assert not (fa / "w.txt").exists()
    _ok(a.home, "trust", "resume", idb)
    wait_for(lambda: _has(fa / "w.txt", b"w while B is paused on A"), 30, "w.txt to reach A after resume")


@pytest.mark.parametrize("a_type", ["receiveonly", "sendonly"])
def test_folder_types_hold_back_one_way_until_revert_or_override(a_type: str) -> None:
    a, b = _pair(a_type)
    fa, fb = a.home / "docs", b.home / "docs"
    try:
        if a_type == "receiveonly":
            wait_for(lambda: _has(fa / "x.txt", X), 30, "A to receive x.txt")
            (fa / "x.txt").write_bytes(b"x edited on a receive-only machine")
            wait_for(lambda: _folder(a)["locally_changed"] == 1, 15, "A to flag its local change")
            assert _has(fb / "x.txt", X)  # not sent
            assert _ok(a.home, "folder", "revert", "docs")["reverted"] == 1
            wait_for(lambda: _has(fa / "x.txt", X), 30, "revert to bring B's x.txt back")
            assert _folder(a)["locally_changed"] == 0
            kept = _ok(a.home, "versions", "docs", "x.txt")["versions"]
            assert [(fa / k["path"]).read_bytes() for k in kept] == [b"x edited on a receive-only machine"]
        else:
            (fa / "own.txt").write_bytes(b"the send-only machine's file")
            wait_for(lambda: _has(fb / "own.txt", b"the send-only machine's file"), 30, "own.txt to reach B")
            wait_for(lambda: _folder(a)["remote_differs"] == 2, 15, "A to count B's x.txt and y.txt")
            assert not (fa / "x.txt").exists()  # B's files are never applied on A
            (fb / "own.txt").write_bytes(b"B edits the send-only machine's file")
            wait_for(lambda: _folder(a)["remote_differs"] == 3, 15, "A to count B's edit")
            assert _has(fa / "own.txt", b"the send-only machine's file")
            _ok(a.home, "folder", "override", "docs")
            wait_for(
                lambda: _has(fb / "own.txt", b"the send-only machine's file") and not (fb / "x.txt").exists(), 30,
                "A's state to win on B",
            )  # fmt: skip
            names = {k["name"] for k in _ok(b.home, "versions")["versions"]}
            assert {"x.txt", "y.txt", "own.txt"} <= names  # B lost nothing: its files are versions there
    finally:
        for p in (a, b):
            p.kill()
            shutil.rmtree(p.home, ignore_errors=True)
