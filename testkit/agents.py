"""`tofu-agent` as a subprocess: the CLI, an agent on loopback, and what can be seen of it from outside."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.app import control
from agent.errors import TofuError
from agent.host.paths import resolve_paths
from agent.identity.ids import new_device_id
from agent.trust.store import TrustStore
from testkit import ROOT
from testkit.wait import wait_for

AGENT = [sys.executable, "-m", "agent"]


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cli(
    home: Path | None,
    *args: str,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Run `tofu-agent [--home HOME] ARGS...` and capture its output.

    HOME and the XDG variables point into a throw-away directory and TOFU_AGENT_HOME is unset (`env`
    may set any of them), so a command that ignored `--home` could never touch the real home of
    whoever runs the tests.
    """
    scratch = Path(tempfile.mkdtemp(prefix="ta-xdg-", dir="/tmp"))
    try:
        full_env = {k: v for k, v in os.environ.items() if k != "TOFU_AGENT_HOME"}
        full_env.update(
            {
                "HOME": str(scratch),
                "XDG_CONFIG_HOME": str(scratch / "config"),
                "XDG_DATA_HOME": str(scratch / "data"),
                "XDG_RUNTIME_DIR": str(scratch / "run"),
                "PYTHONDONTWRITEBYTECODE": "1",
                **(env or {}),
            }
        )
        home_args = [] if home is None else ["--home", str(home)]
        return subprocess.run(
            [*AGENT, *home_args, *args],
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            check=False,
            cwd=ROOT,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def fill_trust_store(home: Path, n: int) -> None:
    """`n` devices pinned on first use, each seen twice (so the event log is not empty)."""
    paths = resolve_paths(home)
    paths.ensure()
    now = time.time()
    with TrustStore(paths.trust_db) as store:
        for i in range(n):
            device_id, fp = new_device_id(), secrets.token_hex(32)
            store.verify_device(device_id, f"peer-{i:02d}", fp, now - 3600, f"192.0.2.{i + 1}")
            store.verify_device(device_id, f"peer-{i:02d}", fp, now, f"192.0.2.{i + 1}")


def fast_status(home: Path, timeout: float = 5.0) -> dict[str, Any] | None:
    """The agent's `status` object straight from its control socket (no process start-up), or None."""
    try:
        result = control.request(resolve_paths(home).control_socket, "status", timeout=timeout)
    except (TofuError, OSError):
        return None
    return result if isinstance(result, dict) else None


def status_peer(status: dict[str, Any] | None, device_id: str) -> dict[str, Any] | None:
    """The entry for `device_id` in a `status` object, if any."""
    for p in (status or {}).get("peers", []):
        if p["device_id"] == device_id:
            return dict(p)
    return None


def fast_peer(agent: AgentProc, device_id: str) -> dict[str, Any] | None:
    """The agent's status entry for `device_id`, asked over the control socket in-process (quick)."""
    return status_peer(fast_status(agent.home), device_id)


def rss_kib(pid: int) -> int:
    """VmRSS of `pid` in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@dataclass(frozen=True)
class TrustSnapshot:
    """`peers --json` and `trust log --json` of an agent at one moment."""

    peers: dict[str, dict[str, Any]]
    events: list[dict[str, Any]]

    def pins(self) -> dict[str, tuple[str, str, str | None]]:
        return {d: (p["fingerprint"], p["trust"], p["pending_fingerprint"]) for d, p in self.peers.items()}

    def new_events(self, before: TrustSnapshot) -> list[dict[str, Any]]:
        last = max((e["seq"] for e in before.events), default=0)
        return sorted((e for e in self.events if e["seq"] > last), key=lambda e: int(e["seq"]))


def snapshot(home: Path) -> TrustSnapshot:
    """The trust store of the agent at `home`, through the CLI."""
    peers = cli(home, "peers", "--json")
    log = cli(home, "trust", "log", "--json")
    assert peers.returncode == 0 and log.returncode == 0, peers.stderr + log.stderr
    return TrustSnapshot({p["device_id"]: p for p in json.loads(peers.stdout)}, json.loads(log.stdout))


class AgentProcess:
    """What every agent under test has: a home, a `tofu-agent run` process, its log, and ways to ask and end it."""

    home: Path
    name: str
    log_path: Path
    proc: subprocess.Popen[str] | None

    def exited(self) -> bool:
        """The process has ended."""
        return self.proc is not None and self.proc.poll() is not None

    def returncode(self) -> int | None:
        """The exit code, or None while running."""
        return None if self.proc is None else self.proc.poll()

    def log(self) -> str:
        """Everything the agent logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def status(self) -> dict[str, Any] | None:
        """`tofu-agent --home H status --json` if a running agent answers, else None."""
        r = cli(self.home, "status", "--json", timeout=10)
        if r.returncode != 0:
            return None
        result: dict[str, Any] = json.loads(r.stdout)
        return result if result.get("running") else None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> float:
        """Send `sig` and wait for the exit; returns the seconds it took."""
        assert self.proc is not None
        return stop_process(self.proc, sig, timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would (no goodbye on the wire or on mDNS)."""
        if self.proc is not None:
            kill_process(self.proc)


class AgentProc(AgentProcess):
    """One `tofu-agent run` process on loopback (static peers, no mDNS) with its own home."""

    def __init__(self, home: Path, name: str, port: int | None = None) -> None:
        self.home = home
        self.name = name
        self.port = port if port is not None else free_port()
        self.proc = None
        self.log_path = home / f"{name}.log"

    def start(self, *extra: str, peers: Sequence[AgentProc] = (), env: dict[str, str] | None = None) -> AgentProc:
        """Start the agent (static peers, no mDNS) and wait until it answers `status`."""
        args = ["run", "--no-mdns", "--port", str(self.port), "--bind", "127.0.0.1", "--name", self.name]
        for p in peers:
            args += ["--peer", f"127.0.0.1:{p.port}"]
        log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [*AGENT, "--home", str(self.home), *args, *extra],
            stdout=log,
            stderr=log,
            text=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        log.close()
        wait_for(lambda: self.status() is not None or self.exited(), 20, f"{self.name} to start")
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
        return self

    def identity(self) -> dict[str, str]:
        """`id --json`."""
        r = cli(self.home, "id", "--json")
        assert r.returncode == 0, r.stderr
        result: dict[str, str] = json.loads(r.stdout)
        return result

    def peer(self, device_id: str) -> dict[str, Any] | None:
        """This agent's status entry for `device_id`, if any."""
        return status_peer(self.status(), device_id)

    def wait_peer(self, device_id: str, timeout: float = 15.0, **expect: Any) -> dict[str, Any]:
        """Wait until the status entry for `device_id` has all the `expect` values."""

        def check() -> dict[str, Any] | None:
            p = self.peer(device_id)
            return p if p and all(p.get(k) == v for k, v in expect.items()) else None

        try:
            return wait_for(check, timeout, f"{self.name} to see {device_id} with {expect}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- {self.name} log ---\n{self.log()}") from None


def stop_process(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 10.0) -> float:
    """Send `sig` to `proc` if it still runs and wait for the exit; the seconds it took."""
    t0 = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(sig)
        proc.wait(timeout)
    return time.monotonic() - t0


def kill_process(proc: subprocess.Popen[str]) -> None:
    """SIGKILL `proc` if it still runs, as a crash would, and reap it."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
