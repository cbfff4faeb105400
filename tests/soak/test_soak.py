"""The short soak (issue 21): a few fixed seeds of three real agents on loopback, about 2 minutes in all.

Each seed runs a 20-second schedule of file operations on every machine at once (the third machine
joins mid-run with its own data) with SIGTERM/SIGKILL restarts, bursts of writes while an agent
starts, pauses and key rotations, then waits for convergence and runs the checker over the
history. Files stay small here (at most 4 MiB) so the run fits two cores; `scripts/soak` runs the
long version. A failure prints the checker's findings and the one command that replays the seed.
"""

from __future__ import annotations

import shutil

import pytest

from tests.soak.__main__ import summary
from tests.soak.runner import Soak, SoakConfig

SEEDS = [101, 202, 303]

# Failures of a bug that is open and has its own strict-xfail test; the soak reports them but they
# do not fail this test. Remove an entry when its bug is fixed (its xfail test then XPASSes and fails).
# (The leftover temp of a cancelled pull was one, until d3d9ca5: tests/soak/test_leftover_temp.py.)
KNOWN_OPEN: tuple[str, ...] = ()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", SEEDS)
def test_soak_seed(seed: int) -> None:
    cfg = SoakConfig(
        seed=seed,
        agents=3,
        minutes=1 / 3,
        max_mb=4.0,
        initial_mb=3.0,
        converge_timeout=60.0,
        gap=0.3,
        fault_gap=3.0,
    )
    result = Soak(cfg).run()
    print(summary(result))
    unknown = [f for f in result.report.failures if not f.startswith(KNOWN_OPEN)]
    assert not unknown, summary(result)
    if result.kept:  # only known failures: nothing to keep
        shutil.rmtree(result.run_dir, ignore_errors=True)
    assert sum(result.ops.values()) > 50, summary(result)
    assert result.converge_s is not None
