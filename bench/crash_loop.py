"""SIGKILL agents at random moments of pairing and reconnect churn; check the databases and reconnection.

    .venv/bin/python bench/crash_loop.py [--kills 50] [--seed N]

Two real agents (A, B) on loopback are static peers of each other. Meanwhile a background client
keeps pairing fresh strangers with A (each a first-use pin written to A's trust store) and
reconnecting a pinned one (a `match` event each time), so a kill lands in the middle of trust-store
writes. Each round SIGKILLs A or B at a random moment (0-1.5 s into its start-up, or during
steady state), restarts it, and checks:

- `PRAGMA integrity_check` is "ok" on every SQLite database under its home;
- A and B show each other connected again, with the same pins as before;
- every stranger A acknowledged (its handshake reached OPEN, so A had committed the pin before
  sending READY) is still in A's trust store: nothing acknowledged was lost.

Later (not yet): kills during folder sync and key rotation, with torn/stray-file checks.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import sqlite3
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.errors import ProtocolError  # noqa: E402
from tests.agent.harness import AgentProc, short_home  # noqa: E402
from tests.hostile.conftest import configure, fast_peer, snapshot  # noqa: E402
from tests.hostile.peer import ProtocolClient, new_identity  # noqa: E402


def integrity(home: Path) -> dict[str, str]:
    """`PRAGMA integrity_check` of every database under `home` (opened read-write, as a restart would)."""
    out = {}
    for db in sorted(home.rglob("*.db")):
        with sqlite3.connect(db, timeout=10) as conn:
            out[db.name] = str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    return out


def wait(pred: object, timeout: float) -> float | None:
    """Seconds until `pred()` is truthy, or None."""
    assert callable(pred)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


class Strangers(threading.Thread):
    """Pairs new identities with A, and reconnects one pinned identity, until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.acknowledged: list[str] = []
        self.regular = new_identity("regular")
        self.stop = threading.Event()
        self.attempts = 0

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            who = self.regular if i % 2 else new_identity(f"s{i}")
            i += 1
            self.attempts += 1
            try:
                with ProtocolClient(self.port, who, source="127.0.0.90") as c:
                    if c.handshake(timeout=3) and who is not self.regular:
                        self.acknowledged.append(who.device_id)
            except (OSError, ProtocolError, AssertionError):
                self.stop.wait(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    homes = [configure(short_home("ta-k-")), configure(short_home("ta-k-"))]
    a, b = AgentProc(homes[0], "alpha"), AgentProc(homes[1], "beta")
    reconnect: list[float] = []
    failures: list[str] = []
    checks = 0
    strangers: Strangers | None = None
    try:
        a.start(peers=[b])
        b.start(peers=[a])
        ida, idb = a.identity()["device_id"], b.identity()["device_id"]
        if (
            wait(lambda: (fast_peer(a, idb) or {}).get("connected") and (fast_peer(b, ida) or {}).get("connected"), 20)
            is None
        ):
            raise SystemExit("the agents did not pair")
        pins = (snapshot(a.home).pins()[idb], snapshot(b.home).pins()[ida])
        strangers = Strangers(a.port)
        strangers.start()
        t_start = time.monotonic()
        for n in range(1, args.kills + 1):
            victim = rng.choice([a, b])
            moment = rng.choice(["start-up", "steady"])
            if moment == "start-up":
                victim.kill()
                assert victim.proc is not None
                victim.start(peers=[b if victim is a else a])
            time.sleep(rng.uniform(0.0, 1.5))  # the random moment: this IS the point of the bench
            victim.kill()
            acknowledged = list(strangers.acknowledged) if victim is a else []
            checks += 1
            bad = {name: r for name, r in integrity(victim.home).items() if r != "ok"}
            if bad:
                failures.append(f"round {n}: integrity_check {bad}")
            t_restart = time.monotonic()
            victim.start(peers=[b if victim is a else a])
            ok = wait(
                lambda: (fast_peer(a, idb) or {}).get("connected") and (fast_peer(b, ida) or {}).get("connected"), 30
            )
            took = None if ok is None else time.monotonic() - t_restart  # includes the process start-up
            if took is None:
                failures.append(f"round {n}: no reconnect within 30 s")
            else:
                reconnect.append(took)
            now_pins = (snapshot(a.home).pins()[idb], snapshot(b.home).pins()[ida])
            if now_pins != pins:
                failures.append(f"round {n}: pins changed {pins} -> {now_pins}")
            if acknowledged:
                known = set(snapshot(a.home).peers)
                lost = [d for d in acknowledged if d not in known]
                if lost:
                    failures.append(f"round {n}: {len(lost)} acknowledged pins lost")
            print(
                f"round {n:>3}: killed {victim.name:<5} at {moment:<8} integrity ok, "
                f"restarted and reconnected in {took if took is not None else float('nan'):.2f} s",
                flush=True,
            )
        elapsed = time.monotonic() - t_start
        strangers.stop.set()
        strangers.join(5)
        print()
        print(
            "| kills | integrity checks | failed | reconnects | median s | max s "
            "| stranger handshakes | pins acknowledged | lost |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        print(
            f"| {args.kills} | {checks} | {len([f for f in failures if 'integrity' in f])} | {len(reconnect)} | "
            f"{statistics.median(reconnect):.2f} | {max(reconnect):.2f} | {strangers.attempts} | "
            f"{len(strangers.acknowledged)} | {len([f for f in failures if 'lost' in f])} |"
        )
        print(f"{elapsed:.0f} s; " + ("no failures" if not failures else "FAILURES:\n  " + "\n  ".join(failures)))
        return 1 if failures else 0
    finally:
        if strangers is not None:
            strangers.stop.set()
        for p in (a, b):
            if p.proc is not None and p.proc.poll() is None:
                p.proc.send_signal(signal.SIGKILL)
                p.proc.wait(10)
        for h in homes:
            shutil.rmtree(h, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
