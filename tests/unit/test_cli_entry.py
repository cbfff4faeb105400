"""The `tofu-agent` entry point: a plain `status` asks the agent without importing the whole CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli.entry import status_home

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["status"], (None, False)),
        (["status", "--json"], (None, True)),
        (["--home", "/h", "status", "--json"], ("/h", True)),
        (["--home=/h", "status"], ("/h", False)),
        (["status", "--watch"], None),
        (["status", "-v"], None),
        (["--home", "", "status"], None),
        (["peers"], None),
        (["status", "status"], None),
        ([], None),
        (["--home"], None),
    ],
)
def test_only_a_plain_status_takes_the_short_way(argv: list[str], want: tuple[str | None, bool] | None) -> None:
    assert status_home(argv) == want


def test_a_plain_status_prints_what_the_agent_says_without_loading_the_trust_store(tmp_path: Path) -> None:
    code = f"""
import sys
from agent.app import control
control.request = lambda path, cmd, args=None, timeout=5.0: {{"running": True, "folders": [], "peers": []}}
from agent.cli import entry
rc = entry.main(["--home", {str(tmp_path)!r}, "status", "--json"])
print("LOADED", "agent.trust.store" in sys.modules, "cryptography" in sys.modules, rc)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    out, _, last = r.stdout.rstrip().rpartition("\n")
    assert json.loads(out) == {"folders": [], "peers": [], "running": True}
    assert last == "LOADED False False 0"


def test_status_with_no_agent_falls_back_to_the_full_cli(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "agent", "--home", str(tmp_path), "status", "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 3, r.stderr  # not running: the offline status from the full CLI
    assert json.loads(r.stdout)["running"] is False
