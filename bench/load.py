"""One hub agent with 20 loopback peers connected and syncing at once, then churn; RSS and CPU over time.

    .venv/bin/python bench/load.py [--peers 20] [--files 5] [--steady 60] [--churn 180] [--quick]

The hub has every peer as a static peer and dials them (on loopback every client address is
127.0.0.1, and the hub's listener allows 8 connections per address, so 20 peers dialling the hub
would be capped: on a LAN each has its own address). Every agent syncs its `HOME/f` as folder
`default`. Sync: once all are connected, each peer adds `--files` small files (random bytes, moved
into place by one rename) under a directory of its own, all at once; the peers reach each other
only through the hub, and the phase ends when all 21 agents hold exactly the same file set, byte
for byte (the time to converge is printed). Then steady state, then churn: every `--every` seconds one random
peer stops (SIGTERM) and comes back `--away` seconds later. Every second the hub's VmRSS and CPU
(utime+stime from /proc/PID/stat) and its connected count are sampled; a table is printed.
`--quick` is about 20 s plus the sync phase (8 s steady, 12 s churn).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testkit.agents import fast_status, free_port, rss_kib  # noqa: E402
from testkit.homes import configure, new_home  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Proc:
    name: str
    home: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def folder(self) -> Path:
        return self.home / "f"

    def spawn(self, peers: list[int]) -> None:
        argv = [
            sys.executable,
            "-m",
            "agent",
            "--home",
            str(self.home),
            "run",
            "--no-mdns",
            "--folder",
            str(self.folder),
        ]
        argv += ["--port", str(self.port), "--bind", "127.0.0.1", "--name", self.name]
        for port in peers:
            argv += ["--peer", f"127.0.0.1:{port}"]
        with (self.home / "agent.log").open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=ROOT)

    def status(self) -> dict[str, object] | None:
        return fast_status(self.home)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def connected(hub: Proc) -> int:
    st = hub.status() or {}
    peers = st.get("peers", [])
    assert isinstance(peers, list)
    return sum(1 for p in peers if p.get("connected"))


def files_of(root: Path) -> dict[str, str]:
    """{name: sha256 hex} of the regular files under `root`, temp files excluded."""
    out: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.startswith(".tofu-tmp-"):
                continue
            path = Path(dirpath) / name
            try:
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
            except FileNotFoundError:
                continue
    return out


def add_files(p: Proc, count: int, rng: random.Random) -> dict[str, str]:
    """`count` small files of random bytes under `p.folder/p.name/`, each moved into place by one rename."""
    stage = p.home / "stage"
    stage.mkdir(exist_ok=True)
    (p.folder / p.name).mkdir(parents=True, exist_ok=True)
    made = {}
    for k in range(count):
        data = os.urandom(rng.randrange(100, 8000))
        staged = stage / secrets.token_hex(6)
        staged.write_bytes(data)
        staged.rename(p.folder / p.name / f"n{k}.bin")
        made[f"{p.name}/n{k}.bin"] = hashlib.sha256(data).hexdigest()
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=20)
    parser.add_argument("--files", type=int, default=5, help="small files each peer adds to the shared folder")
    parser.add_argument("--sync-timeout", type=float, default=180.0)
    parser.add_argument("--steady", type=float, default=60.0)
    parser.add_argument("--churn", type=float, default=180.0)
    parser.add_argument("--every", type=float, default=3.0, help="seconds between departures")
    parser.add_argument("--away", type=float, default=2.0, help="seconds a departed peer stays away")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    if args.quick:
        args.steady, args.churn = 8.0, 12.0
    rng = random.Random(args.seed)
    peers = [Proc(f"peer{i:02d}", configure(new_home("ta-l-")), free_port()) for i in range(args.peers)]
    hub = Proc("hub", configure(new_home("ta-l-")), free_port())
    rows: list[tuple[float, str, float, float, int]] = []
    try:
        for p in peers:
            p.spawn([])
        hub.spawn([p.port for p in peers])
        t0 = time.monotonic()
        deadline = t0 + 120
        while connected(hub) < args.peers:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {connected(hub)} of {args.peers} peers connected after 120 s")
            time.sleep(0.2)
        print(f"all {args.peers} peers connected {time.monotonic() - t0:.1f} s after start")
        assert hub.proc is not None
        pid = hub.proc.pid
        begin = time.monotonic()
        last_cpu, last_t = cpu_seconds(pid), begin
        expected: dict[str, str] = {}
        for p in peers:
            expected.update(add_files(p, args.files, rng))
        agents = [hub, *peers]
        converged: float | None = None
        behind = len(agents)
        while (now := time.monotonic()) - begin < args.sync_timeout:
            behind = sum(1 for a in agents if files_of(a.folder) != expected)
            cpu = cpu_seconds(pid)
            pct = 100 * (cpu - last_cpu) / max(1e-6, now - last_t)
            last_cpu, last_t = cpu, now
            rows.append((now - begin, "sync", rss_kib(pid) / 1024, pct, connected(hub)))
            if not behind:
                converged = time.monotonic() - begin
                break
            time.sleep(max(0.0, 0.5 - (time.monotonic() - now)))
        sync_line = f"sync: {len(expected)} files ({args.files} from each of {args.peers} peers, added at once); " + (
            f"all {len(agents)} agents hold the same {len(expected)} files {converged:.1f} s after they were added"
            if converged is not None
            else f"NOT converged after {args.sync_timeout:.0f} s: {behind} of {len(agents)} agents differ"
        )
        print(sync_line, flush=True)
        start = time.monotonic()
        away: dict[int, float] = {}
        next_leave = start + args.steady
        end = start + args.steady + args.churn
        departures = 0
        while (now := time.monotonic()) < end:
            phase = "steady" if now < start + args.steady else "churn"
            if phase == "churn":
                for i, back in list(away.items()):
                    if now >= back:
                        peers[i].spawn([])
                        del away[i]
                if now >= next_leave:
                    i = rng.choice([j for j in range(args.peers) if j not in away])
                    peers[i].stop()
                    away[i] = now + args.away
                    departures += 1
                    next_leave = now + args.every
            cpu = cpu_seconds(pid)
            pct = 100 * (cpu - last_cpu) / max(1e-6, now - last_t)
            last_cpu, last_t = cpu, now
            rows.append((now - begin, phase, rss_kib(pid) / 1024, pct, connected(hub)))
            time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
        print()
        print("| t (s) | phase | hub RSS MiB | hub CPU % | connected |")
        print("|---|---|---|---|---|")
        stride = max(1, len(rows) // 25)
        for t, phase, rss, pct, conn in rows[::stride]:
            print(f"| {t:5.0f} | {phase} | {rss:6.1f} | {pct:5.1f} | {conn}/{args.peers} |")
        sync = [r for r in rows if r[1] == "sync"]
        steady = [r for r in rows if r[1] == "steady"]
        churn = [r for r in rows if r[1] == "churn"]
        print()
        for label, part in (("sync", sync), ("steady", steady), ("churn", churn)):
            if part:
                print(
                    f"{label}: RSS {min(r[2] for r in part):.1f}-{max(r[2] for r in part):.1f} MiB, "
                    f"CPU mean {statistics.mean(r[3] for r in part):.1f} % max {max(r[3] for r in part):.1f} %, "
                    f"connected min {min(r[4] for r in part)}/{args.peers}"
                )
        print(f"{departures} departures and returns during churn")
        for p in peers:
            p.spawn([]) if p.proc is not None and p.proc.poll() is not None else None
        t1 = time.monotonic()
        while connected(hub) < args.peers and time.monotonic() - t1 < 60:
            time.sleep(0.2)
        print(
            f"after churn: {connected(hub)}/{args.peers} connected {time.monotonic() - t1:.1f} s after the last return"
        )
        print(sync_line)
        return 0 if converged is not None else 1
    finally:
        for p in [hub, *peers]:
            p.stop()
        for p in [hub, *peers]:
            shutil.rmtree(p.home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
