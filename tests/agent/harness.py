"""Real agent processes on loopback: start, stop, ask `status`, and wait on conditions."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from agent.host.paths import resolve_paths
from agent.identity.ids import new_device_id
from agent.trust.store import TrustStore

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def short_home(prefix: str = "ta-") -> Path:
    """A short temp dir: Unix socket paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def wait_for(predicate: Callable[[], T | None], timeout: float = 15.0, what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def cli(
    home: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run `tofu-agent --home HOME ARGS...` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "agent", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
        cwd=ROOT,
    )


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


class AgentProc:
    """One `tofu-agent run` process with its own home."""

    def __init__(self, home: Path, name: str, port: int | None = None) -> None:
        self.home = home
        self.name = name
        self.port = port if port is not None else free_port()
        self.proc: subprocess.Popen[str] | None = None
        self.log_path = home / f"{name}.log"

    def start(self, *extra: str, peers: Sequence[AgentProc] = (), env: dict[str, str] | None = None) -> AgentProc:
        """Start the agent (static peers, no mDNS) and wait until it answers `status`."""
        args = ["run", "--no-mdns", "--port", str(self.port), "--bind", "127.0.0.1", "--name", self.name]
        for p in peers:
            args += ["--peer", f"127.0.0.1:{p.port}"]
        log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "--home", str(self.home), *args, *extra],
            stdout=log,
            stderr=log,
            text=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        log.close()
        wait_for(lambda: self.status() is not None or self._died(), 20, f"{self.name} to start")
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
        return self

    def _died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def log(self) -> str:
        """Everything the agent logged so far."""
        return self.log_path.read_text() if self.log_path.exists() else ""

    def status(self) -> dict[str, Any] | None:
        """`status --json` if the agent answers, else None."""
        r = cli(self.home, "status", "--json", timeout=10)
        if r.returncode != 0:
            return None
        result: dict[str, Any] = json.loads(r.stdout)
        return result

    def identity(self) -> dict[str, str]:
        """`id --json`."""
        r = cli(self.home, "id", "--json")
        assert r.returncode == 0, r.stderr
        result: dict[str, str] = json.loads(r.stdout)
        return result

    def peer(self, device_id: str) -> dict[str, Any] | None:
        """This agent's status entry for `device_id`, if any."""
        st = self.status()
        for p in (st or {}).get("peers", []):
            if p["device_id"] == device_id:
                return dict(p)
        return None

    def wait_peer(self, device_id: str, timeout: float = 15.0, **expect: Any) -> dict[str, Any]:
        """Wait until the status entry for `device_id` has all the `expect` values."""

        def check() -> dict[str, Any] | None:
            p = self.peer(device_id)
            return p if p and all(p.get(k) == v for k, v in expect.items()) else None

        try:
            return wait_for(check, timeout, f"{self.name} to see {device_id} with {expect}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- {self.name} log ---\n{self.log()}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> float:
        """Send `sig` and wait for the exit; returns the seconds it took."""
        assert self.proc is not None
        return stop_process(self.proc, sig, timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None:
            kill_process(self.proc)


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
