"""Heap and collector settings of the agent process (agent.host.memtrim)."""

from __future__ import annotations

import subprocess
import sys

from agent.host import memtrim


def test_settle_gc_freezes_startup_objects_and_raises_the_young_threshold() -> None:
    # in a child process: freezing changes the collector of the whole interpreter
    code = (
        "import gc; from agent.host import memtrim; before = gc.get_freeze_count(); memtrim.settle_gc(); "
        "print(before, gc.get_freeze_count(), gc.get_threshold()[0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, after, young = map(int, out)
    assert before == 0 and after > 1000, "what start-up made is out of the collector's view"
    assert young == memtrim.GC_YOUNG_THRESHOLD


def test_the_agent_settles_the_collector_before_it_serves() -> None:
    import inspect

    from agent.app import daemon

    src = inspect.getsource(daemon.run)
    assert src.index("settle_gc()") < src.index("anyio.run(serve_until_stopped")
