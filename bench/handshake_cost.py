"""Does a handshake's trust decision cost more after many reconnects of one peer? (issue 14)

Builds a trust store on disk with one peer (first use), then times the daemon's decision path for
a handshake (`Agent._decide`: rotation check, trust level, anomaly rules, with a real `TrustStore`
in a temporary directory, the way `Agent.authenticated` runs it in a worker thread) at 0
reconnects, drives `--reconnects` ordinary reconnects of that peer through the same path
in-process (no network), and times it again. Prints, at both points, the trust log's rows, the
database's size on disk (after a WAL checkpoint) and the median decision time. Run from the
repository root:

    .venv/bin/python -m bench.handshake_cost                     # 100,000 reconnects
    .venv/bin/python -m bench.handshake_cost --reconnects 2000   # quicker
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import cast

from agent.app.daemon import Agent
from agent.trust.anomaly import AnomalyConfig
from agent.trust.store import TrustStore
from agent.wire.session import PeerAuthenticated

DEVICE = "AAAABBBBCCCCDDDDEEEEFFFFGGGGHHHH"
FINGERPRINT = "ab" * 32
T0 = 1_700_000_000.0


def log_size(path: Path) -> tuple[int, int]:
    """Rows in the trust log and bytes of the database file (WAL checkpointed into it first)."""
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        rows: int = db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    finally:
        db.close()
    return rows, path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reconnects", type=int, default=100_000, help="ordinary reconnects between the two timings")
    ap.add_argument("--samples", type=int, default=300, help="timed decisions at each point")
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="ta-bench-"))
    path = workdir / "trust.db"
    peer = PeerAuthenticated(DEVICE, "laptop", FINGERPRINT, b"", (), 1)
    now = T0
    try:
        with TrustStore(path) as store:
            agent = cast(Agent, SimpleNamespace(store=store, config=SimpleNamespace(anomaly=AnomalyConfig())))

            def handshake() -> float:
                nonlocal now
                now += 1.0
                t = time.perf_counter()
                decision, _blocked, _ = Agent._decide(agent, peer, "192.0.2.7", now, [], [])
                elapsed = time.perf_counter() - t
                assert decision.may_sync, decision
                return elapsed

            handshake()  # first use: the peer is pinned
            figures = []
            for point in (0, args.reconnects):
                if point:
                    t = time.perf_counter()
                    for _ in range(point - args.samples):
                        handshake()
                    print(f"drove {point - args.samples:,} reconnects in {time.perf_counter() - t:.1f} s")
                rows, size = log_size(path)
                times = sorted(handshake() for _ in range(args.samples))
                figures.append((point, rows, size, statistics.median(times), times[int(0.9 * len(times))]))
            record = store.get(DEVICE)
            assert record is not None
        print()
        print(f"{'reconnects':>10}  {'log rows':>8}  {'db bytes':>9}  {'median decision':>15}  {'p90':>8}")
        for point, rows, size, median, p90 in figures:
            print(f"{point:>10,}  {rows:>8,}  {size:>9,}  {median * 1000:>12.3f} ms  {p90 * 1000:>5.3f} ms")
        print(f"\n(the {args.samples} timed decisions at each point are reconnects too; last_seen {record.last_seen})")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
