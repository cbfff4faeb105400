"""The victim: a real agent paired with a real legitimate agent, and the checks run after each attack.

One victim serves the whole hostile session (starting agents costs seconds); attacks that must
change trust get their own pair (`fresh_pair`). After every attack `victim.check_after(before)`
asserts that the agent survived: the legitimate agent is still connected on both sides, a new
honest handshake from a pinned probe identity reaches OPEN, the trust store holds the same pins
and the trust log gained only what the attack is expected to add, and RSS grew only modestly.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.app import control
from agent.host.paths import resolve_paths
from agent.identity.keys import Identity
from testkit.agents import AgentProc, TrustSnapshot, fast_peer, rss_kib, snapshot
from testkit.homes import configure, new_home
from testkit.peer import HostileServer, ProtocolClient, SyncPeer, new_identity
from testkit.wait import wait_for

PROBE_SOURCE = "127.0.0.250"
RSS_SLACK_KIB = 16 * 1024  # "modest growth" after one attack


@dataclass
class Before:
    trust: TrustSnapshot
    rss: int


@dataclass
class Victim:
    """The agent under attack (`agent`), its paired legitimate peer (`legit`), and a pinned probe."""

    agent: AgentProc
    legit: AgentProc
    agent_id: str
    legit_id: str
    probe: Identity
    server: HostileServer  # a static peer of `agent`: it dials this hostile server
    homes: list[Path] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.agent.port

    @property
    def pid(self) -> int:
        assert self.agent.proc is not None
        return self.agent.proc.pid

    def rss(self) -> int:
        return rss_kib(self.pid)

    def before(self) -> Before:
        """What to compare against after an attack."""
        return Before(snapshot(self.agent.home), self.rss())

    def redial(self) -> None:
        """Make the agent dial its static peers now (resets their backoff), via the control socket."""
        args = {"device_id": self.server.who.device_id}  # matches its target once it has proven that id
        control.request(resolve_paths(self.agent.home).control_socket, "trust_changed", args)

    def probe_handshake(self, source: str = PROBE_SOURCE) -> None:
        """A pinned honest peer completes a new handshake and gets a PONG answer to a PING."""
        with ProtocolClient(self.port, self.probe, source=source) as client:
            assert client.handshake(), f"the probe was not admitted: {client.log.events}\n{self.agent.log()[-3000:]}"

    def check_after(
        self,
        before: Before,
        *,
        expected_events: tuple[tuple[str, str], ...] = (),
        changed: frozenset[str] = frozenset(),
        rss_slack_kib: int = RSS_SLACK_KIB,
    ) -> None:
        """The agent survived the attack; see the module docstring.

        `expected_events` are the (device_id, kind) the attack should log; `changed` the devices
        whose record it is expected to change (a throw-away device the attack targets).
        """
        assert self.agent.proc is not None and self.agent.proc.poll() is None, "the agent died"
        wait_connected(self.agent, self.legit_id)
        wait_connected(self.legit, self.agent_id)
        self.probe_handshake()
        after = snapshot(self.agent.home)
        pins_after = {d: p for d, p in after.pins().items() if d not in changed}
        pins_before = {d: p for d, p in before.trust.pins().items() if d not in changed}
        assert pins_after == pins_before, "the attack changed a pin or a trust level"
        # Handshakes of pinned peers (the probe's, for one) add `match` events; anything else must be expected.
        new = [(e["device_id"], e["kind"]) for e in after.new_events(before.trust) if e["kind"] != "match"]
        assert new == list(expected_events), f"unexpected trust events: {new}"
        growth = self.rss() - before.rss
        assert growth < rss_slack_kib, f"RSS grew by {growth} KiB"
        assert "Traceback" not in self.agent.log(), self.agent.log()[-4000:]


def wait_connected(agent: AgentProc, device_id: str, timeout: float = 10.0, trust: str = "tofu") -> dict[str, Any]:
    """Wait until `agent` shows `device_id` connected with `trust`; its log on failure."""

    def check() -> dict[str, Any] | None:
        p = fast_peer(agent, device_id)
        return p if p and p["connected"] and p["trust"] == trust else None

    try:
        return wait_for(check, timeout, f"{agent.name} to show {device_id} connected")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- {agent.name} log ---\n{agent.log()[-4000:]}") from None


def start_pair(
    homes: list[Path], names: tuple[str, str] = ("victim", "legit"), extra_peers: tuple[int, ...] = ()
) -> tuple[AgentProc, AgentProc, str, str]:
    a = AgentProc(configure(homes[0]), names[0])
    b = AgentProc(configure(homes[1]), names[1])
    a.start(peers=[b, *(AgentProc(homes[0], "static", port) for port in extra_peers)])
    b.start(peers=[a])
    ida, idb = a.identity()["device_id"], b.identity()["device_id"]
    wait_connected(a, idb, 15)
    wait_connected(b, ida, 15)
    return a, b, ida, idb


@pytest.fixture(scope="session")
def victim() -> Iterator[Victim]:
    homes = [new_home("ta-h-"), new_home("ta-h-")]
    server = HostileServer(new_identity("evil-server"), homes[1])
    a, b, ida, idb = start_pair(homes, extra_peers=(server.port,))
    v = Victim(a, b, ida, idb, new_identity("probe"), server, homes)
    try:
        v.probe_handshake()  # pins the probe (trust on first use)
        yield v
    finally:
        server.close()
        for p in (a, b):
            p.kill()
        for h in homes:
            shutil.rmtree(h, ignore_errors=True)


@pytest.fixture
def fresh_pair() -> Iterator[tuple[AgentProc, AgentProc, str, str]]:
    """A victim and legitimate agent of their own, for attacks that change trust."""
    homes = [new_home("ta-h-"), new_home("ta-h-")]
    pair = start_pair(homes)
    try:
        yield pair
    finally:
        for p in pair[:2]:
            assert isinstance(p, AgentProc)
            p.kill()
        for h in homes:
            shutil.rmtree(h, ignore_errors=True)


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = new_home("ta-x-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- a victim that syncs a folder --------------------------------------------------------------

ATTACKER_SOURCE = "127.0.0.3"
SYNC_RSS_SLACK_KIB = 24 * 1024


def tree(root: Path) -> dict[str, str]:
    """{relative path: 'dir' | 'link:TARGET' | sha256 of the content} of everything under `root`."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = f"link:{os.readlink(path)}"
            elif path.is_dir():
                out[rel] = "dir"
            elif name.startswith(".tofu-tmp-"):
                out[rel] = "temp"  # may be a sparse claim of 128 GiB: never read
            else:
                with path.open("rb") as fh:
                    out[rel] = hashlib.file_digest(fh, "sha256").hexdigest()
    return out


def is_temp(rel: str) -> bool:
    return Path(rel).name.startswith(".tofu-tmp-")


@dataclass
class SyncBefore:
    trust: TrustSnapshot
    rss: int
    folder: dict[str, str]
    canary: dict[str, str]
    home: set[str]
    log_at: int  # length of the victim's log: only what the attack made it write is checked


@dataclass
class SyncVictim:
    """A real agent syncing folder `default` at HOME/f with a legitimate agent, and a pinned attacker.

    Next to the folder is HOME/canary (a secret file and a directory) that nothing may touch; the
    folder holds symlinks planted by its owner pointing there (`trap` -> the canary directory,
    `trapfile` -> the secret, `hostlink` -> /etc/hostname), which the agent must never follow.
    """

    agent: AgentProc
    legit: AgentProc
    agent_id: str
    legit_id: str
    attacker: Identity
    homes: list[Path]
    probes: int = 0
    open_peers: list[SyncPeer] = field(default_factory=list)  # closed by the next `peer()` if a test failed

    @property
    def port(self) -> int:
        return self.agent.port

    @property
    def folder(self) -> Path:
        return self.homes[0] / "f"

    @property
    def legit_folder(self) -> Path:
        return self.homes[1] / "f"

    @property
    def canary(self) -> Path:
        return self.homes[0] / "canary"

    @property
    def pid(self) -> int:
        assert self.agent.proc is not None
        return self.agent.proc.pid

    def peer(self, *, source: str = ATTACKER_SOURCE) -> SyncPeer:
        """A connected attacker that said FOLDER_HELLO (close it with `done`)."""
        while self.open_peers:  # a failed test left its attacker connected: it must not fail the next
            self.open_peers.pop().close()
        self.wait_attacker_gone()
        p = SyncPeer(self.port, self.attacker, source=source)
        p.start()
        self.open_peers.append(p)
        return p

    def done(self, p: SyncPeer) -> None:
        p.close()
        self.wait_attacker_gone()

    def wait_attacker_gone(self) -> None:
        """The victim noticed our last attack connection closed (else the next is a duplicate)."""
        wait_for(
            lambda: not (fast_peer(self.agent, self.attacker.device_id) or {}).get("connected"),
            10,
            "the victim to drop the attacker",
        )

    def before(self) -> SyncBefore:
        return SyncBefore(
            snapshot(self.agent.home), rss_kib(self.pid), tree(self.folder), tree(self.canary),
            {p.name for p in self.homes[0].iterdir()}, len(self.agent.log()),
        )  # fmt: skip

    def folder_status(self) -> dict[str, Any]:
        st = control.request(resolve_paths(self.agent.home).control_socket, "status", timeout=5.0)
        assert isinstance(st, dict)
        folder: dict[str, Any] = st["folders"][0]
        return folder

    def legit_still_syncs(self) -> None:
        """A file created on the legitimate agent reaches the victim, byte for byte."""
        self.probes += 1
        name = f"probe-{self.probes}-{secrets.token_hex(3)}.txt"
        data = secrets.token_bytes(1000 + self.probes)
        (self.legit_folder / name).write_bytes(data)
        target = self.folder / name
        try:
            wait_for(lambda: target.exists() and target.read_bytes() == data, 20, f"{name} to reach the victim")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- victim log ---\n{self.agent.log()[-4000:]}") from None

    def check_after(
        self,
        before: SyncBefore,
        *,
        allowed: frozenset[str] = frozenset(),
        rss_slack_kib: int = SYNC_RSS_SLACK_KIB,
        traceback_ok: bool = False,
        legit_drop_ok: bool = False,
    ) -> None:
        """The victim survived: still syncs with the legitimate peer, wrote nothing outside its folder,
        changed in its folder only the names in `allowed` (their parents and contents), kept its trust store
        (only `match` events), and grew by less than `rss_slack_kib` of RSS."""
        assert self.agent.proc is not None and self.agent.proc.poll() is None, "the victim died"
        wait_connected(self.agent, self.legit_id)
        wait_connected(self.legit, self.agent_id)
        self.legit_still_syncs()
        assert tree(self.canary) == before.canary, "the canary next to the folder changed"
        assert {p.name for p in self.homes[0].iterdir()} == before.home, "a file appeared next to the folder"
        after = tree(self.folder)

        def relevant(d: dict[str, str]) -> dict[str, str]:
            return {
                k: v for k, v in d.items()
                if not is_temp(k) and not k.startswith("probe-")
                and not any(k == a or a.startswith(k + "/") or k.startswith(a + "/") for a in allowed)
            }  # fmt: skip

        assert relevant(after) == relevant(before.folder), "the folder changed beyond what the attack may do"
        t = snapshot(self.agent.home)
        assert t.pins() == before.trust.pins(), "the attack changed a pin or a trust level"
        new = [(e["device_id"], e["kind"]) for e in t.new_events(before.trust) if e["kind"] != "match"]
        assert new == [], f"unexpected trust events: {new}"
        growth = rss_kib(self.pid) - before.rss
        assert growth < rss_slack_kib, f"RSS grew by {growth} KiB"
        log = self.agent.log()[before.log_at :]
        if not traceback_ok:
            assert "Traceback" not in log, log[-4000:]
        dropped = "disconnected from legit" in log
        assert legit_drop_ok or not dropped, f"the legitimate peer's link dropped: {log[-4000:]}"


@pytest.fixture(scope="session")
def sync_victim() -> Iterator[SyncVictim]:
    homes = [configure(new_home("ta-s-")), configure(new_home("ta-s-"))]
    folder, legit_folder, canary = homes[0] / "f", homes[1] / "f", homes[0] / "canary"
    for d in (folder / "sub", legit_folder, canary / "inner"):
        d.mkdir(parents=True)
    (canary / "secret.txt").write_bytes(b"canary secret " + secrets.token_bytes(64))
    (canary / "inner" / "evil.txt").write_bytes(b"pre-existing canary file")
    (folder / "keep.txt").write_bytes(b"the victim's own file")
    (folder / "sub" / "data.bin").write_bytes(secrets.token_bytes(300_000))
    (folder / "trap").symlink_to(canary)
    (folder / "trapfile").symlink_to(canary / "secret.txt")
    (folder / "hostlink").symlink_to("/etc/hostname")
    (legit_folder / "from-legit.txt").write_bytes(b"legit's file")
    a, b = AgentProc(homes[0], "victim"), AgentProc(homes[1], "legit")
    try:
        a.start("--folder", str(folder), peers=[b])
        b.start("--folder", str(legit_folder), peers=[a])
        ida, idb = a.identity()["device_id"], b.identity()["device_id"]
        wait_connected(a, idb, 15)
        wait_connected(b, ida, 15)
        wait_for(lambda: (legit_folder / "keep.txt").exists() and (folder / "from-legit.txt").exists(), 20,
                 "the first sync")  # fmt: skip
        v = SyncVictim(a, b, ida, idb, new_identity("mallory"), homes)
        with SyncPeer(v.port, v.attacker, source=ATTACKER_SOURCE) as first:  # pinned on first use
            first.start()
        v.wait_attacker_gone()
        yield v
    finally:
        for p in (a, b):
            p.kill()
        for h in homes:
            shutil.rmtree(h, ignore_errors=True)
