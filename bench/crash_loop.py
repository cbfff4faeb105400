"""SIGKILL agents at random moments of pairing churn, folder sync and key rotation; check what survives.

    .venv/bin/python bench/crash_loop.py [--during all|trust|sync|writing|rotate] [--kills 50] [--seed N]

`--kills` is per mode; `--during all` (the default) runs trust, sync, writing, then rotate.

**trust.** Two real agents (A, B) on loopback are static peers of each other. Meanwhile a
background client keeps pairing fresh strangers with A (each a first-use pin written to A's trust
store) and reconnecting a pinned one (a `match` event each time), so a kill lands in the middle of
trust-store writes. Each round SIGKILLs A or B at a random moment (0-1.5 s into its start-up, or
during steady state), restarts it, and checks:

- `PRAGMA integrity_check` is "ok" on every SQLite database under its home;
- A and B show each other connected again, with the same pins as before;
- every stranger A acknowledged (its handshake reached OPEN, so A had committed the pin before
  sending READY) is still in A's trust store: nothing acknowledged was lost.

**sync.** A sender and a receiver sync folder `default`. Each round the sender gets new content
(`--big` files of `--big-mib` MiB of random data overwritten with new data, plus `--small` new
small files in a new directory; the small files of two rounds back are deleted), every file moved
into place by one rename from outside the folder, so every version the sender ever had is known.
As soon as the receiver starts receiving, it is SIGKILLed 0-`--window` s later, and while it is down:

- `PRAGMA integrity_check` on every database under its home;
- torn: a file in its folder whose bytes are no version the sender ever had;
- stray: a name the sender never had (`.tofu-tmp-*` files are allowed while it is down);
- lost: a file the receiver held at its last convergence that is neither at its name with the
  same bytes nor kept in `.tofu-versions` (the sender's change replaced or deleted it, and a kill
  while the version was moved must leave the file or its version, never neither).

Then it restarts and must converge (same names and bytes as the sender, folder `idle`,
`need_files` 0) with no `.tofu-tmp-*` file left; integrity is checked again on both agents.

**writing.** A program writes files into the sender's folder in place, a piece at a time (eight
new files of 0.5-4 MiB a round and an overwrite of last round's), and the sender is SIGKILLed or
SIGTERMed 0-1 s into the writing and restarted at once, while the writing goes on: its start-up
scan meets files mid-write. After the last write both agents must be `idle` with the same names
and bytes, and no temp file left; integrity is checked on both.

**rotate.** A rotator R and a peer P, paired and syncing a small folder. Each round picks one of:
`rotator` (`tofu-agent rotate-key` against the running R, and R SIGKILLed 0-1 s after the
command started: before, during or after the rotation), `peer` (rotate-key completes, then P is
SIGKILLed 0-1.5 s later while it re-handshakes with R's new key), `peer-down` (P killed, R rotates
while P is down, P restarts). After the restart: integrity on every database of both agents; both
connected again; P's pin of R is R's newest fingerprint; R's pin of P unchanged; no `key_changed`
event on either side; a file made on R reaches P.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.app import control  # noqa: E402
from agent.errors import ProtocolError, TofuError  # noqa: E402
from agent.host.paths import resolve_paths  # noqa: E402
from testkit.agents import AgentProc, cli, fast_peer, snapshot  # noqa: E402
from testkit.homes import configure, new_home  # noqa: E402
from testkit.peer import ProtocolClient, new_identity  # noqa: E402
from testkit.wait import seconds_until  # noqa: E402

MiB = 1024 * 1024
TEMP_PREFIX = ".tofu-tmp-"
MARKER = ".tofu-folder"
VERSIONS = ".tofu-versions"


def integrity(home: Path) -> dict[str, str]:
    """`PRAGMA integrity_check` of every database under `home` (opened read-write, as a restart would)."""
    out = {}
    for db in sorted(home.rglob("*.db")):
        with sqlite3.connect(db, timeout=10) as conn:
            out[str(db.relative_to(home))] = str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    return out


def paired(a: AgentProc, ida: str, b: AgentProc, idb: str) -> bool:
    """`a` shows `b` connected and `b` shows `a` connected (asked over their control sockets)."""
    return bool((fast_peer(a, idb) or {}).get("connected") and (fast_peer(b, ida) or {}).get("connected"))


@dataclass
class ModeResult:
    """What one mode saw; `failures` is empty when everything held."""

    mode: str
    kills: int = 0
    integrity_checks: int = 0
    integrity_failed: int = 0
    converged: int = 0
    mid_transfer: int = 0
    torn: int = 0
    stray: int = 0
    lost: int = 0  # sync: files replaced or deleted by the sender, neither in place nor kept as a version
    temps_left: int = 0
    key_changed: int = 0
    rotations: int = 0
    times: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    failures: list[str] = field(default_factory=list)

    def check_integrity(self, n: int, *homes: Path) -> None:
        for home in homes:
            for name, r in integrity(home).items():
                self.integrity_checks += 1
                if r != "ok":
                    self.integrity_failed += 1
                    self.failures.append(f"round {n}: integrity_check {home.name}/{name}: {r}")


def folder_of(agent: AgentProc) -> dict[str, Any] | None:
    """The agent's first folder status entry, asked over the control socket in-process (quick)."""
    try:
        st = control.request(resolve_paths(agent.home).control_socket, "status", timeout=5.0)
    except TofuError:
        return None
    folders = st.get("folders", []) if isinstance(st, dict) else []
    return dict(folders[0]) if folders else None


def tree(root: Path) -> dict[str, str]:
    """{name: sha256 hex, or "dir"} of everything under `root` but temp files and the folder marker."""
    out: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if name.startswith(TEMP_PREFIX) or rel.split("/")[0] in (MARKER, VERSIONS):  # ours, never synced
                continue
            if path.is_dir():
                out[rel] = "dir"
            else:
                try:
                    out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
                except FileNotFoundError:  # deleted under us by the running agent
                    continue
    return out


def kept_digests(root: Path) -> set[str]:
    """sha256 hex of every kept version in the folder's `.tofu-versions`."""
    out: set[str] = set()
    for path in (root / VERSIONS).rglob("*"):
        if path.is_file() and not path.is_symlink():
            out.add(hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def lost_versions(held: dict[str, str], root: Path) -> list[str]:
    """Files the receiver held that are neither at their name (same bytes) nor kept as a version."""
    now = tree(root)
    gone = {n: d for n, d in held.items() if d != "dir" and now.get(n) != d}
    kept = kept_digests(root) if gone else set()
    return sorted(n for n, d in gone.items() if d not in kept)


def differing(a: Path, b: Path) -> list[str]:
    """Names whose content differs between two folders (or that only one has), sorted."""
    mine, theirs = tree(a), tree(b)
    return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))


def temps(root: Path) -> list[Path]:
    return [p for p in root.rglob(TEMP_PREFIX + "*")]


def receiving(agent: AgentProc, folder: Path) -> bool:
    """The agent needs files or holds temp files: a transfer is in progress."""
    st = folder_of(agent) or {}
    return bool(st.get("need_files")) or st.get("state") not in (None, "idle") or bool(temps(folder))


def idle_and_same(sender: Path, receiver: AgentProc, folder: Path) -> bool:
    st = folder_of(receiver)
    if not st or st["state"] != "idle" or st["need_files"]:
        return False
    return not temps(folder) and tree(folder) == tree(sender)


class Strangers(threading.Thread):
    """Pairs new identities with A, and reconnects one pinned identity, until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.acknowledged: list[str] = []
        self.regular = new_identity("regular")
        self.stop = threading.Event()
        self.attempts = 0

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            who = self.regular if i % 2 else new_identity(f"s{i}")
            i += 1
            self.attempts += 1
            try:
                with ProtocolClient(self.port, who, source="127.0.0.90") as c:
                    if c.handshake(timeout=3) and who is not self.regular:
                        self.acknowledged.append(who.device_id)
            except (OSError, ProtocolError, AssertionError):
                self.stop.wait(0.05)


def cleanup(agents: list[AgentProc], homes: list[Path]) -> None:
    for p in agents:
        if p.proc is not None and p.proc.poll() is None:
            p.proc.send_signal(signal.SIGKILL)
            p.proc.wait(10)
    for h in homes:
        shutil.rmtree(h, ignore_errors=True)


def trust_loop(kills: int, rng: random.Random) -> tuple[ModeResult, Strangers | None]:
    res = ModeResult("trust")
    homes = [configure(new_home("ta-k-")), configure(new_home("ta-k-"))]
    a, b = AgentProc(homes[0], "alpha"), AgentProc(homes[1], "beta")
    strangers: Strangers | None = None
    try:
        a.start(peers=[b])
        b.start(peers=[a])
        ida, idb = a.identity()["device_id"], b.identity()["device_id"]

        def both() -> bool:
            return paired(a, ida, b, idb)

        if seconds_until(both, 20) is None:
            raise SystemExit("the agents did not pair")
        pins = (snapshot(a.home).pins()[idb], snapshot(b.home).pins()[ida])
        strangers = Strangers(a.port)
        strangers.start()
        t_start = time.monotonic()
        for n in range(1, kills + 1):
            victim = rng.choice([a, b])
            moment = rng.choice(["start-up", "steady"])
            if moment == "start-up":
                victim.kill()
                victim.start(peers=[b if victim is a else a])
            time.sleep(rng.uniform(0.0, 1.5))  # the random moment: this IS the point of the bench
            victim.kill()
            res.kills += 1
            acknowledged = list(strangers.acknowledged) if victim is a else []
            res.check_integrity(n, victim.home)
            t_restart = time.monotonic()
            victim.start(peers=[b if victim is a else a])
            ok = seconds_until(both, 30)
            took = None if ok is None else time.monotonic() - t_restart  # includes the process start-up
            if took is None:
                res.failures.append(f"round {n}: no reconnect within 30 s")
            else:
                res.converged += 1
                res.times.append(took)
            now_pins = (snapshot(a.home).pins()[idb], snapshot(b.home).pins()[ida])
            if now_pins != pins:
                res.failures.append(f"round {n}: pins changed {pins} -> {now_pins}")
            if acknowledged:
                known = set(snapshot(a.home).peers)
                lost = [d for d in acknowledged if d not in known]
                if lost:
                    res.failures.append(f"round {n}: {len(lost)} acknowledged pins lost")
            print(
                f"trust  {n:>3}: killed {victim.name:<5} at {moment:<8} "
                f"restarted and reconnected in {took if took is not None else float('nan'):.2f} s",
                flush=True,
            )
        res.elapsed = time.monotonic() - t_start
        strangers.stop.set()
        strangers.join(5)
        return res, strangers
    finally:
        if strangers is not None:
            strangers.stop.set()
        cleanup([a, b], homes)


class Content:
    """The sender's folder, changed a round at a time; remembers every version of every name."""

    def __init__(self, root: Path, stage: Path, big: int, big_mib: int, small: int) -> None:
        self.root, self.stage = root, stage
        self.big, self.big_mib, self.small = big, big_mib, small
        self.versions: dict[str, set[str]] = {}
        root.mkdir(parents=True, exist_ok=True)
        stage.mkdir(parents=True, exist_ok=True)

    def _put(self, name: str, data: bytes) -> None:
        staged = self.stage / secrets.token_hex(6)
        staged.write_bytes(data)
        target = self.root / name
        for parent in reversed(Path(name).parents[:-1]):
            self.versions.setdefault(str(parent), set()).add("dir")
        target.parent.mkdir(parents=True, exist_ok=True)
        self.versions.setdefault(name, set()).add(hashlib.sha256(data).hexdigest())
        staged.rename(target)

    def change(self, n: int, rng: random.Random) -> None:
        """Round `n`: new bytes for the big files, a directory of new small files, round n-2's deleted."""
        for i in range(self.big):
            self._put(f"big/big{i}.bin", os.urandom(self.big_mib * MiB + rng.randrange(4096)))
        for i in range(self.small):
            self._put(f"r{n:03d}/s{i:03d}.txt", os.urandom(rng.randrange(1, 6000)))
        shutil.rmtree(self.root / f"r{n - 2:03d}", ignore_errors=True)

    def check_receiver(self, folder: Path) -> tuple[list[str], list[str]]:
        """(torn, stray) names in the receiver's folder."""
        torn, stray = [], []
        for name, digest in tree(folder).items():
            known = self.versions.get(name)
            if known is None:
                stray.append(name)
            elif digest not in known:
                torn.append(name)
        return torn, stray


def sync_loop(
    kills: int, rng: random.Random, big: int, big_mib: int, small: int, window: float, timeout: float
) -> ModeResult:
    res = ModeResult("sync")
    homes = [new_home("ta-k-"), new_home("ta-k-")]
    s, r = AgentProc(homes[0], "sender"), AgentProc(homes[1], "receiver")
    fs, fr = homes[0] / "f", homes[1] / "f"
    content = Content(fs, homes[0] / "stage", big, big_mib, small)
    fr.mkdir()
    try:
        s.start("--folder", str(fs), peers=[r])
        r.start("--folder", str(fr), peers=[s])
        ids, idr = s.identity()["device_id"], r.identity()["device_id"]
        if seconds_until(lambda: paired(s, ids, r, idr), 20) is None:
            raise SystemExit("the agents did not pair")
        t_start = time.monotonic()
        held: dict[str, str] = {}  # the receiver's folder at its last convergence
        for n in range(1, kills + 1):
            content.change(n, rng)
            seconds_until(lambda: receiving(r, fr), 10)  # the sender has announced the change: the transfer starts
            time.sleep(rng.uniform(0.0, window))  # the random moment
            busy = receiving(r, fr)
            r.kill()
            res.kills += 1
            res.mid_transfer += busy
            res.check_integrity(n, r.home)
            torn, stray = content.check_receiver(fr)
            res.torn += len(torn)
            res.stray += len(stray)
            if torn or stray:
                res.failures.append(f"round {n}: torn {torn[:5]} stray {stray[:5]}")
            # a kill while a version was being moved leaves the file or its version, never neither
            lost = lost_versions(held, fr)
            res.lost += len(lost)
            if lost:
                res.failures.append(f"round {n}: neither the file nor a kept version of {lost[:5]}")
            left = len(temps(fr))
            t_restart = time.monotonic()
            r.start("--folder", str(fr), peers=[s])
            took = seconds_until(lambda: idle_and_same(fs, r, fr), timeout)
            if took is None:
                stray_temps = temps(fr)
                res.temps_left += len(stray_temps)
                diff = differing(fr, fs)
                res.failures.append(
                    f"round {n}: no convergence in {timeout:.0f} s: {folder_of(r)}, temps {stray_temps[:3]}, "
                    f"differing {diff[:5]}"
                )
            else:
                res.converged += 1
                res.times.append(time.monotonic() - t_restart)
                held = tree(fr)
            res.check_integrity(n, r.home, s.home)
            print(
                f"sync   {n:>3}: killed receiver {'mid-transfer' if busy else 'while idle  '} "
                f"({left} temp files), torn {len(torn)}, stray {len(stray)}, lost {len(lost)}, "
                f"converged in {res.times[-1] if took is not None else float('nan'):.2f} s",
                flush=True,
            )
        res.elapsed = time.monotonic() - t_start
        return res
    finally:
        cleanup([s, r], homes)


class Writer(threading.Thread):
    """Writes files in place into a folder, a piece at a time, as a download or a program does."""

    def __init__(self, root: Path, n: int, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.root, self.n = root, n
        self.sizes = [rng.randrange(MiB // 2, 4 * MiB) for _ in range(8)]

    def run(self) -> None:
        (self.root / f"w{self.n:03d}").mkdir(parents=True, exist_ok=True)
        names = [f"w{self.n:03d}/f{i}.bin" for i in range(len(self.sizes))]
        if self.n > 1:
            names.append(f"w{self.n - 1:03d}/f0.bin")  # an overwrite of last round's file
        sizes = [*self.sizes, MiB][: len(names)]
        for name, size in zip(names, sizes, strict=True):
            with open(self.root / name, "wb") as out:
                for _ in range(0, size, 256 * 1024):
                    out.write(os.urandom(256 * 1024))
                    out.flush()
                    time.sleep(0.01)  # the writer's pace: spans the kill and the restart


def writing_loop(kills: int, rng: random.Random, timeout: float) -> ModeResult:
    """The sender is killed (SIGKILL or SIGTERM) and restarted while a program writes into its folder."""
    res = ModeResult("writing")
    homes = [new_home("ta-w-"), new_home("ta-w-")]
    s, r = AgentProc(homes[0], "sender"), AgentProc(homes[1], "receiver")
    fs, fr = homes[0] / "f", homes[1] / "f"
    fs.mkdir()
    fr.mkdir()
    try:
        s.start("--folder", str(fs), peers=[r])
        r.start("--folder", str(fr), peers=[s])
        ids, idr = s.identity()["device_id"], r.identity()["device_id"]
        if seconds_until(lambda: paired(s, ids, r, idr), 20) is None:
            raise SystemExit("the agents did not pair")
        t_start = time.monotonic()
        for n in range(1, kills + 1):
            writer = Writer(fs, n, rng)
            writer.start()
            time.sleep(rng.uniform(0.0, 1.0))  # the random moment
            how = rng.choice(["kill", "term"])
            if how == "kill":
                s.kill()
            else:
                s.stop()
            res.kills += 1
            res.check_integrity(n, s.home)
            s.start("--folder", str(fs), peers=[r])  # while the writer still writes
            writer.join(60)
            t_end = time.monotonic()

            def same() -> bool:
                st_s, st_r = folder_of(s), folder_of(r)
                if not st_s or not st_r or (st_s["state"], st_r["state"]) != ("idle", "idle"):
                    return False
                return not temps(fr) and not st_r["need_files"] and tree(fs) == tree(fr)

            took = seconds_until(same, timeout)
            if took is None:
                diff = differing(fr, fs)
                res.failures.append(
                    f"round {n}: no convergence in {timeout:.0f} s after the writes: differing {diff[:5]}"
                )
            else:
                res.converged += 1
                res.times.append(time.monotonic() - t_end)
            res.check_integrity(n, r.home, s.home)
            print(
                f"writing {n:>3}: sender got SIG{how.upper()} mid-write, converged "
                f"{res.times[-1] if took is not None else float('nan'):.2f} s after the last write",
                flush=True,
            )
        res.elapsed = time.monotonic() - t_start
        return res
    finally:
        cleanup([s, r], homes)


def rotate_key(home: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "--home", str(home), "rotate-key", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def rotate_loop(kills: int, rng: random.Random, timeout: float) -> ModeResult:
    res = ModeResult("rotate")
    homes = [new_home("ta-k-"), new_home("ta-k-")]
    rot, peer = AgentProc(homes[0], "rotator"), AgentProc(homes[1], "peer")
    fa, fb = homes[0] / "f", homes[1] / "f"
    fa.mkdir()
    fb.mkdir()

    def start(p: AgentProc) -> None:
        p.start("--folder", str(fa if p is rot else fb), peers=[peer if p is rot else rot])

    try:
        start(rot)
        start(peer)
        idr, idp = rot.identity()["device_id"], peer.identity()["device_id"]

        def both() -> bool:
            return paired(rot, idr, peer, idp)

        if seconds_until(both, 20) is None:
            raise SystemExit("the agents did not pair")
        pin_of_peer = snapshot(rot.home).pins()[idp]
        t_start = time.monotonic()
        for n in range(1, kills + 1):
            (fa / f"note{n:03d}.txt").write_bytes(os.urandom(rng.randrange(1, 3000)))
            scenario = rng.choice(["rotator", "peer", "peer-down"])
            cmd_ok = True
            if scenario == "rotator":
                proc = rotate_key(rot.home)
                time.sleep(rng.uniform(0.0, 1.0))  # the CLI takes ~0.4 s to start: before, during or after
                rot.kill()
                _out, err = proc.communicate(timeout=60)
                cmd_ok = proc.returncode == 0
                victim = rot
            elif scenario == "peer":
                r = cli(rot.home, "rotate-key", "--json")
                cmd_ok = r.returncode == 0
                err = r.stderr
                time.sleep(rng.uniform(0.0, 1.5))
                peer.kill()
                victim = peer
            else:
                peer.kill()
                r = cli(rot.home, "rotate-key", "--json")
                cmd_ok = r.returncode == 0
                err = r.stderr
                time.sleep(rng.uniform(0.0, 0.5))
                victim = peer
            res.kills += 1
            res.rotations += cmd_ok
            res.check_integrity(n, victim.home)
            t_restart = time.monotonic()
            start(victim)
            fp = rot.identity()["fingerprint"]

            def settled(fp: str = fp, note: Path = fb / f"note{n:03d}.txt") -> bool:
                if not both():
                    return False
                return snapshot(peer.home).pins()[idr][0] == fp and note.exists()

            took = seconds_until(settled, timeout)
            if took is None:
                res.failures.append(
                    f"round {n} ({scenario}): not reconnected with the new pin in {timeout:.0f} s: "
                    f"peer pins {snapshot(peer.home).pins()[idr]}, rotator fp {fp}"
                )
            else:
                res.converged += 1
                res.times.append(time.monotonic() - t_restart)
            if not cmd_ok and scenario != "rotator":
                res.failures.append(f"round {n} ({scenario}): rotate-key failed: {err.strip()[-300:]}")
            if snapshot(rot.home).pins()[idp] != pin_of_peer:
                res.failures.append(f"round {n}: the rotator's pin of the peer changed")
            changed = [e for h in (peer.home, rot.home) for e in snapshot(h).events if e["kind"] == "key_changed"]
            if len(changed) > res.key_changed:
                res.failures.append(f"round {n} ({scenario}): key_changed events {changed[res.key_changed :]}")
                res.key_changed = len(changed)
            res.check_integrity(n, rot.home, peer.home)
            print(
                f"rotate {n:>3}: {scenario:<9} rotate-key {'ok' if cmd_ok else 'failed (agent killed)'}, "
                f"new pin followed in {res.times[-1] if took is not None else float('nan'):.2f} s, "
                f"key_changed so far {res.key_changed}",
                flush=True,
            )
        res.elapsed = time.monotonic() - t_start
        return res
    finally:
        cleanup([rot, peer], homes)


def fmt_times(times: list[float]) -> str:
    return f"{statistics.median(times):.2f} / {max(times):.2f}" if times else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--during", choices=["all", "trust", "sync", "writing", "rotate"], default="all")
    parser.add_argument("--kills", type=int, default=50, help="kills per mode")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--big", type=int, default=3, help="sync: large files rewritten each round")
    parser.add_argument("--big-mib", type=int, default=32, help="sync: MiB per large file")
    parser.add_argument("--small", type=int, default=200, help="sync: small files added each round")
    parser.add_argument("--window", type=float, default=0.3, help="sync: the kill lands 0-WINDOW s into the transfer")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to converge after a restart")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    modes = ["trust", "sync", "writing", "rotate"] if args.during == "all" else [args.during]
    results: list[ModeResult] = []
    strangers: Strangers | None = None
    for mode in modes:
        if mode == "trust":
            res, strangers = trust_loop(args.kills, rng)
        elif mode == "sync":
            res = sync_loop(args.kills, rng, args.big, args.big_mib, args.small, args.window, args.timeout)
        elif mode == "writing":
            res = writing_loop(args.kills, rng, args.timeout)
        else:
            res = rotate_loop(args.kills, rng, args.timeout)
        results.append(res)
    print()
    print(
        "| mode | kills | mid-transfer | integrity checks | failed | converged | restart to converged: median / max s "
        "| torn files | stray files | lost versions | temp files left | rotations | key_changed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mid = str(r.mid_transfer) if r.mode == "sync" else "-"
        rot = str(r.rotations) if r.mode == "rotate" else "-"
        print(
            f"| {r.mode} | {r.kills} | {mid} | {r.integrity_checks} | {r.integrity_failed} | {r.converged} | "
            f"{fmt_times(r.times)} | {r.torn} | {r.stray} | {r.lost if r.mode == 'sync' else '-'} | {r.temps_left} | "
            f"{rot} | {r.key_changed} |"
        )
    if strangers is not None:
        lost = len([f for r in results if r.mode == "trust" for f in r.failures if "lost" in f])
        print(
            f"trust: {strangers.attempts} stranger handshakes, {len(strangers.acknowledged)} pins acknowledged, "
            f"{lost} lost"
        )
    failures = [f"{r.mode} {f}" for r in results for f in r.failures]
    print(
        " ".join(f"{r.mode} {r.elapsed:.0f} s;" for r in results)
        + (" no failures" if not failures else " FAILURES:\n  " + "\n  ".join(failures))
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
