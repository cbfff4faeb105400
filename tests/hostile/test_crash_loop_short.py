"""The short version of bench/crash_loop.py: two SIGKILLs each during pairing churn, folder sync and key rotation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # SIGKILLs real agents again and again (bench/crash_loop.py, short)

ROOT = Path(__file__).resolve().parents[2]


def test_crash_loop_short() -> None:
    argv = ["--during", "all", "--kills", "2", "--seed", "1", "--big-mib", "8", "--small", "50", "--timeout", "40"]
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "crash_loop.py"), *argv],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "no failures" in r.stdout
    assert "| sync | 2 |" in r.stdout and "| writing | 2 |" in r.stdout and "| rotate | 2 |" in r.stdout, r.stdout[
        -3000:
    ]
