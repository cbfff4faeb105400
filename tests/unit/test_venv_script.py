"""scripts/_venv.sh installs the project once: scripts/run after scripts/test installs nothing.

The script runs against a copy of itself next to a fake `.venv/bin/python` that only logs how it
was called, so no real install happens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make_tree(tmp: Path) -> tuple[Path, Path]:
    """A project root with scripts/_venv.sh, pyproject.toml and a logging fake python; (root, log)."""
    root = tmp / "proj"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "_venv.sh", root / "scripts" / "_venv.sh")
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    log = tmp / "calls.log"
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    python.chmod(0o755)
    # The pyproject is older than anything installed from here on.
    os.utime(root / "pyproject.toml", (1_000_000_000, 1_000_000_000))
    return root, log


def source(root: Path, extras: str) -> None:
    subprocess.run(
        ["bash", "-c", 'source "$0" "$1"', str(root / "scripts" / "_venv.sh"), extras],
        check=True,
        timeout=30,
        capture_output=True,
    )


def installs(log: Path) -> list[str]:
    if not log.exists():
        return []
    return [line.split(" -e ", 1)[1] for line in log.read_text().splitlines() if " -e " in line]


def test_run_after_test_installs_nothing(tmp_path: Path) -> None:
    root, log = make_tree(tmp_path)
    source(root, "[test]")  # scripts/test
    source(root, "")  # scripts/run
    source(root, "[test]")
    assert installs(log) == [f"{root}[test]"]


def test_test_after_run_still_adds_the_extras(tmp_path: Path) -> None:
    root, log = make_tree(tmp_path)
    source(root, "")
    source(root, "[test]")
    source(root, "")
    assert installs(log) == [str(root), f"{root}[test]"]


def test_a_changed_pyproject_reinstalls(tmp_path: Path) -> None:
    root, log = make_tree(tmp_path)
    source(root, "[test]")
    later = (root / ".venv" / ".tofu-installed[test]").stat().st_mtime + 10
    os.utime(root / "pyproject.toml", (later, later))
    source(root, "")
    assert installs(log) == [f"{root}[test]", str(root)]
