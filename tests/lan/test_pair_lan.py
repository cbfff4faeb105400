"""`tofu-agent pair` finding the waiting side over real mDNS, in private network namespaces only."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.netns import Lan

pytestmark = [pytest.mark.lan, pytest.mark.slow]  # real agents in network namespaces

ROOT = Path(__file__).resolve().parents[2]
AGENT = [sys.executable, "-m", "agent"]


def _peers(home: Path) -> dict[str, str]:
    r = subprocess.run([*AGENT, "--home", str(home), "peers", "--json"], capture_output=True, text=True, check=True)
    return {p["device_id"]: p["trust"] for p in json.loads(r.stdout)}


def test_pair_finds_the_waiting_side_by_its_number_over_mdns(homes: list[Path]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with Lan(2) as lan:
        waiting = lan.popen(
            0,
            [*AGENT, "--home", str(homes[0]), "pair", "--json", "--timeout", "30"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert waiting.stdout is not None
        ready, _, _ = select.select([waiting.stdout], [], [], 20)
        assert ready, "the waiting side printed nothing"
        code = json.loads(waiting.stdout.readline())["code"]
        joined = lan.run(1, [*AGENT, "--home", str(homes[1]), "pair", code, "--timeout", "20"], check=False, env=env)
        _, err = waiting.communicate(timeout=20)
        assert joined.returncode == 0, joined.stderr
        assert waiting.returncode == 0, err
    assert list(_peers(homes[0]).values()) == ["verified"]
    assert list(_peers(homes[1]).values()) == ["verified"]


def test_joining_with_an_unknown_number_finds_nothing(homes: list[Path]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with Lan(1) as lan:
        r = lan.run(
            0, [*AGENT, "--home", str(homes[1]), "pair", "5-abandon-ability", "--timeout", "3"], check=False, env=env
        )
    assert r.returncode == 1 and "found no device waiting with pairing number 5" in r.stderr
