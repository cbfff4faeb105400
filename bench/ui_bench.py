"""The web page's costs (issue 16 goals): render time, live-update latency, idle memory.

- devices page with 50 devices, rendered in-process (httpx + ASGI, logged in): median < 100 ms;
- a change reaches an open event stream (`/events`, real server on loopback): < 1 s;
- idle RSS growth of an agent process with the page (and notifications) enabled but unused: < 8 MB.
  Each case is a fresh child process that imports the agent (`agent.daemon`) and runs an anyio loop,
  without the page, with it started but unused, and with it after one login (for comparison).

Run from the repository root:

    .venv/bin/python -m bench.ui_bench
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:  # the "off" child must not import agent.ui at all
    from agent.ui.fake import FakeBackend

RENDER_GOAL_MS = 100.0
EVENT_GOAL_MS = 1000.0
RSS_GOAL_MB = 8.0


def rss_mb() -> float:
    """This process's VmRSS in MB (10^6 bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError("no VmRSS")


def fifty_devices() -> FakeBackend:
    from agent.ui.fake import FakeBackend

    backend = FakeBackend()
    for i in range(50):
        trust = ("tofu", "verified", "pending", "revoked")[i % 4]
        device = backend.add_device(f"device-{i:02d}", trust=trust, connected=i % 3 == 0)
        if i % 10 == 5:
            backend.offer_key(device, f"new-{i}")
        if i % 7 == 0:
            backend.raise_anomaly(device, "advert_mismatch", f"mDNS said another key for device-{i:02d}")
    backend.add_folder("default", "/home/user/TofuSync", [(p["device_id"], 3, 4096) for p in backend.status["peers"]])
    return backend


async def bench_render(runs: int) -> float:
    import httpx

    from agent.ui.app import create_app
    from agent.ui.auth import Auth

    backend = fifty_devices()
    auth = Auth()
    app = create_app(backend, auth, 39080, backend.feed)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:39080") as c:
        await c.get("/login", params={"token": auth.issue_token(time.time())})
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            r = await c.get("/")
            times.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200 and r.text.count('<tr data-device="') == 50
    return statistics.median(times)


async def bench_event(runs: int) -> float:
    import httpx

    from agent.ui.server import serve_ui

    backend = fifty_devices()
    times = []
    async with anyio.create_task_group() as tg:
        handle = await tg.start(serve_ui, backend, 0)
        async with httpx.AsyncClient(timeout=10) as c:
            await c.get(handle.login_url())
            async with c.stream("GET", f"http://127.0.0.1:{handle.port}/events") as r:
                lines = r.aiter_lines()
                await anext(lines)
                for i in range(runs):
                    t = time.perf_counter()
                    backend.connect(backend.status["peers"][i % 50]["device_id"], bool(i % 2))
                    while not (await anext(lines)).startswith("event: change"):
                        pass
                    times.append((time.perf_counter() - t) * 1000)
        tg.cancel_scope.cancel()
    return statistics.median(times)


async def child(mode: str, settle: float) -> None:
    import agent.app.daemon  # noqa: F401  (what a running agent has imported anyway)

    async with anyio.create_task_group() as tg:
        if mode != "off":
            from agent.ui.fake import FakeBackend
            from agent.ui.notify import Notifier
            from agent.ui.server import serve_ui

            backend = FakeBackend()
            handle = await tg.start(serve_ui, backend, 0)
            tg.start_soon(Notifier(backend).run)
            if mode == "loaded":
                with socket.create_connection(("127.0.0.1", handle.port)) as s:
                    s.sendall(f"GET /login?token={handle.auth.issue_token(time.time())} HTTP/1.1\r\n".encode())
                    s.sendall(f"Host: 127.0.0.1:{handle.port}\r\nConnection: close\r\n\r\n".encode())
                    await anyio.wait_readable(s)
                    s.recv(65536)
        await anyio.sleep(settle)  # let the loop go idle before measuring, as an idle agent would be
        print(f"{rss_mb():.2f}", flush=True)
        tg.cancel_scope.cancel()


def measure_rss(mode: str, repeat: int, settle: float) -> float:
    values = []
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, "-m", "bench.ui_bench", "--child", mode, "--settle", str(settle)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
        values.append(float(out.strip().splitlines()[-1]))
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=["off", "on", "loaded"], help=argparse.SUPPRESS)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3, help="child processes per RSS case (median)")
    args = parser.parse_args()
    if args.child:
        anyio.run(child, args.child, args.settle)
        return 0
    render = anyio.run(bench_render, args.runs)
    event = anyio.run(bench_event, min(args.runs, 20))
    off = measure_rss("off", args.repeat, args.settle)
    on = measure_rss("on", args.repeat, args.settle)
    loaded = measure_rss("loaded", args.repeat, args.settle)
    ok = render < RENDER_GOAL_MS and event < EVENT_GOAL_MS and on - off < RSS_GOAL_MB
    print(f"devices page, 50 devices, in-process: median {render:.1f} ms (goal < {RENDER_GOAL_MS:.0f} ms)")
    print(f"change -> open /events stream on loopback: median {event:.1f} ms (goal < {EVENT_GOAL_MS:.0f} ms)")
    print(f"idle RSS: agent imports only {off:.1f} MB; page + notifications enabled, unused {on:.1f} MB")
    print(f"  growth {on - off:+.1f} MB (goal < {RSS_GOAL_MB:.0f} MB)")
    print(f"  after one login (web stack loaded) {loaded:.1f} MB ({loaded - off:+.1f} MB)")
    print("all goals met" if ok else "GOAL MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
