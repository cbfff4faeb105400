"""The short version of scripts/fuzz: every target for a moment, with hypothesis (no atheris needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs scripts/fuzz.py over every target

ROOT = Path(__file__).resolve().parents[2]


def test_fuzz_script_runs_every_target_and_finds_nothing() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fuzz.py"), "--seconds", "0.3", "--engine", "hypothesis"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nothing was found" in r.stdout
    assert r.stdout.count("nothing found") == 7, r.stdout
