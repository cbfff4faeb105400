"""Send-only and receive-only folders: what each holds back, and override / revert."""

from __future__ import annotations

from pathlib import Path

from agent.sync.folder_type import FolderType
from testkit.engines import A_ID, B_ID, Net, tree, write


def _net(tmp_path: Path, a_type: FolderType) -> Net:
    net = Net(tmp_path, [A_ID, B_ID], types={A_ID: a_type})
    net.connect(A_ID, B_ID)
    write(net.root(B_ID) / "x.txt", b"x from B")
    write(net.root(B_ID) / "y.txt", b"y from B")
    net.change(B_ID)
    net.settle()
    return net


def _kept(net: Net, dev: str) -> list[bytes]:
    return sorted((net.root(dev) / k.path).read_bytes() for k in net.engines[dev].list_versions())


def test_receive_only_applies_peers_changes_and_never_sends_its_own(tmp_path: Path) -> None:
    net = _net(tmp_path, FolderType.RECEIVEONLY)
    a = net.engines[A_ID]
    assert tree(net.root(A_ID)) == tree(net.root(B_ID))  # remote changes are applied
    write(net.root(A_ID) / "x.txt", b"x edited on A")
    write(net.root(A_ID) / "new.txt", b"only on A")
    net.change(A_ID)
    net.settle()
    assert (net.root(B_ID) / "x.txt").read_bytes() == b"x from B"  # not sent
    assert not (net.root(B_ID) / "new.txt").exists()
    assert a.status().locally_changed == 2 and a.status().type == "receiveonly"

    # a peer's change to a locally changed name wins; ours is kept as a version
    write(net.root(A_ID) / "y.txt", b"y edited on A")
    net.change(A_ID)
    write(net.root(B_ID) / "y.txt", b"y, B's second")
    net.change(B_ID)
    net.settle()
    assert (net.root(A_ID) / "y.txt").read_bytes() == b"y, B's second"
    assert b"y edited on A" in _kept(net, A_ID)

    net._send(A_ID, a.revert(net.now))
    net.settle()
    assert tree(net.root(A_ID)) == tree(net.root(B_ID))
    assert (net.root(A_ID) / "x.txt").read_bytes() == b"x from B"
    assert a.status().locally_changed == 0
    assert {b"x edited on A", b"only on A"} <= set(_kept(net, A_ID))
    assert (net.root(B_ID) / "x.txt").read_bytes() == b"x from B"  # the revert sent nothing either


def test_send_only_ignores_peers_changes_until_override_wins_everywhere(tmp_path: Path) -> None:
    net = _net(tmp_path, FolderType.SENDONLY)
    a = net.engines[A_ID]
    assert tree(net.root(A_ID)) == {}  # nothing of B's is applied
    write(net.root(A_ID) / "x.txt", b"x from A")
    net.change(A_ID)
    net.settle()
    assert (net.root(B_ID) / "x.txt").read_bytes() == b"x from A"  # local changes go out

    write(net.root(B_ID) / "x.txt", b"x edited on B")
    net.change(B_ID)
    net.settle()
    assert (net.root(A_ID) / "x.txt").read_bytes() == b"x from A"
    differs = sorted(a.rules.differs)
    assert differs[1:] == ["x.txt", "y.txt"] and ".sync-conflict-" in differs[0]  # B's x lost to A's first
    assert a.status().remote_differs == 3 and a.status().type == "sendonly"

    net.advance(1)
    net._send(A_ID, a.override(net.now))
    net.settle()
    assert tree(net.root(B_ID)) == tree(net.root(A_ID)) == {"x.txt": (b"x from A", False)}
    assert a.status().remote_differs == 0
    assert {b"x edited on B", b"y from B"} <= set(_kept(net, B_ID))  # B loses nothing either
