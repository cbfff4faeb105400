"""`python -m tests.soak` (what `scripts/soak` runs): one or more seeded soak runs, a summary each.

Exit status 0 when every run passed the checker, 1 otherwise. A failing run prints its seed, the one
command that replays it, and the directory (kept) that holds every agent's home and log.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests.soak.runner import ROOT, RunResult, Soak, SoakConfig, iter_seeds


def summary(r: RunResult) -> str:
    cfg = r.config
    ops = ", ".join(f"{k} {v}" for k, v in sorted(r.ops.items()))
    faults = ", ".join(f"{k} {v}" for k, v in sorted(r.faults.items()))
    conv = f"{r.converge_s:.1f} s" if r.converge_s is not None else f"NOT within {cfg.converge_timeout:g} s"
    lines = [
        f"== seed {cfg.seed}: {'PASS' if r.ok else 'FAIL'}  ({cfg.agents} agents, {cfg.minutes:g} min"
        f"{', netns' if cfg.netns else ''}, {r.elapsed_s:.0f} s in all)",
        f"   operations: {sum(r.ops.values())} ({ops}); {r.bytes_written / 1e6:,.1f} MB written",
        f"   faults: {faults}",
        f"   quiet to converged: {conv}; peak RSS {r.max_rss_mb:.0f} MB "
        f"({', '.join(f'{k} {v:.0f}' for k, v in r.report.stats.get('rss_max_mb', {}).items())})",
        f"   shared writes that had to survive: {r.report.stats.get('shared_writes_required', 0)}",
    ]
    if not r.ok:
        lines.append("   FAILURES:")
        lines += ["   - " + f.replace("\n", "\n     ") for f in r.report.failures]
        if r.report.notes:
            lines.append("   agent warnings (for diagnosis):")
            lines += ["   * " + n for n in r.report.notes]
        lines.append(f"   replay: {cfg.replay()}")
    if r.kept:
        lines.append(f"   kept: {r.run_dir} (agent logs: {r.run_dir}/m*/agent.log)")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--minutes", type=float, default=1.0, help="length of the schedule (default 1)")
    p.add_argument("--agents", type=int, default=3, help="3-5 machines; the last one joins mid-run (default 3)")
    p.add_argument("--seed", type=int, default=None, help="first seed (default: random)")
    p.add_argument("--seeds", type=int, default=1, help="how many seeds in a row (default 1)")
    p.add_argument("--netns", action="store_true", help="one network namespace per agent, mDNS, link cuts")
    p.add_argument("--keep", action="store_true", help="keep the run directory even when the run passes")
    p.add_argument("--agent-root", type=Path, default=ROOT, help="run the agent code from this tree")
    p.add_argument("--max-mb", type=float, default=50.0, help="the biggest file written (default 50)")
    p.add_argument("--initial-mb", type=float, default=6.0, help="the biggest file a machine starts with")
    p.add_argument("--converge-timeout", type=float, default=120.0, help="seconds to converge after the quiet phase")
    p.add_argument("--max-rss-mb", type=float, default=400.0, help="fail above this peak RSS per agent")
    p.add_argument("--gap", type=float, default=0.25, help="mean pause between one machine's operations, s")
    p.add_argument("--fault-gap", type=float, default=4.0, help="mean pause between faults, s")
    p.add_argument("-v", "--verbose", action="store_true", help="print the faults as they happen")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not 2 <= args.agents <= 8:
        print("--agents must be between 2 and 8", file=sys.stderr)
        return 1
    if args.netns:
        from testkit.netns import netns_available

        reason = netns_available()
        if reason is not None:
            print(f"--netns: {reason}", file=sys.stderr)
            return 1
    failed = []
    for seed in iter_seeds(args.seed, args.seeds):
        cfg = SoakConfig(
            seed=seed,
            agents=args.agents,
            minutes=args.minutes,
            netns=args.netns,
            keep=args.keep,
            agent_root=args.agent_root.resolve(),
            max_mb=args.max_mb,
            initial_mb=args.initial_mb,
            converge_timeout=args.converge_timeout,
            max_rss_mb=args.max_rss_mb,
            gap=args.gap,
            fault_gap=args.fault_gap,
            verbose=args.verbose,
        )
        result = Soak(cfg).run()
        print(summary(result), flush=True)
        if not result.ok:
            failed.append(cfg)
    if args.seeds > 1:
        print(f"== {args.seeds - len(failed)} of {args.seeds} seeds passed")
        for cfg in failed:
            print(f"   replay: {cfg.replay()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
