"""Three agents in network namespaces find each other over mDNS and converge on one folder."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

from testkit import ROOT
from testkit.agents import cli
from testkit.netns import Lan
from testkit.wait import wait_for

pytestmark = [pytest.mark.lan, pytest.mark.slow]  # real agents in network namespaces


def tree(root: Path) -> dict[str, str | None]:
    """{name: sha256 or None for a directory} under `root`, our temp files left out."""
    out: dict[str, str | None] = {}
    for dirpath, dirs, files in os.walk(root):
        if Path(dirpath) == root:
            dirs[:] = [d for d in dirs if not d.startswith(".tofu-")]  # marker, kept versions: never synced
        for d in dirs:
            out[str((Path(dirpath) / d).relative_to(root))] = None
        for f in files:
            if not f.startswith(".tofu-tmp-"):
                p = Path(dirpath) / f
                try:
                    out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
                except FileNotFoundError:  # deleted by an agent while we walked: the next look sees it
                    continue
    return out


def test_three_agents_converge_after_changes_on_each(lan3: Lan, homes: list[Path]) -> None:
    folders = [h / "folder" for h in homes]  # the default folder under --home
    for i, home in enumerate(homes):
        log = (home / "agent.log").open("a")
        lan3.popen(
            i, [sys.executable, "-m", "agent", "--home", str(home), "run", "--name", f"host{i}"],
            stdout=log, stderr=log, cwd=ROOT,
        )  # fmt: skip
        log.close()
    ids = []
    for home in homes:
        wait_for(lambda h=home: cli(h, "status", "--json").returncode == 0, 20, "an agent to start")  # type: ignore[misc]
        ids.append(cli(home, "id", "--json").stdout)

    def all_connected() -> bool:
        for home in homes:
            r = cli(home, "status", "--json")
            if r.returncode != 0 or r.stdout.count('"connected": true') < 2:
                return False
        return True

    try:
        wait_for(all_connected, 45, "every agent to connect to the two others over mDNS")
        (folders[0] / "from0").mkdir()
        (folders[0] / "from0" / "a.txt").write_bytes(b"made on host 0")
        (folders[1] / "b.bin").write_bytes(os.urandom(3_000_000))
        (folders[2] / "nested" / "deeper").mkdir(parents=True)
        (folders[2] / "nested" / "deeper" / "c.txt").write_bytes(b"made on host 2")
        wait_for(lambda: tree(folders[0]) == tree(folders[1]) == tree(folders[2]) and len(tree(folders[0])) == 6,
                 60, "all three folders to converge")  # fmt: skip
        # a second round: an edit, a delete and a rename, each on a different host
        (folders[1] / "from0" / "a.txt").write_bytes(b"edited on host 1")
        (folders[2] / "b.bin").unlink()
        (folders[0] / "nested" / "deeper" / "c.txt").rename(folders[0] / "nested" / "c-moved.txt")
        expected = {
            "from0": None,
            "from0/a.txt": hashlib.sha256(b"edited on host 1").hexdigest(),
            "nested": None,
            "nested/deeper": None,
            "nested/c-moved.txt": hashlib.sha256(b"made on host 2").hexdigest(),
        }
        wait_for(lambda: tree(folders[0]) == tree(folders[1]) == tree(folders[2]) == expected, 60,
                 "all three folders to converge again")  # fmt: skip
    except AssertionError:
        for home in homes:
            print(f"--- {home} ---\n{(home / 'agent.log').read_text()[-4000:]}")
        raise
