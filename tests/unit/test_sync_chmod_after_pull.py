"""Soak finding (seed 2026, 5 agents, final code): a chmod +x made right after a pulled file was put
in place kept its inode and mtime, so its event passed for our own rename and was dropped; the exec
bit stayed unsynced until the 5-minute rescan."""

from __future__ import annotations

import os
from pathlib import Path

from testkit.engines import A_ID, B_ID, Net, tree, write


def test_a_chmod_right_after_a_pull_is_a_local_change(tmp_path: Path) -> None:
    net = Net(tmp_path, [A_ID, B_ID])
    net.connect(A_ID, B_ID)
    net.settle()
    write(net.root(B_ID) / "run.sh", b"#!/bin/sh\necho hi\n")
    net.change(B_ID)
    net.settle()
    assert tree(net.root(A_ID))["run.sh"] == (b"#!/bin/sh\necho hi\n", False)
    os.chmod(net.root(A_ID) / "run.sh", 0o755)  # noqa: S103 - before the event of our own rename came back
    net.change(A_ID, ["run.sh"])
    net.settle()
    assert tree(net.root(B_ID))["run.sh"] == (b"#!/bin/sh\necho hi\n", True)
