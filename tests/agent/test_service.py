"""Running under systemd, without ever starting a systemd manager.

The unit file is checked by `systemd-analyze --user verify` (warnings count as failures); the
notify protocol is checked against a fake NOTIFY_SOCKET (a datagram socket we bind ourselves);
journal-style logging by setting JOURNAL_STREAM; and `status` latency with 50 known peers.
Agents run on loopback only, with static peers and no mDNS.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.host import unit as service
from testkit.agents import AgentProc, cli, fill_trust_store
from testkit.wait import wait_for

UNIT = Path(__file__).resolve().parents[2] / "agent" / "data" / service.UNIT_NAME
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.fixture
def procs() -> Iterator[list[AgentProc]]:
    """Agents a test starts; killed afterwards whatever happened."""
    started: list[AgentProc] = []
    yield started
    for p in started:
        p.kill()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No systemd variables leak in from whatever runs the tests."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "INVOCATION_ID"):
        monkeypatch.delenv(name, raising=False)


# -- the unit file ---------------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, dict[str, str]]:
    """Section -> key -> last value of a unit file (enough for the keys checked here)."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        else:
            key, _, value = line.partition("=")
            current[key.strip()] = value.strip()
    return sections


def analyze_verify(unit_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze --user verify` on `unit_dir/tofu-agent.service`; loads units, starts nothing."""
    assert SYSTEMD_ANALYZE is not None
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "XDG_CONFIG_HOME": str(tmp_path / "xdg-config")}
    return subprocess.run(
        [SYSTEMD_ANALYZE, "--user", "--no-pager", "verify", str(unit_dir / service.UNIT_NAME)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_unit_file_declares_notify_watchdog_and_restart() -> None:
    svc = unit_settings(UNIT.read_text())["Service"]
    assert svc["Type"] == "notify"
    assert svc["Restart"] == "on-failure"
    assert re.fullmatch(r"[1-9]\d*(s|min)?", svc["WatchdogSec"]), svc["WatchdogSec"]
    assert svc["ExecStart"].startswith("@EXEC@ ")
    assert "@EXEC@" not in service.unit_text("/usr/bin/true")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    (unit_dir / service.UNIT_NAME).write_text(service.unit_text(f"{sys.executable} -m agent"))
    result = analyze_verify(unit_dir, tmp_path)
    # Any output on stderr is a finding (unknown keys, bad values, a missing executable).
    assert result.stderr == "", result.stderr
    assert result.returncode == 0, result.stdout


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_check_is_not_vacuous(tmp_path: Path) -> None:
    # The same check on a unit with a typo must complain, or the test above proves nothing.
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    text = service.unit_text(f"{sys.executable} -m agent").replace("Restart=on-failure", "Restart=on-failur")
    (unit_dir / service.UNIT_NAME).write_text(text)
    assert analyze_verify(unit_dir, tmp_path).stderr != ""


# -- the notify protocol ---------------------------------------------------------------------------


class FakeNotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket; records (monotonic time, fields)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, list[str]]] = []

    def receive_until(self, field: str, timeout: float) -> float:
        """Receive messages until one carries `field`; its arrival time."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {field} within {timeout} s; got {self.messages}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            now = time.monotonic()
            fields = data.decode().split("\n")
            self.messages.append((now, fields))
            if field in fields:
                return now

    def times(self, field: str) -> list[float]:
        """When each message carrying `field` arrived."""
        return [t for t, fields in self.messages if field in fields]

    def close(self) -> None:
        self.sock.close()


@pytest.mark.usefixtures("clean_env")
@pytest.mark.slow
def test_notify_ready_watchdog_stopping(homes: list[Path], procs: list[AgentProc]) -> None:
    notify = FakeNotifySocket(homes[1] / "notify.sock")
    try:
        agent = AgentProc(homes[0], "notified")
        procs.append(agent)
        env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"}  # 2 s: a ping every ~1 s
        _spawn(agent, env)  # no waiting on `status`: READY=1 is the signal
        ready = notify.receive_until("READY=1", 20)
        # READY=1 means listening: the TCP port and the control socket answer right now.
        with socket.create_connection(("127.0.0.1", agent.port), timeout=2):
            pass
        assert agent.status() is not None
        # Watchdog pings keep coming, each well inside the 2 s timeout.
        for _ in range(3):
            notify.receive_until("WATCHDOG=1", 2.0)
        pings = [t for t in notify.times("WATCHDOG=1") if t >= ready - 0.5]
        assert len(pings) >= 3
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert all(0.3 < g < 1.9 for g in gaps), gaps
        # SIGTERM: STOPPING=1, then a clean exit within 5 s.
        assert agent.proc is not None
        t0 = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        notify.receive_until("STOPPING=1", 5)
        agent.proc.wait(5)
        assert time.monotonic() - t0 < 5.0
        assert agent.proc.returncode == 0, agent.log()
        assert len(notify.times("READY=1")) == 1
        assert notify.times("READY=1")[0] < notify.times("STOPPING=1")[0]
    finally:
        notify.close()


def _spawn(agent: AgentProc, env: dict[str, str]) -> None:
    """Start `agent` (loopback, no mDNS) without waiting for it: the caller waits on READY=1."""
    loopback = ["--port", str(agent.port), "--bind", "127.0.0.1", "--name", agent.name]
    log = agent.log_path.open("a")
    agent.proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "--home", str(agent.home), "run", "--no-mdns", *loopback],
        stdout=log,
        stderr=log,
        text=True,
        env={**os.environ, **env},
    )
    log.close()


# -- logging under the journal ---------------------------------------------------------------------

JOURNAL_LINE = re.compile(r"<[0-7]>\S")
PLAIN_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) +\S")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d")


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize("journal", [True, False], ids=["journal", "terminal"])
@pytest.mark.slow
def test_log_format(homes: list[Path], procs: list[AgentProc], journal: bool) -> None:
    # A manual-policy agent logs INFO (listening) and WARNING (a new device waits for approval).
    env = {"JOURNAL_STREAM": "8:12345"} if journal else {}
    gate = AgentProc(homes[0], "gate")
    other = AgentProc(homes[1], "visitor")
    procs += [gate, other]
    gate.start("--trust-policy", "manual", env=env)
    other.start(peers=[gate])
    wait_for(lambda: "waits for approval" in gate.log(), 15, "the pending-device warning")
    gate.stop()
    lines = [line for line in gate.log().splitlines() if line]
    assert lines
    if journal:
        bad = [line for line in lines if not JOURNAL_LINE.match(line) or TIMESTAMP.search(line)]
        assert not bad, bad
        assert any(line.startswith("<6>") for line in lines), lines
        assert any(line.startswith("<4>") and "waits for approval" in line for line in lines), lines
    else:
        bad = [line for line in lines if not PLAIN_LINE.match(line)]
        assert not bad, bad
        assert any(" INFO " in line for line in lines), lines
        assert any(" WARNING " in line and "waits for approval" in line for line in lines), lines


# -- status latency ----------------------------------------------------------------------------------

KNOWN_PEERS = 50
STATUS_RUNS = 7
# The goal is 300 ms (bench/status_time.py measures it strictly); the test only catches a
# regression by an order of magnitude, so a loaded CI machine does not make it flaky.
STATUS_BOUND = 1.5


def tofu_agent_command() -> list[str]:
    """The installed `tofu-agent` script next to this Python, else `python -m agent`."""
    script = Path(sys.executable).with_name("tofu-agent")
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent"]


def timed_status(home: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    """One `tofu-agent --home HOME status --json` as a fresh process; (seconds, result)."""
    t0 = time.perf_counter()
    result = subprocess.run(
        [*tofu_agent_command(), "--home", str(home), "status", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return time.perf_counter() - t0, result


@pytest.mark.usefixtures("clean_env")
@pytest.mark.slow
def test_status_is_quick_with_50_known_peers(homes: list[Path], procs: list[AgentProc]) -> None:
    assert cli(homes[0], "id").returncode == 0  # the identity first, so the store is the agent's own
    fill_trust_store(homes[0], KNOWN_PEERS)
    agent = AgentProc(homes[0], "busy")
    procs.append(agent)
    agent.start()
    timings = []
    for _ in range(STATUS_RUNS):
        took, result = timed_status(homes[0])
        assert result.returncode == 0, result.stderr
        timings.append(took)
    st = agent.status()
    assert st is not None and len(st["peers"]) == KNOWN_PEERS
    median = statistics.median(timings)
    print(f"status --json with {KNOWN_PEERS} peers: median {median * 1000:.0f} ms of {timings}")
    assert median < STATUS_BOUND, timings
