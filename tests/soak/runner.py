"""Start real agents, drive a seeded random schedule of file operations and faults on all of them at
once, then a quiet phase, then hand the end state and the history to the checker.

Reproducibility: every random choice comes from `random.Random` objects derived from the seed (one
per writer, one for the faults), and every name and content from a per-machine counter, so a seed
replays the same operations and faults in the same order on each machine. Timing between machines
is real time, as in Jepsen: a replay can interleave differently; a fault found by a seed shows again
on most replays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testkit.agents import fast_status, free_port
from testkit.wait import seconds_until
from tests.soak.checker import EndState, MachineEnd, Report, check
from tests.soak.history import (
    DIR,
    FILE,
    LINK,
    SHARED,
    SHARED_DIRS,
    SHARED_NAMES,
    Entry,
    History,
    Op,
    OwnModel,
    own_root,
    sha,
)

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
MARKER = ".tofu-folder"
VERSIONS = ".tofu-versions"  # each machine's own kept versions
TEMP_PREFIX = ".tofu-tmp-"
NETNS_PORT = 39001


@dataclass
class SoakConfig:
    """One run. `replay()` is the one command that runs it again."""

    seed: int
    agents: int = 3
    minutes: float = 1.0
    netns: bool = False
    keep: bool = False
    agent_root: Path = ROOT
    max_mb: float = 50.0  # the biggest file written
    initial_mb: float = 6.0  # the biggest file a machine starts (or joins) with
    converge_timeout: float = 120.0
    max_rss_mb: float = 400.0
    gap: float = 0.25  # mean pause between one writer's operations, seconds
    fault_gap: float = 4.0  # mean pause between faults, seconds
    verbose: bool = False

    def replay(self) -> str:
        cmd = f"scripts/soak --seed {self.seed} --agents {self.agents} --minutes {self.minutes:g}"
        if self.netns:
            cmd += " --netns"
        defaults = SoakConfig(seed=0)
        for name in ("max_mb", "initial_mb", "converge_timeout", "max_rss_mb", "gap", "fault_gap"):
            if getattr(self, name) != getattr(defaults, name):
                cmd += f" --{name.replace('_', '-')} {getattr(self, name):g}"
        if self.agent_root != ROOT:
            cmd += f" --agent-root {self.agent_root}"
        return cmd


@dataclass(frozen=True, slots=True)
class Planned:
    """One fault of the schedule: at `at` s after the start, on machine `machine`, held `hold` s."""

    at: float
    kind: str
    machine: int
    hold: float
    burst: bool  # a restart (or join) with a burst of writes while the agent starts


@dataclass
class RunResult:
    config: SoakConfig
    report: Report
    run_dir: Path
    kept: bool
    ops: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    bytes_written: int = 0
    converge_s: float | None = None
    max_rss_mb: float = 0.0
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.report.failures


def agent_env(agent_root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(agent_root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("TOFU_AGENT_HOME", None)
    return env


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def draw_size(rng: random.Random, max_bytes: int) -> int:
    """0 bytes to `max_bytes`: mostly small, a few big."""
    r = rng.random()
    if r < 0.08:
        return 0
    if r < 0.65:
        return rng.randint(1, 4096)
    if r < 0.88:
        return rng.randint(4096, 256 * 1024)
    if r < 0.985:
        return rng.randint(256 * 1024, min(4 * MiB, max_bytes))
    return rng.randint(min(4 * MiB, max_bytes), max_bytes)


def content(seed: int, machine: str, n: int, size: int) -> bytes:
    """The bytes of a machine's `n`th write: a header naming it, then seeded noise; cut to `size`."""
    head = f"SOAK {machine} {n}\n".encode()
    return (head + random.Random(f"{seed}:{machine}:{n}").randbytes(max(0, size - len(head))))[:size]


class Machine:
    """One agent: home, folder, process, its own-area model and its writer's random stream."""

    def __init__(self, cfg: SoakConfig, run_dir: Path, index: int, lan: Any | None) -> None:
        self.cfg = cfg
        self.index = index
        self.name = f"m{index}"
        self.home = run_dir / self.name
        self.home.mkdir()
        self.folder = self.home / "F"
        self.folder.mkdir()
        # Kept versions are on (so the soak drives them), one a name: with the default (trash,
        # 30 days) five agents churning gigabytes a minute on one disk keep tens of GB in 20
        # minutes. One a name still grows with the names a run makes: a long run needs small
        # files (--max-mb; docs/RELIABILITY.md).
        (self.home / "config").mkdir()
        (self.home / "config" / "config.toml").write_text(
            f'[[folder]]\nid = "default"\npath = "{self.folder}"\nversioning = "simple"\nkeep = 1\n'
        )
        self.lan = lan
        self.port = NETNS_PORT if lan is not None else free_port()
        self.log_path = self.home / "agent.log"
        self.proc: subprocess.Popen[str] | None = None
        self.lock = threading.RLock()  # guards the model and the file ops on own-NAME/
        self.model = OwnModel(self.name)
        self.counter = 0  # names and contents of this machine's writes
        self.started_at: float | None = None
        self.paused = False
        self.joined = False
        self.rss_max_kb = 0
        self.unexpected_exits: list[str] = []
        ident = self.cli("id", "--json")
        if ident.returncode != 0:
            raise RuntimeError(f"`tofu-agent id` failed for {self.name}: {ident.stderr}")
        data = json.loads(ident.stdout)
        self.device_id: str = data["device_id"]
        self.fingerprint: str = data["fingerprint"]
        self.fingerprints = [self.fingerprint]
        (self.folder / own_root(self.name)).mkdir()

    # -- the process -------------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent", "--home", str(self.home), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.cfg.agent_root,
            env=agent_env(self.cfg.agent_root),
        )

    def argv(self, peers: list[Machine]) -> list[str]:
        args = [sys.executable, "-m", "agent", "--home", str(self.home), "run", "--name", self.name]
        args += ["--port", str(self.port), "--trust-policy", "auto"]  # the folder: config.toml
        if self.lan is not None:
            return [*args, "--bind", "0.0.0.0"]
        args += ["--bind", "127.0.0.1", "--no-mdns"]
        for p in peers:
            args += ["--peer", f"127.0.0.1:{p.port}"]
        return args

    def spawn(self, peers: list[Machine]) -> None:
        argv = self.argv(peers)
        env = agent_env(self.cfg.agent_root)
        with self.log_path.open("a") as log:
            log.write(f"=== soak: start at +{time.monotonic():.1f}\n")
            log.flush()
            self.started_at = time.monotonic()
            if self.lan is not None:
                self.proc = self.lan.popen(self.index, argv, stdout=log, stderr=log, cwd=self.cfg.agent_root, env=env)
            else:
                self.proc = subprocess.Popen(argv, stdout=log, stderr=log, text=True, cwd=self.cfg.agent_root, env=env)
        self.paused = False
        self.joined = True

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_up(self, timeout: float = 30.0) -> bool:
        """The agent answers `status` within `timeout` s (False as soon as it has exited)."""
        up = seconds_until(lambda: not self.running() or self.status() is not None, timeout, poll=0.1)
        return up is not None and self.running()

    def status(self) -> dict[str, Any] | None:
        return fast_status(self.home)

    def stop(self, sig: int) -> str:
        """Send `sig` and reap the process; a problem as text, or ''."""
        if self.proc is None or self.proc.poll() is not None:
            return ""
        if self.paused:
            self.resume()
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return f"{self.name} did not exit within 20 s of {signal.Signals(sig).name}; SIGKILLed"
        if sig == signal.SIGTERM and self.proc.returncode not in (0, -signal.SIGTERM):
            return f"{self.name} exited with {self.proc.returncode} on SIGTERM after {time.monotonic() - t0:.1f} s"
        return ""

    def pause(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def sample_rss(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(OSError), open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    self.rss_max_kb = max(self.rss_max_kb, int(line.split()[1]))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Snapshotter:
    """A folder's tree as {name: (kind, sha, exec)}, hashing only files whose size, mtime or inode changed."""

    def __init__(self) -> None:
        self.cache: dict[str, tuple[tuple[int, int, int], str]] = {}

    def tree(self, root: Path) -> tuple[dict[str, Entry], list[str]]:
        """(entries, temp files) of `root`; the folder marker is left out."""
        out: dict[str, Entry] = {}
        temps: list[str] = []
        for dirpath, dirs, files in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            if rel_dir == ".":
                dirs[:] = [d for d in dirs if d not in (MARKER, VERSIONS)]  # never synced
            for name in dirs + files:
                full = os.path.join(dirpath, name)
                rel = os.path.normpath(os.path.join(rel_dir, name))
                if name.startswith(TEMP_PREFIX):
                    temps.append(rel)
                    continue
                try:
                    st = os.lstat(full)
                except FileNotFoundError:
                    continue
                if stat.S_ISLNK(st.st_mode):
                    out[rel] = Entry(LINK, os.readlink(full))
                elif stat.S_ISDIR(st.st_mode):
                    out[rel] = Entry(DIR)
                elif stat.S_ISREG(st.st_mode):
                    key = (st.st_size, st.st_mtime_ns, st.st_ino)
                    hit = self.cache.get(full)
                    if hit is None or hit[0] != key:
                        try:
                            hit = (key, _hash_file(full))
                        except FileNotFoundError:
                            continue
                        self.cache[full] = hit
                    out[rel] = Entry(FILE, hit[1], bool(st.st_mode & stat.S_IXUSR))
        return out, temps


def _hash_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


class Soak:
    """One seeded run."""

    def __init__(self, cfg: SoakConfig, out: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.out = out
        self.duration = cfg.minutes * 60
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"soak-{cfg.seed}-", dir="/tmp"))
        self.history = History()
        self.machines: list[Machine] = []
        self.lan: Any | None = None
        self.stop_writers = threading.Event()
        self.problems: list[str] = []  # found while running (slow stops, failed commands, crashes)
        self.bytes_written = 0
        self._bytes_lock = threading.Lock()

    def log(self, msg: str) -> None:
        if self.cfg.verbose:
            self.out(f"[soak +{time.monotonic() - self.history.t0:6.1f}] {msg}")

    # -- file operations ---------------------------------------------------------------------------

    def _record(self, op: Op) -> Op:
        op.t_end = time.monotonic()
        self.history.add(op)
        if op.kind in ("write", "append"):
            with self._bytes_lock:
                self.bytes_written += op.size
        return op

    def _new_op(self, m: Machine, kind: str, path: str, note: str = "", path2: str = "") -> Op:
        now = time.monotonic()
        if not note and m.joined:  # what the agent was doing, for the checker's messages
            if not m.running():
                note = f"while {m.name}'s agent is down"
            elif m.paused:
                note = f"while {m.name}'s agent is paused"
            elif m.started_at is not None and now - m.started_at < 5.0:
                note = f"{now - m.started_at:.1f} s after {m.name}'s agent started"
        return Op(self.history.next_seq(), m.name, kind, path, path2, t_start=now, note=note)

    def own_write(self, m: Machine, rng: random.Random, size: int, note: str = "", path: str = "") -> Op:
        """Create (or, with `path`, overwrite) a file in m's own area with plain open/write/close."""
        with m.lock:
            m.counter += 1
            if not path:
                parent = rng.choice(m.model.dirs())
                path = f"{parent}/f{m.counter}.bin"
            data = content(self.cfg.seed, m.name, m.counter, size)
            op = self._new_op(m, "write", path, note)
            (m.folder / path).write_bytes(data)
            op.size, op.sha = size, sha(data)
            old = m.model.entries.get(path)
            m.model.set(path, Entry(FILE, op.sha, old.exec if old is not None else False, op.seq))
            return self._record(op)

    def own_op(self, m: Machine, rng: random.Random) -> Op | None:
        """One random operation on m's own area."""
        with m.lock:
            files, dirs = m.model.files(), m.model.dirs()
            subdirs = [d for d in dirs if d != m.model.root]
            weights = {
                "write": 30 if len(files) < 80 else 5,
                "overwrite": 12,
                "append": 8,
                "truncate": 4,
                "rename": 6,
                "rename_dir": 3,
                "delete": 8 if len(files) < 80 else 30,
                "rmtree": 2 if len(dirs) < 20 else 8,
                "mkdir": 6 if len(dirs) < 20 else 0,
                "chmod": 5,
                "symlink": 1,
            }
            if not files:
                for k in ("overwrite", "append", "truncate", "rename", "delete", "chmod"):
                    weights[k] = 0
            if not subdirs:
                weights["rename_dir"] = weights["rmtree"] = 0
            kind = rng.choices(list(weights), list(weights.values()))[0]
            max_bytes = int(self.cfg.max_mb * MiB)
            if kind == "write":
                return self.own_write(m, rng, draw_size(rng, max_bytes))
            if kind == "overwrite":
                return self.own_write(m, rng, draw_size(rng, max_bytes), path=rng.choice(files))
            m.counter += 1
            n = m.counter
            if kind in ("append", "truncate"):
                path = rng.choice(files)
                op = self._new_op(m, kind, path)
                full = m.folder / path
                if kind == "append":
                    extra = content(self.cfg.seed, m.name, n, draw_size(rng, 1 * MiB))
                    with full.open("ab") as f:
                        f.write(extra)
                    op.size = len(extra)
                else:
                    os.truncate(full, rng.randint(0, full.stat().st_size))
                op.sha = _hash_file(str(full))
                old = m.model.entries[path]
                m.model.set(path, Entry(FILE, op.sha, old.exec, op.seq))
                return self._record(op)
            if kind == "rename":
                src = rng.choice(files)
                dst = f"{rng.choice(dirs)}/r{n}.bin"
                op = self._new_op(m, kind, src, path2=dst)
                os.rename(m.folder / src, m.folder / dst)
                m.model.rename(src, dst)
                return self._record(op)
            if kind == "rename_dir":
                src = rng.choice(subdirs)
                targets = [d for d in dirs if d != src and not d.startswith(src + "/")]
                dst = f"{rng.choice(targets)}/D{n}"
                op = self._new_op(m, "rename", src, path2=dst)
                os.rename(m.folder / src, m.folder / dst)
                m.model.rename(src, dst)
                return self._record(op)
            if kind == "delete":
                path = rng.choice(files)
                op = self._new_op(m, kind, path)
                (m.folder / path).unlink()
                m.model.remove(path)
                return self._record(op)
            if kind == "rmtree":
                path = rng.choice(subdirs)
                op = self._new_op(m, kind, path)
                shutil.rmtree(m.folder / path)
                m.model.remove(path)
                return self._record(op)
            if kind == "mkdir":
                path = f"{rng.choice(dirs)}/D{n}"
                op = self._new_op(m, kind, path)
                (m.folder / path).mkdir()
                m.model.set(path, Entry(DIR, op=op.seq))
                return self._record(op)
            if kind == "chmod":
                path = rng.choice(files)
                op = self._new_op(m, kind, path)
                old = m.model.entries[path]
                exec_bit = rng.random() < 0.8 or not old.exec
                mode = 0o755 if exec_bit else 0o644
                os.chmod(m.folder / path, mode)
                m.model.set(path, Entry(FILE, old.sha, exec_bit, op.seq))
                return self._record(op)
            # a symlink: never synced, so it stays on this machine only
            path = f"{rng.choice(dirs)}/l{n}"
            target = rng.choice([*files, "/etc/hostname", "nowhere"]) if files else "nowhere"
            op = self._new_op(m, "symlink", path)
            os.symlink(
                target if target.startswith("/") or target == "nowhere" else str(m.folder / target), m.folder / path
            )
            m.model.set(path, Entry(LINK, os.readlink(m.folder / path), op=op.seq))
            return self._record(op)

    def shared_op(self, m: Machine, rng: random.Random) -> Op:
        """One random operation on the shared pool, which every machine (and agent) changes at once."""
        kinds = {"write": 50, "delete": 15, "rename": 15, "chmod": 10, "rmtree": 2}
        kind = rng.choices(list(kinds), list(kinds.values()))[0]
        with m.lock:
            m.counter += 1
            n = m.counter
        name = rng.choice(SHARED_NAMES)
        full = m.folder / name
        if kind == "write":
            size = rng.randint(0, 256) if rng.random() < 0.5 else rng.randint(0, 32768)
            data = content(self.cfg.seed, m.name, n, size)
            op = self._new_op(m, kind, name)
            op.size, op.sha = size, self.history.remember_shared(data)
            try:
                full.parent.mkdir(parents=True, exist_ok=True)
                full.write_bytes(data)
            except OSError as exc:
                op.ok, op.note = False, _join(op.note, type(exc).__name__)
            return self._record(op)
        if kind == "rename":
            dst = rng.choice([x for x in SHARED_NAMES if x != name])
            op = self._new_op(m, kind, name, path2=dst)
            try:
                (m.folder / dst).parent.mkdir(parents=True, exist_ok=True)
                os.rename(full, m.folder / dst)
            except OSError as exc:
                op.ok, op.note = False, _join(op.note, type(exc).__name__)
            return self._record(op)
        if kind == "rmtree":
            d = f"{SHARED}/{rng.choice(SHARED_DIRS)}"
            op = self._new_op(m, kind, d)
            shutil.rmtree(m.folder / d, ignore_errors=True)  # attempted: counts as a deletion whatever it did
            return self._record(op)
        op = self._new_op(m, kind, name)
        try:
            if kind == "delete":
                full.unlink()
            else:
                os.chmod(full, 0o755)  # noqa: S103 - chmod +x is one of the operations under test
        except OSError as exc:
            op.ok, op.note = False, _join(op.note, type(exc).__name__)
        return self._record(op)

    def writer(self, m: Machine) -> None:
        """m's program: random operations until the quiet phase, with pauses and the odd burst."""
        rng = random.Random(f"{self.cfg.seed}:writer:{m.name}")
        while not self.stop_writers.is_set():
            if not m.joined:  # a machine that has not joined yet has no one writing on it yet either
                self.stop_writers.wait(0.2)
                continue
            burst = rng.randint(5, 20) if rng.random() < 0.04 else 1
            for _ in range(burst):
                try:
                    if rng.random() < 0.3:
                        self.shared_op(m, rng)
                    else:
                        self.own_op(m, rng)
                except OSError as exc:  # own area: only we write there, so this is the test's bug or the agent's
                    self.problems.append(f"{m.name}: an operation on its own area failed: {exc!r}")
                except Exception as exc:  # a bug of the runner: say so rather than end the writer silently
                    self.problems.append(f"{m.name}: the writer failed: {exc!r}")
                    return
            self.stop_writers.wait(rng.uniform(0, 2 * self.cfg.gap))

    # -- faults ------------------------------------------------------------------------------------

    def initial_data(self, m: Machine, rng: random.Random, note: str) -> None:
        """Several MB of files m has before its agent first starts (the other machines lack them)."""
        n = rng.randint(0, 20)
        for _ in range(n):
            size = int(rng.uniform(0.5, 1.0) * self.cfg.initial_mb * MiB)
            self.own_write(m, rng, min(size, int(self.cfg.max_mb * MiB)), note=note)

    def start(self, m: Machine, rng: random.Random, *, burst: bool) -> None:
        """Spawn m's agent; with `burst`, write files into its folder while it starts."""
        peers = [p for p in self.machines if p is not m]
        m.spawn(peers)
        self.history.fault(m.name, "start")
        if burst:
            n = rng.randint(3, 12)
            for _ in range(n):
                size = int(rng.uniform(0.5, min(8.0, self.cfg.max_mb)) * MiB)
                self.own_write(m, rng, size, note=f"burst while {m.name} starts")
            self.log(f"{m.name}: started with a burst of {n} files")
        if not m.wait_up(60):
            self.problems.append(f"{m.name} did not answer `status` within 60 s of its start:\n{m.log()[-3000:]}")

    def stop(self, m: Machine, sig: int) -> None:
        kind = "sigkill" if sig == signal.SIGKILL else "sigterm"
        self.history.fault(m.name, kind)
        self.log(f"{m.name}: {kind}")
        problem = m.stop(sig)
        if problem:
            self.problems.append(problem)

    def check_alive(self) -> None:
        """An agent that exited without being told to is a finding; start it again."""
        for m in self.machines:
            if m.joined and m.proc is not None and m.proc.poll() is not None:
                msg = f"{m.name} exited by itself with code {m.proc.returncode}"
                m.unexpected_exits.append(msg)
                self.problems.append(msg)
                self.start(m, random.Random(0), burst=False)

    def plan(self, duration: float, joiner: Machine | None) -> list[Planned]:
        """The whole fault schedule, drawn from the seed before anything runs, so a replay injects the
        same faults in the same order at the same offsets (later only if an earlier one overran)."""
        rng = random.Random(f"{self.cfg.seed}:plan")
        weights = {"sigterm": 3.0, "sigkill": 3.0, "pause": 2.0, "rotate": 1.5, "power": 1.0}
        if self.lan is not None:
            weights["cut"] = 2.0
        t_join = rng.uniform(0.15, 0.5) * duration if joiner is not None else duration + 1
        out: list[Planned] = []
        t = 0.0
        while True:
            t += rng.uniform(0.5, 2 * self.cfg.fault_gap)
            if t >= duration:
                break
            if joiner is not None and t >= t_join and not any(p.kind == "join" for p in out):
                out.append(Planned(t, "join", joiner.index, 0.0, rng.random() < 0.5))
                continue
            kind = rng.choices(list(weights), list(weights.values()))[0]
            eligible = [m.index for m in self.machines if m is not joiner or any(p.kind == "join" for p in out)]
            hold = {"sigterm": (0.5, 5.0), "sigkill": (0.5, 5.0), "pause": (1.0, 8.0), "power": (0.5, 3.0)}
            lo, hi = hold.get(kind, (2.0, 10.0) if kind == "cut" else (0.0, 0.0))
            out.append(Planned(t, kind, rng.choice(eligible), rng.uniform(lo, hi), rng.random() < 0.6))
            t += out[-1].hold
        return out

    def faults(self, plan: list[Planned]) -> None:
        """Inject the planned faults, one at a time."""
        for i, ev in enumerate(plan):
            self.stop_writers.wait(max(0.0, self.history.t0 + ev.at - time.monotonic()))
            self.check_alive()
            rng = random.Random(f"{self.cfg.seed}:event:{i}")  # sizes and counts of this event's writes
            m = self.machines[ev.machine]
            if ev.kind == "join":
                self.initial_data(m, rng, note=f"{m.name}'s data before it joins")
                self.history.fault(m.name, "join")
                self.log(f"{m.name}: joins")
                self.start(m, rng, burst=ev.burst)
            elif ev.kind in ("sigterm", "sigkill"):
                self.stop(m, signal.SIGKILL if ev.kind == "sigkill" else signal.SIGTERM)
                self.stop_writers.wait(ev.hold)  # down: its writer goes on
                self.start(m, rng, burst=ev.burst)
            elif ev.kind == "power":  # a power cut: every agent dies, each machine gets new data, all boot together
                up = [x for x in self.machines if x.joined]
                self.history.fault("all", "power")
                self.log("power cut: every agent SIGKILLed")
                for x in up:
                    self.stop(x, signal.SIGKILL)
                for x in up:
                    self.initial_data(x, rng, note=f"{x.name}'s data while the power is off")
                self.stop_writers.wait(ev.hold)
                for x in up:
                    x.spawn([p for p in self.machines if p is not x])
                    self.history.fault(x.name, "start")
                for x in up:
                    if not x.wait_up(60):
                        self.problems.append(f"{x.name} did not answer `status` within 60 s of its start")
            elif ev.kind == "pause":
                self.history.fault(m.name, "pause")
                m.pause()
                self.stop_writers.wait(ev.hold)
                m.resume()
                self.history.fault(m.name, "resume")
            elif ev.kind == "rotate":
                self.history.fault(m.name, "rotate")
                r = m.cli("rotate-key", "--json", timeout=60)
                if r.returncode != 0:
                    self.problems.append(f"{m.name}: rotate-key exited {r.returncode}: {r.stderr.strip()}")
                else:
                    m.fingerprint = json.loads(r.stdout)["fingerprint"]
                    m.fingerprints.append(m.fingerprint)
                    self.log(f"{m.name}: rotated to {m.fingerprint[:16]}")
            elif ev.kind == "cut" and self.lan is not None:
                self.history.fault(m.name, "cut")
                self.lan.disconnect(m.index)
                self.stop_writers.wait(ev.hold)
                self.lan.reconnect(m.index)
                self.history.fault(m.name, "heal")
        self.stop_writers.wait(max(0.0, self.history.t0 + self.duration - time.monotonic()))

    # -- the run -----------------------------------------------------------------------------------

    def run(self) -> RunResult:
        t_run = time.monotonic()
        cfg = self.cfg
        with contextlib.ExitStack() as stack:
            if cfg.netns:
                from testkit.netns import Lan

                self.lan = stack.enter_context(Lan(cfg.agents))
            stack.callback(self._kill_all)
            self.machines = [Machine(cfg, self.run_dir, i, self.lan) for i in range(cfg.agents)]
            joiner = self.machines[-1] if cfg.agents >= 3 else None
            self.duration = cfg.minutes * 60
            plan = self.plan(self.duration, joiner)
            first = [m for m in self.machines if m is not joiner]
            for m in first:
                self.initial_data(
                    m, random.Random(f"{cfg.seed}:initial:{m.name}"), f"{m.name}'s data before the first start"
                )
            for m in first:  # all at once, as machines that boot together
                m.spawn([p for p in self.machines if p is not m])
                self.history.fault(m.name, "start")
            for m in first:
                if not m.wait_up(60):
                    self.problems.append(f"{m.name} did not answer `status` within 60 s:\n{m.log()[-3000:]}")
            self.history.t0 = time.monotonic()
            self.log(f"{len(first)} agents up in {self.run_dir}; schedule of {self.duration:g} s, {len(plan)} faults")
            sampler_stop = threading.Event()
            sampler = threading.Thread(target=self._sample_rss, args=(sampler_stop,), daemon=True)
            sampler.start()
            writers = [threading.Thread(target=self.writer, args=(m,), daemon=True) for m in self.machines]
            for w in writers:
                w.start()
            try:
                self.faults(plan)
            finally:
                self.stop_writers.set()
                for w in writers:
                    w.join()
            # heal: every machine joined, running, not paused, linked
            if joiner is not None and not joiner.joined:
                self.initial_data(
                    joiner, random.Random(f"{cfg.seed}:late-join"), f"{joiner.name}'s data before it joins"
                )
                self.history.fault(joiner.name, "join")
                self.start(joiner, random.Random(0), burst=False)
            for m in self.machines:
                if m.paused:
                    m.resume()
                if self.lan is not None:
                    self.lan.reconnect(m.index)
            self.check_alive()
            t_quiet = time.monotonic()
            self.log("quiet: waiting for convergence")
            converge_s, snaps = self.converge(t_quiet)
            end = self.end_state(snaps, converge_s)
            for m in self.machines:
                problem = m.stop(signal.SIGTERM)
                if problem:
                    self.problems.append(problem)
            sampler_stop.set()
            sampler.join()
            for m in self.machines:  # logs are complete now (shutdown included)
                end.machines[m.name].log = m.log()
                end.machines[m.name].rss_max_mb = m.rss_max_kb / 1024
            report = check(self.history, end)
        self.dump(report)
        kept = cfg.keep or bool(report.failures)
        result = RunResult(
            config=cfg,
            report=report,
            run_dir=self.run_dir,
            kept=kept,
            ops=Counter(op.kind for op in self.history.ops),
            faults=Counter(f.kind for f in self.history.faults),
            bytes_written=self.bytes_written,
            converge_s=converge_s,
            max_rss_mb=max(m.rss_max_kb for m in self.machines) / 1024,
            elapsed_s=time.monotonic() - t_run,
        )
        if not kept:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return result

    def dump(self, report: Report) -> None:
        """history.jsonl (every op and fault, times from the schedule's start) and report.txt in the run dir."""
        t0 = self.history.t0
        with (self.run_dir / "history.jsonl").open("w") as f:
            for op in self.history.ops:
                rec = {**dataclasses.asdict(op), "t_start": round(op.t_start - t0, 3), "t_end": round(op.t_end - t0, 3)}
                f.write(json.dumps({"op": rec}) + "\n")
            for fault in self.history.faults:
                f.write(json.dumps({"fault": {**dataclasses.asdict(fault), "t": round(fault.t - t0, 3)}}) + "\n")
        text = [f"seed {self.cfg.seed}: {'FAIL' if report.failures else 'PASS'}", *report.failures, *report.notes]
        (self.run_dir / "report.txt").write_text("\n".join(text) + "\n")

    def _kill_all(self) -> None:
        for m in self.machines:
            if m.proc is not None and m.proc.poll() is None:
                m.resume()
                m.proc.kill()
                m.proc.wait(10)

    def _sample_rss(self, stop: threading.Event) -> None:
        while not stop.is_set():
            for m in self.machines:
                m.sample_rss()
            stop.wait(0.5)

    def converge(self, t_quiet: float) -> tuple[float | None, dict[str, tuple[dict[str, Entry], list[str]]]]:
        """Poll until every folder holds the same tree and every agent says idle, twice in a row."""
        snappers = {m.name: Snapshotter() for m in self.machines}
        deadline = t_quiet + self.cfg.converge_timeout
        first_ok: float | None = None
        snaps: dict[str, tuple[dict[str, Entry], list[str]]] = {}
        while True:
            self.check_alive()
            snaps = {m.name: snappers[m.name].tree(m.folder) for m in self.machines}
            ok = self._settled(snaps)
            now = time.monotonic()
            if ok:
                if first_ok is not None:
                    return first_ok - t_quiet, snaps
                first_ok = now
            else:
                first_ok = None
            if now >= deadline:
                return None, snaps
            time.sleep(0.2)  # the poll interval of this deadline-bounded wait for two settled looks

    def _settled(self, snaps: dict[str, tuple[dict[str, Entry], list[str]]]) -> bool:
        trees = []
        for m in self.machines:
            tree, _temps = snaps[m.name]  # leftover temps are the checker's business, not convergence's
            trees.append({k: (e.kind, e.sha, e.exec) for k, e in tree.items() if e.kind != LINK})
            st = m.status()
            if st is None:
                return False
            for f in st.get("folders", []):
                if f.get("state") != "idle" or f.get("need_files") or f.get("failed_files") or f.get("error"):
                    return False
            connected = {p["device_id"] for p in st.get("peers", []) if p.get("connected")}
            if any(o.device_id not in connected for o in self.machines if o is not m):
                return False
        return all(t == trees[0] for t in trees[1:])

    def end_state(self, snaps: dict[str, tuple[dict[str, Entry], list[str]]], converge_s: float | None) -> EndState:
        end = EndState(
            t0=self.history.t0,
            converged_s=converge_s,
            converge_timeout=self.cfg.converge_timeout,
            max_rss_mb=self.cfg.max_rss_mb,
            problems=list(self.problems),
        )
        fingerprints = {m.device_id: m.fingerprint for m in self.machines}
        for m in self.machines:
            tree, temps = snaps[m.name]
            peers = m.cli("peers", "--json")
            tlog = m.cli("trust", "log", "--json")
            end.machines[m.name] = MachineEnd(
                name=m.name,
                device_id=m.device_id,
                model=m.model,
                tree=tree,
                temps=temps,
                status=m.status(),
                peers=json.loads(peers.stdout) if peers.returncode == 0 else None,
                trust_log=json.loads(tlog.stdout) if tlog.returncode == 0 else None,
                fingerprints=fingerprints,
                rotations=len(m.fingerprints) - 1,
                folder=m.folder,
            )
        return end


def iter_seeds(seed: int | None, count: int) -> Iterator[int]:
    base = seed if seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    yield from range(base, base + count)
