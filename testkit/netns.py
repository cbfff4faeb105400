"""A private LAN in Linux network namespaces, for tests that need real multicast.

One hub namespace holds a bridge; each host namespace is joined to it by a veth pair and gets
10.231.X.(i+1)/24 on `eth0` (X random per run). Nothing is created in the root namespace, so the
host's own interfaces and routes are never touched. `Lan` is a context manager that deletes all of
it (and kills the processes it started) even when the test fails.

    with Lan(3) as lan:
        proc = lan.popen(0, [sys.executable, "probe.py"], stdout=subprocess.PIPE)
        lan.disconnect(1)  # cable pulled
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

PREFIX = "tofu-t"
HOST_IF = "eth0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=20)


@functools.cache
def netns_available() -> str | None:
    """None if network namespaces with veth and bridge work here, else why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns add)"
    if shutil.which("ip") is None:
        return "network namespace tests need the `ip` tool (iproute2)"
    probe = f"{PREFIX}-probe-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"`ip netns add` failed: {_describe(exc)}"
    try:
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
        _ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    except (subprocess.SubprocessError, OSError) as exc:
        return f"cannot create bridge/veth in a network namespace: {_describe(exc)}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        return (exc.stderr or "").strip() or str(exc)
    return str(exc)


@dataclass(frozen=True, slots=True)
class Host:
    """One machine on the LAN: its namespace, address and interface names."""

    index: int
    name: str  # network namespace name
    address: str  # IPv4 address on `interface`
    interface: str  # inside the host namespace
    hub_port: str  # the veth end on the bridge, inside the hub namespace


class Lan:
    """A bridge in a hub namespace and `n` host namespaces attached to it; a context manager."""

    def __init__(self, n: int, *, subnet: int | None = None) -> None:
        if not 1 <= n <= 200:
            raise ValueError("between 1 and 200 hosts")
        suffix = secrets.token_hex(3)
        self.third_octet = subnet if subnet is not None else 1 + secrets.randbelow(254)
        self.prefix = f"10.231.{self.third_octet}"
        self.hub = f"{PREFIX}-{suffix}-hub"
        self.hosts = [Host(i, f"{PREFIX}-{suffix}-h{i}", f"{self.prefix}.{i + 1}", HOST_IF, f"p{i}") for i in range(n)]
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> Self:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._add_ns(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for host in self.hosts:
            self._add_ns(host.name)
            _ip("-n", self.hub, "link", "add", host.hub_port, "type", "veth",
                "peer", "name", host.interface, "netns", host.name)  # fmt: skip
            _ip("-n", self.hub, "link", "set", host.hub_port, "master", "br0", "up")
            _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", host.interface)
            _ip("-n", host.name, "link", "set", host.interface, "multicast", "on", "up")
            _ip("-n", host.name, "route", "add", "224.0.0.0/4", "dev", host.interface)

    def close(self) -> None:
        """Kill the processes started here and delete every namespace (and so every link)."""
        for proc in self._procs:
            _stop(proc)
        self._procs.clear()
        for name in reversed(self._namespaces):
            _ip("netns", "del", name, check=False)
        self._namespaces.clear()

    def exec_argv(self, i: int, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped to run inside host `i`'s namespace."""
        return ["ip", "netns", "exec", self.hosts[i].name, *argv]

    def run(
        self, i: int, argv: Sequence[str], *, check: bool = True, timeout: float = 30, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in host `i` and wait for it; output is captured as text."""
        kw.setdefault("capture_output", True)
        return subprocess.run(self.exec_argv(i, argv), check=check, timeout=timeout, text=True, **kw)

    def popen(self, i: int, argv: Sequence[str], **kw: Any) -> subprocess.Popen[str]:
        """Start `argv` in host `i` (text mode); it is killed when the Lan closes."""
        proc: subprocess.Popen[str] = subprocess.Popen(self.exec_argv(i, argv), text=True, **kw)
        self._procs.append(proc)
        return proc

    def disconnect(self, i: int) -> None:
        """Pull host `i`'s cable: its bridge port goes down, so it neither sends nor receives."""
        _ip("-n", self.hub, "link", "set", self.hosts[i].hub_port, "down")

    def reconnect(self, i: int) -> None:
        """Plug host `i` back in."""
        _ip("-n", self.hub, "link", "set", self.hosts[i].hub_port, "up")


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=3)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
