"""A pull that is not committed (a local edit won, a newer record replaced it) leaves no temp file
behind once the name is no longer needed: not until the next restart, as before."""

from __future__ import annotations

from pathlib import Path

from agent.sync.names import TEMP_PREFIX
from testkit.engines import A_ID, B_ID, Net, tree, write


def temps(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(TEMP_PREFIX + "*"))


def test_a_local_edit_that_wins_over_a_pull_in_progress_leaves_no_temp(tmp_path: Path) -> None:
    net = Net(tmp_path, [A_ID, B_ID])
    net.connect(A_ID, B_ID)
    net.settle()
    write(net.root(B_ID) / "doc.bin", b"b" * 600_000, mtime_s=net.wall - 100)
    net.change(B_ID)
    a = net.engines[A_ID]
    # deliver until A has started pulling doc.bin (its temp file exists), then edit it on A
    while "doc.bin" not in a.jobs:
        assert net.step(limit=1), "A never started pulling"
    assert len(temps(net.root(A_ID))) == 1
    write(net.root(A_ID) / "doc.bin", b"a" * 1000, mtime_s=net.wall + 100)  # newer: A's edit wins
    net.settle()
    net.change(A_ID, ["doc.bin"])
    net.settle()
    assert tree(net.root(A_ID)) == tree(net.root(B_ID))
    assert tree(net.root(A_ID))["doc.bin"][0] == b"a" * 1000
    assert temps(net.root(A_ID)) == [] and temps(net.root(B_ID)) == []


def test_a_temp_kept_at_start_for_resuming_goes_when_the_name_is_no_longer_needed(tmp_path: Path) -> None:
    net = Net(tmp_path, [A_ID, B_ID])
    net.connect(A_ID, B_ID)
    net.settle()
    write(net.root(B_ID) / "doc.bin", b"b" * 600_000, mtime_s=net.wall - 100)
    net.change(B_ID)
    a = net.engines[A_ID]
    while "doc.bin" not in a.jobs:
        assert net.step(limit=1), "A never started pulling"
    net.crash(A_ID)  # the temp stays for resuming
    net.open(A_ID)  # the start keeps the temp: doc.bin is still needed
    assert len(temps(net.root(A_ID))) == 1
    write(net.root(A_ID) / "doc.bin", b"a" * 1000, mtime_s=net.wall + 100)  # written as the agent starts
    net.change(A_ID, ["doc.bin"])
    net.connect(A_ID, B_ID)
    net.settle()
    assert tree(net.root(A_ID))["doc.bin"][0] == b"a" * 1000
    assert tree(net.root(A_ID)) == tree(net.root(B_ID))
    assert temps(net.root(A_ID)) == []
