"""The short version of bench/crash_loop.py: a few SIGKILLs during pairing churn."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_crash_loop_short() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "crash_loop.py"), "--kills", "3", "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "no failures" in r.stdout
