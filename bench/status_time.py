"""How long `tofu-agent status --json` takes with 50 known peers (goal: under 300 ms), and where it goes.

Starts one agent on loopback (static peers only, no mDNS) whose trust store holds 50 devices, then
times `tofu-agent --home H status --json` as a fresh process, the way a person runs it. To show
where the time goes it also times a bare interpreter, the CLI's imports alone, and the control
socket round trip alone (in-process, no start-up). It also times, run for run in turn, the
same command through the full CLI (`agent.cli.main`, the entry point before 5e15169) and through
today's entry point (`agent.cli.entry`: a plain `status` asks the agent before loading the rest),
the A/B for that change. Run from the repository root:

    .venv/bin/python -m bench.status_time --runs 15
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/X.py` as well as `python -m bench.X`

from agent.app import control  # noqa: E402
from agent.host.paths import resolve_paths  # noqa: E402
from testkit.agents import AgentProc, cli, fill_trust_store  # noqa: E402
from testkit.homes import new_home  # noqa: E402

GOAL = 0.300


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    """Wall-clock seconds of `runs` calls of `fn`."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def run_quiet(argv: Sequence[str]) -> None:
    """Run `argv`, fail loudly on a non-zero exit."""
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{argv} exited {r.returncode}: {r.stderr}")


def report(label: str, values: list[float]) -> float:
    """Print the median and the spread of `values` (seconds) in ms; the median."""
    med = statistics.median(values)
    print(f"{label:<48} median {med * 1000:6.1f} ms   min {min(values) * 1000:6.1f}   max {max(values) * 1000:6.1f}")
    return med


def main() -> int:
    parser = argparse.ArgumentParser(description="time `tofu-agent status --json` with many known peers")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--peers", type=int, default=50)
    args = parser.parse_args()
    script = Path(sys.executable).with_name("tofu-agent")
    tofu = [str(script)] if script.exists() else [sys.executable, "-m", "agent"]
    home = new_home()
    agent = AgentProc(home, "bench")
    try:
        if cli(home, "id").returncode != 0:
            raise RuntimeError("cannot create an identity")
        fill_trust_store(home, args.peers)
        agent.start()
        status_argv = [*tofu, "--home", str(home), "status", "--json"]
        run_quiet(status_argv)  # warm the page cache and the bytecode cache
        print(f"{args.peers} known peers, {args.runs} runs each, command: {' '.join(status_argv)}")
        total = report("tofu-agent status --json (fresh process)", timed(lambda: run_quiet(status_argv), args.runs))
        report("  bare interpreter (python -c pass)", timed(lambda: run_quiet([sys.executable, "-c", "pass"]), 9))
        report(
            "  interpreter + `import agent.cli.main` + parser",
            timed(lambda: run_quiet([sys.executable, "-c", "import agent.cli.main as c; c.build_parser()"]), 9),
        )
        args_ = ["--home", str(home), "status", "--json"]
        full = [sys.executable, "-c", "import sys; from agent.cli.main import main; sys.exit(main())", *args_]
        entry = [sys.executable, "-c", "import sys; from agent.cli.entry import main; sys.exit(main())", *args_]
        a: list[float] = []
        b: list[float] = []
        for _ in range(args.runs):  # in turn, so that load on the machine hits both alike
            a += timed(lambda: run_quiet(full), 1)
            b += timed(lambda: run_quiet(entry), 1)
        old = report("  A: through the full CLI (agent.cli.main)", a)
        new = report("  B: through the entry point (agent.cli.entry)", b)
        print(f"  B/A {new / old:.2f}")
        sock = resolve_paths(home).control_socket
        report("  control socket round trip (in-process)", timed(lambda: control.request(sock, "status"), args.runs))
        verdict = "met" if total < GOAL else "MISSED"
        print(f"status median {total * 1000:.0f} ms (goal < {GOAL * 1000:.0f} ms: {verdict})")
        return 0
    finally:
        agent.kill()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
