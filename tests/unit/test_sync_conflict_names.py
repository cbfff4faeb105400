"""Soak finding (seed 5): two losing versions by one device within one second share a conflict-copy
name; the second rename failed with EEXIST on every retry and the file stayed stuck for good."""

from __future__ import annotations

from pathlib import Path

from testkit.engines import A_ID, B_ID, Net, tree, write

T = 1_699_990_000.0  # a second in which A writes twice


def _conflict(net: Net, ours: bytes, ours_mtime: float, theirs: bytes, theirs_mtime: float) -> None:
    """A and B change b2.txt without seeing each other; B's later mtime wins."""
    write(net.root(A_ID) / "b2.txt", ours, ours_mtime)
    write(net.root(B_ID) / "b2.txt", theirs, theirs_mtime)
    net.change(A_ID, ["b2.txt"])
    net.change(B_ID, ["b2.txt"])
    net.settle()


def test_two_losing_versions_in_one_second_both_survive_as_conflict_copies(tmp_path: Path) -> None:
    net = Net(tmp_path, [A_ID, B_ID])
    net.connect(A_ID, B_ID)
    net.settle()
    _conflict(net, b"a, first", T + 0.1, b"b, first", T + 50)
    _conflict(net, b"a, second", T + 0.5, b"b, second", T + 60)
    for dev in (A_ID, B_ID):
        net.change(dev)
    net.settle()
    a, b = tree(net.root(A_ID)), tree(net.root(B_ID))
    assert a == b
    assert a["b2.txt"][0] == b"b, second"
    kept = sorted(data for name, (data, _) in a.items() if ".sync-conflict-" in name and data is not None)
    assert kept == [b"a, first", b"a, second"], sorted(a)
    assert not net.engines[A_ID].failed and not net.engines[B_ID].failed
