"""Time from starting agent B to A and B both showing each other connected, over mDNS in namespaces.

Each run builds a fresh two-host LAN (testkit/netns.py: network namespaces on a private bridge, so
no mDNS cache survives from one run to the next) and fresh homes, starts agent A and waits until
it is advertised, then starts agent B and polls both control sockets every 20 ms. Besides the
pairing time it prints when B's control socket first answered (process start-up), when each side
first listed the other (mDNS browse and resolve, or an inbound connection) and when each side
showed the other connected. Needs root; run from the repository root:

    sudo .venv/bin/python -m bench.pairing_time --runs 7

`--order` picks which side dials (the lower device id does): `random` (new ids each run, as in
real life), `b-dials`, `a-dials`, or `alternate`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/X.py` as well as `python -m bench.X`

from testkit.lan import LanAgent, cleanup_all  # noqa: E402
from testkit.netns import Lan, netns_available  # noqa: E402
from testkit.wait import wait_for  # noqa: E402

POLL = 0.02
PAIR_TIMEOUT = 20.0


@dataclass(slots=True)
class Run:
    """Seconds from spawning B (None: never happened within the timeout)."""

    dialler: str  # "A" or "B": who has the lower device id (the usual dialler)
    b_control: float | None = None  # B's control socket answers
    b_lists_a: float | None = None  # A appears in B's status
    a_lists_b: float | None = None  # B appears in A's status
    a_connected: float | None = None
    b_connected: float | None = None

    @property
    def paired(self) -> float | None:
        if self.a_connected is None or self.b_connected is None:
            return None
        return max(self.a_connected, self.b_connected)


def _ms(value: float | None) -> str:
    return "   -  " if value is None else f"{value * 1000:6.0f}"


def make_pair(lan: Lan, order: str, run_index: int) -> tuple[LanAgent, LanAgent]:
    """(A, B) with fresh homes; which one has the lower id depends on `order`."""
    one, two = LanAgent(lan, 0, "alpha"), LanAgent(lan, 1, "beta")
    low, high = sorted((one, two), key=lambda a: a.device_id)
    want = order
    if order == "alternate":
        want = "b-dials" if run_index % 2 == 0 else "a-dials"
    if want == "b-dials":
        return high, low  # B has the lower id, so B dials
    if want == "a-dials":
        return low, high
    return one, two


def one_run(order: str, run_index: int) -> Run:
    """Start A, wait until advertised, start B, and time what happens."""
    with Lan(2) as lan:
        a, b = make_pair(lan, order, run_index)
        try:
            a.start()
            wait_for(lambda: "advertising" in a.log() or a.exited(), 10, "A's mDNS advertisement", poll=POLL)
            if a.exited():
                raise RuntimeError(f"agent A exited:\n{a.log()}")
            run = Run(dialler="B" if b.device_id < a.device_id else "A")
            b.spawn()
            t0 = b.started_at
            assert t0 is not None
            deadline = t0 + PAIR_TIMEOUT
            while run.paired is None and time.monotonic() < deadline and not b.exited():
                sb = b.status_fast()
                now = time.monotonic() - t0
                if sb is not None:
                    run.b_control = run.b_control if run.b_control is not None else now
                    entry_b = next((p for p in sb["peers"] if p["device_id"] == a.device_id), None)
                    if entry_b is not None and run.b_lists_a is None:
                        run.b_lists_a = now
                    if entry_b is not None and entry_b["connected"] and run.b_connected is None:
                        run.b_connected = now
                entry_a = a.peer(b.device_id)
                now = time.monotonic() - t0
                if entry_a is not None and run.a_lists_b is None:
                    run.a_lists_b = now
                if entry_a is not None and entry_a["connected"] and run.a_connected is None:
                    run.a_connected = now
                time.sleep(POLL)
            if run.paired is None:
                print(f"run {run_index + 1}: no pairing within {PAIR_TIMEOUT:g} s\nA:\n{a.log()}\nB:\n{b.log()}")
            return run
        finally:
            cleanup_all([a, b])


def median(values: list[float | None]) -> float | None:
    """Median of the values that exist."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--order", choices=["random", "b-dials", "a-dials", "alternate"], default="random")
    args = parser.parse_args()
    reason = netns_available()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    print(f"pairing time, {args.runs} runs, order {args.order}; milliseconds from spawning B")
    header = "run  lower  B-ctl  B-lists-A  A-lists-B  A-conn  B-conn  PAIRED"
    print(header)
    runs: list[Run] = []
    for i in range(args.runs):
        r = one_run(args.order, i)
        runs.append(r)
        print(
            f"{i + 1:3d}  {r.dialler:>5}  {_ms(r.b_control)}  {_ms(r.b_lists_a):>9}  {_ms(r.a_lists_b):>9}  "
            f"{_ms(r.a_connected)}  {_ms(r.b_connected)}  {_ms(r.paired)}",
            flush=True,
        )
    print("-" * len(header))
    print(
        f"median      {_ms(median([r.b_control for r in runs]))}  {_ms(median([r.b_lists_a for r in runs])):>9}  "
        f"{_ms(median([r.a_lists_b for r in runs])):>9}  {_ms(median([r.a_connected for r in runs]))}  "
        f"{_ms(median([r.b_connected for r in runs]))}  {_ms(median([r.paired for r in runs]))}"
    )
    for who in ("A", "B"):
        sub = [r.paired for r in runs if r.dialler == who]
        if sub:
            print(f"median when {who} has the lower id ({len(sub)} runs): {_ms(median(sub)).strip()} ms")
    overall = median([r.paired for r in runs])
    failed = sum(r.paired is None for r in runs)
    verdict = "met" if overall is not None and overall < 1.0 and not failed else "MISSED"
    print(f"median pairing time: {_ms(overall).strip()} ms (goal < 1000 ms: {verdict}); failed runs: {failed}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
