"""Real `tofu-agent run` processes inside the network namespaces of a `testkit.netns.Lan`.

Each agent gets its own short home (`/tmp/ta-XXXX`, so the control socket path stays well under
the 108-byte limit) and runs via `ip netns exec`, so it listens, advertises and browses only on
the private LAN. Its control socket is a Unix socket in that home: a filesystem object, reachable
from the root namespace, so `status` needs no namespace at all.

    with Lan(2) as lan:
        a = LanAgent(lan, 0, "alpha").start()
        b = LanAgent(lan, 1, "beta").start()
        a.wait_peer(b.device_id, connected=True, trust="tofu")

`status()` runs the real CLI (`tofu-agent --home H status --json`); `status_fast()` asks the
control socket in-process, for polling every few milliseconds without a Python start-up each time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from agent.host.paths import resolve_paths
from testkit import ROOT
from testkit.agents import AGENT, AgentProcess, cli, fast_status
from testkit.homes import ConfigValue, new_home
from testkit.netns import Lan
from testkit.wait import wait_for

T = TypeVar("T")

POLL = 0.02  # LAN tests time what they wait for (pairing, failover): poll often
PROBE = Path(__file__).with_name("mdns_probe.py")


class LanAgent(AgentProcess):
    """One `tofu-agent run` in host `host` of `lan`, with mDNS on and its own home."""

    def __init__(
        self,
        lan: Lan,
        host: int,
        name: str,
        *,
        config: Mapping[str, ConfigValue] | None = None,
        home: Path | None = None,
    ) -> None:
        self.lan = lan
        self.host = host
        self.name = name
        self.home = home if home is not None else new_home(config=config)
        self.paths = resolve_paths(self.home)
        self.log_path = self.home / "agent.log"
        self.proc: subprocess.Popen[str] | None = None
        self.started_at: float | None = None  # time.monotonic() just before the process was spawned
        ident = cli(self.home, "id", "--json")  # creates the identity, so the id is known before start
        if ident.returncode != 0:
            raise AssertionError(f"`tofu-agent id` failed: {ident.stderr}")
        data = json.loads(ident.stdout)
        self.device_id: str = data["device_id"]
        self.fingerprint: str = data["fingerprint"]

    @property
    def address(self) -> str:
        """This agent's LAN address."""
        return self.lan.hosts[self.host].address

    def spawn(self, *extra: str) -> LanAgent:
        """Start `tofu-agent run` in the namespace and return at once."""
        argv = [*AGENT, "--home", str(self.home), "run", "--bind", "0.0.0.0", "--name", self.name, *extra]
        with self.log_path.open("a") as log:
            self.started_at = time.monotonic()
            self.proc = self.lan.popen(self.host, argv, stdout=log, stderr=log, cwd=ROOT, env=dict(os.environ))
        return self

    def start(self, *extra: str, timeout: float = 20.0) -> LanAgent:
        """Start the agent and wait until its control socket answers."""
        self.spawn(*extra)
        wait_for(lambda: self.status_fast() is not None or self.exited(), timeout, f"{self.name} to start", poll=POLL)
        if self.exited():
            raise AssertionError(f"{self.name} exited with {self.returncode()}:\n{self.log()}")
        return self

    # -- asking the agent --------------------------------------------------------------------------

    def status_fast(self) -> dict[str, Any] | None:
        """The same object straight from the control socket (no process start-up), or None."""
        return fast_status(self.home, timeout=2.0)

    def peers(self, *, fast: bool = True) -> dict[str, dict[str, Any]]:
        """The status entries of every peer, by device id (empty if the agent does not answer)."""
        st = self.status_fast() if fast else self.status()
        return {p["device_id"]: p for p in (st or {}).get("peers", [])}

    def peer(self, device_id: str, *, fast: bool = True) -> dict[str, Any] | None:
        """This agent's status entry for `device_id`, if any."""
        return self.peers(fast=fast).get(device_id)

    def sees(self, device_id: str, **expect: Any) -> dict[str, Any] | None:
        """The entry for `device_id` if it has all the `expect` values now, else None."""
        p = self.peer(device_id)
        return p if p is not None and all(p.get(k) == v for k, v in expect.items()) else None

    def wait_peer(self, device_id: str, timeout: float = 15.0, **expect: Any) -> dict[str, Any]:
        """Wait until the entry for `device_id` has all the `expect` values; the log on failure."""
        try:
            return wait_for(lambda: self.sees(device_id, **expect), timeout, f"{self.name} to see {expect}", poll=POLL)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- {self.name} log ---\n{self.log()[-6000:]}") from None

    def count_log(self, needle: str) -> int:
        """How many log lines contain `needle`."""
        return sum(needle in line for line in self.log().splitlines())

    # -- ending it ---------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Kill the process if it still runs and delete the home."""
        self.kill()
        shutil.rmtree(self.home, ignore_errors=True)


def cleanup_all(agents: Iterable[LanAgent]) -> None:
    """`cleanup()` every agent, even if one fails."""
    for agent in agents:
        try:
            agent.cleanup()
        except (OSError, subprocess.SubprocessError) as exc:  # keep going: the rest still needs it
            print(f"cleanup of {agent.name} failed: {exc}", file=sys.stderr)


def established(lan: Lan, host: int, port: int) -> list[tuple[str, str]]:
    """Established TCP connections in `host` that involve local or remote `port`: (local, remote) addresses."""
    r = lan.run(host, ["ss", "-Htn", "state", "established"], timeout=10)
    found: list[tuple[str, str]] = []
    for line in r.stdout.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        local, remote = fields[-2], fields[-1]
        if local.endswith(f":{port}") or remote.endswith(f":{port}"):
            found.append((local.rpartition(":")[0], remote.rpartition(":")[0]))
    return found


class ForgedAdvert:
    """`mdns_probe.py forge` in host `host`: publishes mDNS records with any content we like."""

    def __init__(self, lan: Lan, host: int, spec: list[dict[str, Any]], log_dir: Path) -> None:
        self.stderr_path = log_dir / f"forge-{host}.stderr"
        self.lines: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        with self.stderr_path.open("w") as err:
            self.proc = lan.popen(
                host,
                [sys.executable, str(PROBE), "forge", "--spec", json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                with self._cond:
                    self.lines.append(json.loads(line))
                    self._cond.notify_all()
        except (OSError, ValueError) as exc:  # the pipe closed under us (Lan.close), or a garbled line
            self.lines.append({"ev": "error", "error": str(exc)})
        finally:
            with self._cond:
                self.lines.append({"ev": "exit"})
                self._cond.notify_all()

    def wait_advertised(self, timeout: float = 10.0) -> None:
        """Wait until the records have been announced."""
        with self._cond:
            self._cond.wait_for(lambda: any(e["ev"] in ("advertised", "exit") for e in self.lines), timeout)
            ok = any(e["ev"] == "advertised" for e in self.lines)
        if not ok:
            raise AssertionError(f"forged advert not announced: {self.lines} {self.stderr_path.read_text()[-2000:]}")

    def stop(self) -> None:
        """Withdraw the records and end the process."""
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.write("stop\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._reader.join(timeout=5)


def pairs(items: list[T]) -> Iterator[tuple[T, T]]:
    """Every unordered pair of `items`."""
    for i, a in enumerate(items):
        for b in items[i + 1 :]:
            yield a, b
