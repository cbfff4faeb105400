"""Soak finding (seed 7, 5 agents, power cuts): directories a person deleted came back on every
machine. An agent killed after making a peer's directory and before recording it found that
directory at its next start and recorded it as its own new version; that version was concurrent
with the peer's later deletion, and a live directory beats a deletion, so the peer made it again.
A directory that appears on disk and that a peer has is now recorded as the peer's version."""

from __future__ import annotations

from pathlib import Path

from agent.sync.index import FolderIndex
from testkit.engines import A_ID, B_ID, Net, tree


def test_a_directory_made_before_a_crash_does_not_outlive_the_peers_deletion(tmp_path: Path) -> None:
    net = Net(tmp_path, [A_ID, B_ID])
    net.connect(A_ID, B_ID)
    (net.root(B_ID) / "D" / "sub").mkdir(parents=True)
    net.change(B_ID)
    net.settle()
    assert (net.root(A_ID) / "D" / "sub").is_dir()
    net.crash(A_ID)
    # what the kill left: the directories are on A's disk, A's own records of them are not
    index = FolderIndex(tmp_path / "A.db")
    index.forget_local(["D", "D/sub"])
    index.close()

    (net.root(B_ID) / "D" / "sub").rmdir()
    (net.root(B_ID) / "D").rmdir()
    net.change(B_ID)
    net.settle()
    net.open(A_ID)
    net.connect(A_ID, B_ID)
    net.settle()
    assert tree(net.root(A_ID)) == tree(net.root(B_ID)) == {}
    assert net.engines[A_ID].index.local("D/sub").deleted  # type: ignore[union-attr]


def test_a_directory_a_person_makes_again_after_deleting_it_is_a_new_version(tmp_path: Path) -> None:
    net = Net(tmp_path, [A_ID, B_ID])
    net.connect(A_ID, B_ID)
    (net.root(B_ID) / "D").mkdir()
    net.change(B_ID)
    net.settle()
    (net.root(A_ID) / "D").rmdir()
    net.change(A_ID)
    net.settle()
    assert not (net.root(B_ID) / "D").exists()
    (net.root(A_ID) / "D").mkdir()  # made again on purpose: not B's old version
    net.change(A_ID)
    net.settle()
    assert (net.root(B_ID) / "D").is_dir()
