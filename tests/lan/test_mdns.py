"""Real mDNS between processes in private network namespaces (never in the root namespace).

Each host runs testkit/mdns_probe.py, which prints discovery events as JSON lines; the tests
wait for conditions on those lines with deadlines, never for fixed sleeps.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.identity.keys import new_device_id
from testkit import ROOT
from testkit.netns import Lan

pytestmark = [pytest.mark.lan, pytest.mark.slow]  # real agents in network namespaces

PROBE = ROOT / "testkit" / "mdns_probe.py"
DEADLINE = 10.0

Event = dict[str, Any]


class Probe:
    """One probe process; its events are collected by a thread and waited on with a condition."""

    def __init__(self, lan: Lan, host: int, args: list[str], log_dir: Path) -> None:
        self.host = host
        self.stderr_path = log_dir / f"probe-{host}-{secrets.token_hex(2)}.stderr"
        self._stderr = self.stderr_path.open("w")
        self.proc = lan.popen(
            host,
            [sys.executable, str(PROBE), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.events: list[Event] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.events.append(json.loads(line))
                self._cond.notify_all()
        with self._cond:
            self.events.append({"ev": "exit"})
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[Event], bool], what: str, timeout: float = DEADLINE) -> Event:
        """The first event matching `pred`, waiting up to `timeout` seconds for it."""
        found: list[Event] = []

        def match() -> bool:
            found[:] = [e for e in self.events if pred(e)][:1]
            return bool(found) or any(e["ev"] == "exit" for e in self.events)

        with self._cond:
            self._cond.wait_for(match, timeout)
        if not found:
            raise AssertionError(
                f"host {self.host}: no {what} within {timeout} s; events {self.events}; "
                f"stderr {self.stderr_path.read_text()[-2000:]}"
            )
        return found[0]

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send("stop")
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        self._stderr.close()


class Agent(Probe):
    def __init__(self, lan: Lan, host: int, log_dir: Path, *extra: str) -> None:
        self.device_id = new_device_id()
        self.fp = secrets.token_hex(32)
        super().__init__(
            lan,
            host,
            ["agent", "--device-id", self.device_id, "--fp", self.fp, "--name", f"host {host}", *extra],
            log_dir,
        )

    def started_at(self) -> float:
        return float(self.wait_for(lambda e: e["ev"] == "started", "start")["t"])

    def wait_seen(self, other: Agent, fp: str | None = None) -> Event:
        return self.wait_for(
            lambda e: e["ev"] == "seen" and e["device_id"] == other.device_id and (fp is None or e["fp"] == fp),
            f"PeerSeen for host {other.host}",
        )


@pytest.fixture
def probes(tmp_path: Path) -> Iterator[list[Probe]]:
    started: list[Probe] = []
    yield started
    for probe in started:
        probe.close()


def test_discovery_lifecycle(lan3: Lan, probes: list[Probe], tmp_path: Path) -> None:
    a, b = Agent(lan3, 0, tmp_path), Agent(lan3, 1, tmp_path)
    probes += [a, b]
    # Two agents starting together: each appears once its probing (~1.2 s) is over.
    ab = a.wait_seen(b)["t"] - b.started_at()
    ba = b.wait_seen(a)["t"] - a.started_at()
    seen = a.wait_seen(b)
    assert seen["addresses"] == [lan3.hosts[1].address]
    assert seen["port"] == 22000
    assert seen["name"] == "host 1"
    assert seen["fp"] == b.fp

    # A late joiner browses at once and sees the existing agents long before its own probing ends.
    c = Agent(lan3, 2, tmp_path)
    probes.append(c)
    ca = c.wait_seen(a)["t"] - c.started_at()
    cb = c.wait_seen(b)["t"] - c.started_at()
    ac = a.wait_seen(c)["t"] - c.started_at()
    bc = b.wait_seen(c)["t"] - c.started_at()

    # Key rotation: the new fingerprint hint reaches the others.
    new_fp = secrets.token_hex(32)
    c.send(f"update {new_fp}")
    updated_at = c.wait_for(lambda e: e["ev"] == "updated", "update done")["t"]
    a.wait_seen(c, fp=new_fp)
    b.wait_seen(c, fp=new_fp)
    assert updated_at > 0

    # A clean stop sends goodbyes: the others report PeerGone quickly.
    c.send("stop")
    stopped = c.wait_for(lambda e: e["ev"] == "stopped", "stop")
    assert stopped["stop_s"] < 2.0
    gone_a = a.wait_for(lambda e: e["ev"] == "gone" and e["device_id"] == c.device_id, "PeerGone for c")
    gone_b = b.wait_for(lambda e: e["ev"] == "gone" and e["device_id"] == c.device_id, "PeerGone for c")

    for agent in (a, b, c):
        assert not any(e["ev"] == "seen" and e["device_id"] == agent.device_id for e in agent.events)
    print(
        f"\nmDNS timings: simultaneous start a->b {ab:.2f} s, b->a {ba:.2f} s; late joiner sees "
        f"existing a {ca:.2f} s, b {cb:.2f} s; existing see joiner a {ac:.2f} s, b {bc:.2f} s; "
        f"goodbye->PeerGone a {gone_a['t'] - stopped['t'] + stopped['stop_s']:.2f} s, "
        f"b {gone_b['t'] - stopped['t'] + stopped['stop_s']:.2f} s; stop {stopped['stop_s']:.2f} s"
    )


def _valid_props(device_id: str | None = None, **override: str | None) -> dict[str, str]:
    """Valid TXT properties with some replaced; a None value drops the key."""
    props: dict[str, str | None] = {
        "v": "1",
        "id": device_id or new_device_id(),
        "fp": secrets.token_hex(32),
        "name": "forged",
    }
    props.update(override)
    return {k: v for k, v in props.items() if v is not None}


def test_forged_records_are_ignored(lan3: Lan, probes: list[Probe], tmp_path: Path) -> None:
    a = Agent(lan3, 0, tmp_path)
    probes.append(a)
    a.started_at()
    bad = {
        "bad-version": _valid_props(v="2"),
        "bad-fp": _valid_props(fp="F" * 64),
        "short-id": _valid_props(id="ABC"),
        "no-name": _valid_props(name=None),
        "huge-name": _valid_props(name="x" * 200),
        "spoofs-self": _valid_props(device_id=a.device_id),
    }
    control_id = new_device_id()
    spec = [{"instance": k, "props": v} for k, v in bad.items()]
    spec.append({"instance": "control", "props": _valid_props(device_id=control_id)})
    probes.append(Probe(lan3, 1, ["forge", "--spec", json.dumps(spec)], tmp_path))

    a.wait_for(lambda e: e["ev"] == "seen" and e["device_id"] == control_id, "the valid forged record")
    for instance in bad:
        a.wait_for(
            lambda e, i=instance: e["ev"] == "ignored" and e["service_name"].startswith(i + "."),  # type: ignore[misc]
            f"ignored {instance}",
        )
    seen = {e["service_name"].split(".")[0] for e in a.events if e["ev"] == "seen"}
    assert seen == {"control"}


def test_flood_is_bounded(lan3: Lan, probes: list[Probe], tmp_path: Path) -> None:
    a = Agent(lan3, 0, tmp_path, "--max-services", "16")
    probes.append(a)
    a.started_at()
    spec = [{"instance": f"flood-{i}", "props": _valid_props()} for i in range(40)]
    probes.append(Probe(lan3, 1, ["forge", "--spec", json.dumps(spec)], tmp_path))
    a.wait_for(lambda e: e["ev"] == "ignored" and "tracking 16" in e["reason"], "the cap to bite")
    a.wait_for(lambda e: len(_seen_ids(a)) >= 16, "16 peers")
    assert len(_seen_ids(a)) == 16


def _seen_ids(probe: Probe) -> set[str]:
    return {e["device_id"] for e in probe.events if e["ev"] == "seen"}


# -- the harness itself ---------------------------------------------------------------------------

CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()"
LISTEN = (
    "import socket; s = socket.create_server(('0.0.0.0', 0)); print(s.getsockname()[1], flush=True)\n"
    "while True: s.accept()[0].close()"
)


def test_lan_disconnect_and_reconnect(lan3: Lan) -> None:
    server = lan3.popen(1, [sys.executable, "-c", LISTEN], stdout=subprocess.PIPE)
    assert server.stdout is not None
    port = server.stdout.readline().strip()
    target = [sys.executable, "-c", CONNECT, lan3.hosts[1].address, port]
    assert lan3.run(0, target, check=False).returncode == 0
    lan3.disconnect(1)
    assert lan3.run(0, target, check=False).returncode != 0
    assert lan3.run(2, target, check=False).returncode != 0
    lan3.reconnect(1)
    assert lan3.run(0, target, check=False).returncode == 0


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_lan_is_deleted_even_when_the_test_fails() -> None:
    with pytest.raises(RuntimeError), Lan(2) as lan:
        names = {lan.hub, *(h.name for h in lan.hosts)}
        assert names <= _namespaces()
        lan.popen(0, [sys.executable, "-c", "import signal; signal.pause()"])  # a process to clean up
        raise RuntimeError("test failed")
    assert not names & _namespaces()
