"""Kept versions under attack: a planted `.tofu-versions` symlink must not carry a peer's
deletion or overwrite outside the folder, and what could not be kept is not deleted either."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.sync.versioning import VERSIONS_DIR
from testkit.engines import A_ID, B_ID, Net, write


def test_a_symlinked_versions_directory_is_never_written_through(tmp_path: Path) -> None:
    (tmp_path / "n").mkdir()
    net = Net(tmp_path / "n", [A_ID, B_ID])
    net.connect(A_ID, B_ID)
    write(net.root(B_ID) / "x.txt", b"x")
    write(net.root(B_ID) / "y.txt", b"y")
    net.change(B_ID)
    net.settle()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, net.root(A_ID) / VERSIONS_DIR)  # planted by someone with access to A's disk

    (net.root(B_ID) / "x.txt").unlink()
    write(net.root(B_ID) / "y.txt", b"y, B's overwrite")
    net.change(B_ID)
    net.settle()

    assert list(outside.iterdir()) == []  # nothing went through the link
    # what could not be kept is not lost: the deletion and the overwrite waited
    assert (net.root(A_ID) / "x.txt").read_bytes() == b"x"
    assert (net.root(A_ID) / "y.txt").read_bytes() == b"y"
    assert {"x.txt", "y.txt"} <= set(net.engines[A_ID].failed)  # retried, with a warning in the log

    (net.root(A_ID) / VERSIONS_DIR).unlink()  # the link is gone: the retry keeps and applies
    net.advance(61)  # both are retried a minute later
    net.settle()
    assert (net.root(A_ID) / "y.txt").read_bytes() == b"y, B's overwrite"
    assert not (net.root(A_ID) / "x.txt").exists()
    kept = {k.name: (net.root(A_ID) / k.path).read_bytes() for k in net.engines[A_ID].list_versions()}
    assert kept == {"x.txt": b"x", "y.txt": b"y"}


def test_a_path_given_to_versions_or_restore_stays_inside_the_folder(tmp_path: Path) -> None:
    (tmp_path / "n").mkdir()
    net = Net(tmp_path / "n", [A_ID, B_ID])
    net.connect(A_ID, B_ID)
    outside = tmp_path / "n" / "outside~20260101-000000"  # looks like a kept version, one level up
    write(outside, b"not the folder's")
    a = net.engines[A_ID]
    for bad in ("../outside", "../../etc/passwd", "/etc/passwd", f"{VERSIONS_DIR}/x", "a/../../x"):
        with pytest.raises(LookupError):
            a.list_versions(bad)
        with pytest.raises(LookupError):
            a.restore(bad, None, net.now)
    assert not (net.root(A_ID).parent / "outside").exists()
