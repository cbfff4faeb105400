"""Soak finding (seed 1000): an agent killed after a pulled file was put in place and before it was
recorded re-recorded it on restart as its own new version, concurrent with the source's later
deletion, so the deletion lost and the file came back everywhere."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from testkit.engines import A_ID, B_ID, Net, tree, write


def test_a_pulled_file_the_index_never_recorded_does_not_undo_the_sources_deletion(tmp_path: Path) -> None:
    net = Net(tmp_path, [A_ID, B_ID])
    net.connect(A_ID, B_ID)
    net.settle()
    write(net.root(B_ID) / "photos" / "p1.jpg", b"holiday" * 1000)
    net.change(B_ID)
    net.settle()
    assert tree(net.root(A_ID))["photos/p1.jpg"][0] == b"holiday" * 1000
    # A is killed after the rename of p1.jpg into place and before its index recorded it
    net.crash(A_ID)
    with sqlite3.connect(tmp_path / "A.db") as db:
        db.execute("DELETE FROM files WHERE device = '' AND name = 'photos/p1.jpg'")
    # meanwhile B deletes it; then A starts again and sees a file its index does not know
    (net.root(B_ID) / "photos" / "p1.jpg").unlink()
    net.change(B_ID)
    net.open(A_ID)
    net.connect(A_ID, B_ID)
    net.settle()
    for dev in (A_ID, B_ID):
        net.change(dev)
    net.settle()
    assert "photos/p1.jpg" not in tree(net.root(A_ID))
    assert "photos/p1.jpg" not in tree(net.root(B_ID))
    assert tree(net.root(A_ID)) == tree(net.root(B_ID))
