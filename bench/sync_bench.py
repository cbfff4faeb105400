"""Folder sync benchmark: tofu-agent against Syncthing and an rsync daemon, plus this machine's limits.

    .venv/bin/python bench/sync_bench.py --runs 3   # the full run: every case, 3 runs, the goals of issue 17 at the end
    .venv/bin/python bench/sync_bench.py --quick    # small sizes, a minute at most (the test suite runs it)
    .venv/bin/python bench/sync_bench.py --case scale --scale-files 2000 --runs 2   # the scale case, shrunk
    .venv/bin/python bench/sync_bench.py --case twoway --no-rsync   # 500 MiB a side the other lacks, vs Syncthing

Needs `syncthing` and `rsync` (Debian: `apt-get install -y syncthing rsync`); a missing tool's
columns are skipped with a note. All traffic stays on loopback: our agents and rsync use
127.0.0.1, and the two Syncthing instances run in a private network namespace (`unshare -n`,
only `lo` up) with discovery, relays and NAT off, driven through their REST API. With `--runs N`
the tools take turns run by run (limits, ours, Syncthing, rsync, rsync --fsync, then again), and
every figure printed is the median of the N runs, each run's own figure listed beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import secrets
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
agent_root = ROOT  # where `python -m agent` runs from: this tree, or --ab's during the B tool's turn
ab_root = ROOT
sys.path.insert(0, str(ROOT))  # `python bench/sync_bench.py` as well as `python -m bench.sync_bench`

from agent.app import control  # noqa: E402
from agent.errors import TofuError  # noqa: E402
from agent.host.paths import resolve_paths  # noqa: E402
from bench.idle_rss import without_mdns  # noqa: E402

MiB = 1024 * 1024
CASES = frozenset({"big", "small", "change", "twoway", "scale", "idle"})
ONE_WAY = frozenset({"big", "small", "change"})  # the cases one pair of running agents syncs in turn
# The scale case's file sizes: p(size) ~ size^-SCALE_ALPHA on [1 KiB, 4 MiB], drawn with a fixed seed.
# A log-uniform spread (alpha 1) would average 504 KB a file, ~50 GB for 100,000 files; alpha 1.75
# averages ~21.5 KB, so 100,000 files come to ~2 GiB (median ~2.5 KiB, ~350 files over 1 MiB).
SCALE_MIN, SCALE_MAX, SCALE_ALPHA, SCALE_SEED = 1024, 4 * MiB, 1.75, 17
SCALE_PER_DIR = 100  # 100,000 files in 1,000 directories
STATUS_EVERY = 1.0  # seconds between `tofu-agent status --json` samples while the scale case syncs
RSS_EVERY = 0.2  # seconds between VmRSS samples
WATCH_GRACE = 3.0  # longest our watcher takes to report an event (its debounce is 1.6 s)
Figures = dict[str, float]  # one tool in one run: seconds per case, and named extras (MB, ms)
Run = dict[str, Figures]  # tool name (and "limits") -> its figures in one run
TOOLS = ("tofu-agent", "tofu-agent B", "syncthing", "rsync", "rsync --fsync")
AB = "tofu-agent B"  # the code of --ab DIR (a `git worktree` of the previous commit), for an A/B in one run


# -- data ----------------------------------------------------------------------------------------


def make_data(
    work: Path,
    big: int,
    files: int,
    dirs: int,
    cases: frozenset[str] = ONE_WAY,
    twoway: tuple[int, int] = (0, 0),
    scale: tuple[int, int] = (0, 1),
) -> Path:
    """The master data set, only what `cases` need: big.bin (random), small/DIR/FILE (4 KiB each,
    random), for the two-way case twoway/a/ta/ and twoway/b/tb/ (`twoway` = (files, bytes each)
    per side, random), the data each side starts with and the other lacks, and for the scale case
    scale/DIR/FILE (`scale` = (files, directories), sizes from `scale_sizes`, random content)."""
    master = work / "master"
    master.mkdir(parents=True)
    if cases & {"big", "change"}:
        _random_file(master / "big.bin", big)
    if "small" in cases:
        (master / "small").mkdir()
        for i in range(files):
            d = master / "small" / f"d{i % dirs:03d}"
            d.mkdir(exist_ok=True)
            (d / f"f{i:05d}.dat").write_bytes(os.urandom(4096))
    if "twoway" in cases:
        n, size = twoway
        for side in ("a", "b"):
            d = master / "twoway" / side / f"t{side}"
            d.mkdir(parents=True)
            for i in range(n):
                _random_file(d / f"f{i:03d}.bin", size)
    if "scale" in cases:
        make_scale(master / "scale", *scale)
    os.sync()
    return master


def scale_sizes(n: int, seed: int = SCALE_SEED) -> list[int]:
    """`n` file sizes drawn from p(size) ~ size^-SCALE_ALPHA on [SCALE_MIN, SCALE_MAX] (inverse CDF)."""
    rng = random.Random(seed)
    e = 1.0 - SCALE_ALPHA
    lo, hi = SCALE_MIN**e, SCALE_MAX**e
    return [min(SCALE_MAX, max(SCALE_MIN, round((lo + rng.random() * (hi - lo)) ** (1 / e)))) for _ in range(n)]


def make_scale(dest: Path, files: int, dirs: int) -> None:
    """`files` random files spread over `dirs` directories of `dest`, sized by `scale_sizes`."""
    for i, size in enumerate(scale_sizes(files)):
        d = dest / f"d{i % dirs:04d}"
        if i < dirs:
            d.mkdir(parents=True)
        (d / f"f{i:06d}.bin").write_bytes(os.urandom(size))


def scale_files(master: Path) -> dict[str, int]:
    """{name relative to the synced folder (scale/DIR/FILE): size} of the scale data in `master`."""
    out: dict[str, int] = {}
    for dirpath, _, names in os.walk(master / "scale"):
        rel = Path(dirpath).relative_to(master).as_posix()
        for n in names:
            out[f"{rel}/{n}"] = os.stat(os.path.join(dirpath, n)).st_size
    return dict(sorted(out.items()))


def edit_target(files: dict[str, int]) -> str:
    """The scale file the one-file edit rewrites: the one closest to 1 MiB (the same in every run)."""
    return min(files, key=lambda n: (abs(files[n] - MiB), n))


def rewrite(path: Path) -> bytes:
    """Overwrite `path` in place with new random bytes of the same size (one file edited); the new content."""
    new = os.urandom(path.stat().st_size)
    with path.open("r+b") as fh:
        fh.write(new)
    return new


def content_is(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except FileNotFoundError:
        return False


def check_scale(master: Path, folder: Path, files: dict[str, int], tool: str) -> None:
    """`folder` holds every scale file byte for byte (sha256); AssertionError naming `tool` if not."""
    for name in files:
        assert same_file(master / name, folder / name), f"{tool}: {folder / name} differs"


def _random_file(path: Path, size: int) -> None:
    with path.open("wb") as fh:
        left = size
        while left:
            n = min(left, 8 * MiB)
            fh.write(os.urandom(n))
            left -= n


def twoway_files(master: Path) -> dict[str, dict[str, int]]:
    """{side: {name relative to the synced folder: size}} of the two-way data in `master`."""
    out: dict[str, dict[str, int]] = {}
    for side in ("a", "b"):
        base = master / "twoway" / side
        out[side] = {str(p.relative_to(base)): p.stat().st_size for p in sorted(base.rglob("*")) if p.is_file()}
    return out


def fill_twoway(master: Path, side: str, folder: Path) -> None:
    """Copy one side's two-way data into `folder` (made if missing), before anything syncs it."""
    shutil.copytree(master / "twoway" / side, folder, dirs_exist_ok=True)
    os.sync()


def holds(folder: Path, files: dict[str, int]) -> bool:
    """Every one of `files` is in `folder` at its full size (receivers write to a temp name, then rename)."""
    for name, size in files.items():
        try:
            if (folder / name).stat().st_size != size:
                return False
        except FileNotFoundError:
            return False
    return True


def check_twoway(master: Path, folders: Sequence[Path], tool: str) -> None:
    """Each of `folders` holds both sides' data byte for byte (sha256); AssertionError naming `tool` if not."""
    for side, files in twoway_files(master).items():
        for name in files:
            for folder in folders:
                assert same_file(master / "twoway" / side / name, folder / name), f"{tool}: {folder / name} differs"


RETIRE_DELETE_SIZE = 256 * 1024


def retire(path: Path) -> None:
    """Free most of the space under `path` now but keep its many small files until the bench ends.

    This machine's /tmp is ext4 without a journal, where the kernel skips an inode deleted within
    the last 60 s (300 s while its inode table block is dirty) on every later file creation
    (`recently_deleted` in fs/ext4/ialloc.c): creating 10,000 files costs 0.2 s of system time
    normally and up to 3.7 s after 20,000 deletions, which would be charged to whichever tool runs
    next. So only the few large files (at least RETIRE_DELETE_SIZE: most of the bytes) are deleted
    here; the rest is moved aside, and goes with the work directory at the end.
    """
    if not path.exists():
        return
    for parent, _, names in os.walk(path):
        for n in names:
            p = Path(parent, n)
            try:
                if not p.is_symlink() and p.stat().st_size >= RETIRE_DELETE_SIZE:
                    p.unlink()
            except OSError:
                pass
    path.rename(path.with_name(f".retired-{path.name}-{secrets.token_hex(4)}"))


SETTLE_PROBE_FILES = 2000
SETTLE_US_PER_FILE = 60.0  # creating an empty file takes ~15-20 us here when nothing was deleted lately
SETTLE_WAIT = 15.0
SETTLE_MAX = 420.0


def wait_for_settled_fs(work: Path, max_wait: float = SETTLE_MAX) -> float:
    """Wait until creating files costs what it normally does; the seconds waited.

    The deletions of a run just before this one (another bench, a test suite) slow every file
    creation for up to five minutes (see `retire`), which would be charged to the first tool.
    A probe creates SETTLE_PROBE_FILES empty files; the probes are kept (retired), not deleted.
    """
    start = time.monotonic()
    for n in itertools.count():
        probe = work / f"settle-probe-{n}"
        probe.mkdir()
        t0 = time.perf_counter()
        for i in range(SETTLE_PROBE_FILES):
            os.close(os.open(probe / f"p{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        us = (time.perf_counter() - t0) / SETTLE_PROBE_FILES * 1e6
        retire(probe)
        waited = time.monotonic() - start
        if us <= SETTLE_US_PER_FILE or waited >= max_wait:
            return waited
        print(f"the file system is still slow to create files ({us:.0f} us each; something deleted many "
              f"lately): waiting", file=sys.stderr, flush=True)  # fmt: skip
        time.sleep(SETTLE_WAIT)
    raise AssertionError("unreachable")


def copy_data(master: Path, dest: Path, what: str) -> None:
    """Copy `what` (big.bin or small) of the master set to `dest/what`."""
    dest.mkdir(parents=True, exist_ok=True)
    if what == "big.bin":
        shutil.copyfile(master / what, dest / what)
        shutil.copystat(master / what, dest / what)
    else:
        shutil.copytree(master / what, dest / what)
    os.sync()


def flip_middle_byte(path: Path) -> None:
    """Change one byte in the middle of `path` in place."""
    with path.open("r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        old = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([old[0] ^ 0xFF]))


def count_files(root: Path) -> int:
    return sum(1 for _, _, fs in os.walk(root) for f in fs if not f.startswith(".tofu-tmp-"))


def same_file(a: Path, b: Path) -> bool:
    if not b.exists() or a.stat().st_size != b.stat().st_size:
        return False
    return _sha(a) == _sha(b)


def _sha(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as fh:
        while chunk := fh.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def rss_mb(pid: int, key: str) -> float:
    """VmRSS or VmHWM of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    return 0.0


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a process has used so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


# -- machine limits ------------------------------------------------------------------------------


def tls_throughput(total: int) -> float:
    """MB/s of Python's blocking TLS 1.3 over loopback, one direction."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = __import__("datetime").datetime.now(__import__("datetime").UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + __import__("datetime").timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    with tempfile.NamedTemporaryFile("wb", suffix=".pem", delete=False) as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))  # fmt: skip
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(fh.name)
    os.unlink(fh.name)
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname = False
    cctx.verify_mode = ssl.CERT_NONE
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    chunk = os.urandom(MiB)

    def serve() -> None:
        conn, _ = srv.accept()
        with sctx.wrap_socket(conn, server_side=True) as s:
            for _ in range(total // MiB):
                s.sendall(chunk)

    t = threading.Thread(target=serve)
    t.start()
    with cctx.wrap_socket(socket.create_connection(("127.0.0.1", port))) as c:
        got, t0 = 0, time.perf_counter()
        while got < total:
            data = c.recv(1 << 20)
            if not data:
                break
            got += len(data)
        elapsed = time.perf_counter() - t0
    t.join()
    srv.close()
    return got / elapsed / 1e6


def sha256_speed(total: int) -> float:
    data = os.urandom(8 * MiB)
    t0 = time.perf_counter()
    for _ in range(total // len(data)):
        hashlib.sha256(data).digest()
    return total / (time.perf_counter() - t0) / 1e6


def disk_write_speed(work: Path, total: int) -> float:
    """MB/s writing `total` bytes to a new file and fsyncing it: the clock stops after the fsync."""
    data = os.urandom(8 * MiB)
    path = work / "disk-probe.bin"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(total // len(data)):
            os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - t0
    path.unlink()
    return total / elapsed / 1e6


LIMITS = {"tls": "loopback TLS", "sha256": "SHA-256", "disk": "disk write+fsync"}


def measure_limits(work: Path, size: int) -> Figures:
    """This machine's limits in MB/s (keys of LIMITS), each measured on `size` bytes."""
    return {"tls": tls_throughput(size), "sha256": sha256_speed(size), "disk": disk_write_speed(work, size)}


class PeakRss:
    """The peak memory (MB) of groups of processes over a span: start() resets each one's VmHWM
    (`echo 5 > /proc/PID/clear_refs`) and samples VmRSS every RSS_EVERY seconds; stop() returns
    per group the sum of its VmHWM, or the highest VmRSS sum sampled where the reset was refused."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.sampled = dict.fromkeys(groups, 0.0)
        self.reset = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> PeakRss:
        for pid in (p for pids in self.groups.values() for p in pids):
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                self.reset = False
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            for name, pids in self.groups.items():
                try:
                    self.sampled[name] = max(self.sampled[name], sum(rss_mb(p, "VmRSS") for p in pids))
                except OSError:
                    pass  # a process ended
            self._stop.wait(RSS_EVERY)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        if not self.reset:
            return dict(self.sampled)
        return {n: max(self.sampled[n], sum(rss_mb(p, "VmHWM") for p in pids)) for n, pids in self.groups.items()}


# -- tofu-agent ----------------------------------------------------------------------------------


def poll(pred: Callable[[], object], timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(step)


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Agent:
    """One `tofu-agent run` on 127.0.0.1 (static peers, no mDNS) with its own home, asked through the CLI."""

    def __init__(self, home: Path, name: str) -> None:
        self.home = home
        self.name = name
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = home / f"{name}.log"

    def spawn(self, folder: Path, peers: Sequence[Agent] = ()) -> Agent:
        """Start the agent syncing `folder` and return at once."""
        argv = [sys.executable, "-m", "agent", "--home", str(self.home), "run", "--no-mdns", "--port", str(self.port),
                "--bind", "127.0.0.1", "--name", self.name, "--folder", str(folder)]  # fmt: skip
        for p in peers:
            argv += ["--peer", f"127.0.0.1:{p.port}"]
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=agent_root)
        return self

    def wait_started(self, timeout: float = 20.0) -> Agent:
        """Wait until the control socket answers; RuntimeError with the log if the process ended."""
        assert self.proc is not None
        proc = self.proc
        poll(lambda: proc.poll() is not None or self.status() is not None, timeout, f"{self.name} to start")
        if proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {proc.returncode}:\n{self.log()[-3000:]}")
        return self

    def start(self, folder: Path, peers: Sequence[Agent] = ()) -> Agent:
        """spawn() and wait_started()."""
        return self.spawn(folder, peers).wait_started()

    def _cli(self, *args: str) -> Any:
        r = subprocess.run([sys.executable, "-m", "agent", "--home", str(self.home), *args],
                           capture_output=True, text=True, timeout=30, check=False, cwd=agent_root)  # fmt: skip
        return json.loads(r.stdout) if r.returncode == 0 else None

    def status(self) -> dict[str, Any] | None:
        """`status --json` if the agent answers, else None."""
        st = self._cli("status", "--json")
        return st if isinstance(st, dict) and st.get("running", True) else None

    def fast_status(self) -> dict[str, Any] | None:
        """`status` over the control socket, in-process (no CLI start-up per poll); None if no answer."""
        try:
            st = control.request(resolve_paths(self.home).control_socket, "status")
        except TofuError:
            return None
        return st if isinstance(st, dict) else None

    def folder(self) -> dict[str, Any]:
        """The status of the agent's one folder, in-process; {} if it does not answer."""
        st = self.fast_status()
        return dict(st["folders"][0]) if st and st.get("folders") else {}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def device_id(self) -> str:
        ident = self._cli("id", "--json")
        assert isinstance(ident, dict), f"`tofu-agent id` failed for {self.name}"
        return str(ident["device_id"])

    def connected_to(self, device_id: str) -> bool:
        st = self.status() or {}
        return any(p["device_id"] == device_id and p.get("connected") for p in st.get("peers", []))

    def folder_idle(self) -> bool:
        st = self.status()
        return bool(st and all(f["state"] == "idle" and not f["need_files"] for f in st["folders"]))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def bench_tofu(
    master: Path, work: Path, nfiles: int, timeout: float, cases: frozenset[str] = CASES
) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per case for two tofu-agents, and their memory figures (MB).

    The one-byte change needs the big file in place first: it is synced (untimed) if `big` is not a case.
    """
    homes = [work / "ta-a", work / "ta-b"]
    for h in homes:
        h.mkdir()
    a, b = Agent(homes[0], "alpha"), Agent(homes[1], "beta")
    fa, fb = homes[0] / "f", homes[1] / "f"
    stage = work / "ta-stage"
    res: dict[str, float] = {}
    mem: dict[str, float] = {}
    try:
        a.start(fa, peers=[b])
        b.start(fb, peers=[a])
        idb = b.device_id()
        poll(lambda: a.connected_to(idb), 30, "alpha to connect to beta", 0.1)
        time.sleep(3.0)  # let start-up work finish before timing anything
        assert a.proc is not None and b.proc is not None
        if cases & {"big", "change"}:
            copy_data(master, stage, "big.bin")
            t0 = time.perf_counter()
            os.rename(stage / "big.bin", fa / "big.bin")
            size = (fa / "big.bin").stat().st_size
            poll(lambda: (fb / "big.bin").exists() and (fb / "big.bin").stat().st_size == size, timeout, "the big file")
            if "big" in cases:
                res["big"] = time.perf_counter() - t0
                mem["peak_rss"] = max(rss_mb(a.proc.pid, "VmHWM"), rss_mb(b.proc.pid, "VmHWM"))
            assert same_file(fa / "big.bin", fb / "big.bin"), "tofu-agent: big file differs"
        if "small" in cases:
            copy_data(master, stage, "small")
            cpu0 = cpu_seconds(a.proc.pid), cpu_seconds(b.proc.pid)
            t0 = time.perf_counter()
            os.rename(stage / "small", fa / "small")
            poll(lambda: count_files(fb / "small") == nfiles if (fb / "small").exists() else False, timeout,
                 "the small files", 0.1)  # fmt: skip
            res["small"] = time.perf_counter() - t0
            # CPU time is steadier than wall time on this disk: the figure for A/B of CPU work
            for side, proc, before in (("a", a.proc, cpu0[0]), ("b", b.proc, cpu0[1])):
                after = cpu_seconds(proc.pid)
                mem[f"small_user_{side}"], mem[f"small_sys_{side}"] = after[0] - before[0], after[1] - before[1]
        poll(b.folder_idle, 30, "beta idle", 0.1)
        if "change" not in cases:
            return res, mem
        st = b.status()
        assert st is not None
        received_before = st["folders"][0]["bytes_received"]
        flip_middle_byte(fa / "big.bin")
        t0 = time.perf_counter()
        mid = (fa / "big.bin").stat().st_size // 2

        def changed() -> bool:
            with (fa / "big.bin").open("rb") as x, (fb / "big.bin").open("rb") as y:
                x.seek(mid)
                y.seek(mid)
                return x.read(1) == y.read(1)

        poll(changed, timeout, "the one-byte change")
        res["change"] = time.perf_counter() - t0
        assert same_file(fa / "big.bin", fb / "big.bin"), "tofu-agent: changed file differs"
        poll(b.folder_idle, 30, "beta idle", 0.1)
        st = b.status()
        assert st is not None
        mem["change_bytes_received"] = float(st["folders"][0]["bytes_received"] - received_before)
    finally:
        a.stop()
        b.stop()
    return res, mem


def bench_tofu_twoway(master: Path, work: Path, timeout: float) -> tuple[float, float, float]:
    """Seconds from spawning two agents whose folders each hold data the other lacks until both hold
    all of it (so it includes their start-up, scans and connecting), the seconds of that until both
    control sockets answered, and their peak RSS (MB)."""
    homes = [work / "tw-a", work / "tw-b"]
    fa, fb = homes[0] / "f", homes[1] / "f"
    fill_twoway(master, "a", fa)
    fill_twoway(master, "b", fb)
    files = twoway_files(master)
    everything = files["a"] | files["b"]
    a, b = Agent(homes[0], "alpha"), Agent(homes[1], "beta")
    try:
        t0 = time.perf_counter()
        b.spawn(fb, peers=[a])
        a.spawn(fa, peers=[b])
        a.wait_started()
        b.wait_started()
        started = time.perf_counter() - t0
        try:
            poll(lambda: holds(fa, everything) and holds(fb, everything), timeout, "both sides to hold all", 0.05)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- alpha ---\n{a.log()[-3000:]}\n--- beta ---\n{b.log()[-3000:]}") from None
        elapsed = time.perf_counter() - t0
        assert a.proc is not None and b.proc is not None
        peak = max(rss_mb(a.proc.pid, "VmHWM"), rss_mb(b.proc.pid, "VmHWM"))
        check_twoway(master, (fa, fb), "tofu-agent")
    finally:
        a.stop()
        b.stop()
        for h in homes:
            retire(h)  # the space for Syncthing's copies
    return elapsed, started, peak


class StatusProbe:
    """Times `tofu-agent --home H status --json` as a fresh process (as a person runs it, as
    bench/status_time.py does) every `every` seconds in a thread, the agents taking turns, from
    start() until stop(); samples in ms."""

    def __init__(self, agents: Sequence[Agent], every: float = STATUS_EVERY) -> None:
        script = Path(sys.executable).with_name("tofu-agent")
        self.tofu = [str(script)] if script.exists() else [sys.executable, "-m", "agent"]
        self.agents, self.every = agents, every
        self.samples: list[float] = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> StatusProbe:
        self._thread.start()
        return self

    def _run(self) -> None:
        turn = 0
        while not self._stop.is_set():
            agent = self.agents[turn % len(self.agents)]
            turn += 1
            t0 = time.perf_counter()
            r = subprocess.run([*self.tofu, "--home", str(agent.home), "status", "--json"],
                               capture_output=True, timeout=60, check=False, cwd=agent_root)  # fmt: skip
            if r.returncode == 0:
                self.samples.append((time.perf_counter() - t0) * 1000)
            else:
                self.failed += 1
            self._stop.wait(self.every)

    def stop(self) -> list[float]:
        """Stop sampling (a sample under way, started while syncing, is waited for); the samples."""
        self._stop.set()
        self._thread.join()
        return self.samples


def until_holds(b: Agent, folder: Path, files: dict[str, int], t0: float, timeout: float) -> float:
    """Seconds from `t0` until `b`'s status shows all `files` synced (idle, nothing needed) and
    `folder` holds each at full size (checked after the clock stops, so the walk is not timed)."""
    deadline = time.monotonic() + timeout
    while True:
        st = b.folder()
        if st.get("files", 0) >= len(files) and not st.get("need_files") and st.get("state") == "idle":
            elapsed = time.perf_counter() - t0
            if holds(folder, files):
                return elapsed
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {b.name} to hold {len(files)} files:\n{b.log()[-3000:]}")
        time.sleep(0.05)


def tofu_rescan(a: Agent, folder: Path, timeout: float) -> tuple[float, float] | None:
    """A full rescan that finds no change: touch the folder's root (our watcher turns an event on
    the root into a full rescan of the folder) and time until `a`'s status is idle again; the
    seconds, and the part of them status showed `scanning`. None if the scan ended between two
    polls (a tiny folder), so its start was never seen."""
    t0 = time.perf_counter()
    os.utime(folder)
    seen = None
    while time.perf_counter() - t0 < WATCH_GRACE:
        if a.folder().get("state", "idle") != "idle":
            seen = time.perf_counter()
            break
        time.sleep(0.005)
    if seen is None:
        return None
    poll(lambda: a.folder().get("state") == "idle", timeout, f"{a.name} to finish the rescan", 0.02)
    end = time.perf_counter()
    return end - t0, end - seen


def bench_tofu_scale(master: Path, work: Path, timeout: float) -> Figures:
    """The scale case on a fresh pair of agents: the first sync of the scale data (renamed into
    alpha's folder at once), with both agents' peak RSS and `status --json` latency sampled meanwhile;
    a full rescan of alpha that finds no change; then one file rewritten in place on alpha until beta
    holds it. Seconds, MB and ms."""
    homes = [work / "sc-a", work / "sc-b"]
    for h in homes:
        h.mkdir()
    fa, fb = homes[0] / "f", homes[1] / "f"
    stage = work / "sc-stage"
    files = scale_files(master)
    a, b = Agent(homes[0], "alpha"), Agent(homes[1], "beta")
    out: Figures = {}
    try:
        a.start(fa, peers=[b])
        b.start(fb, peers=[a])
        idb = b.device_id()
        poll(lambda: a.connected_to(idb), 30, "alpha to connect to beta", 0.1)
        poll(lambda: a.folder().get("state") == b.folder().get("state") == "idle", 30, "both idle", 0.1)
        copy_data(master, stage, "scale")
        rss = PeakRss({"a": [a.pid], "b": [b.pid]}).start()
        t0 = time.perf_counter()
        os.rename(stage / "scale", fa / "scale")
        probe = StatusProbe([a, b]).start()
        try:
            out["scale_first"] = until_holds(b, fb, files, t0, timeout)
        finally:
            latencies = probe.stop()
            peaks = rss.stop()
        out["scale_peak_a"], out["scale_peak_b"] = peaks["a"], peaks["b"]
        if latencies:
            out["status_max_ms"], out["status_median_ms"] = max(latencies), statistics.median(latencies)
        out["status_samples"], out["status_failed"] = len(latencies), probe.failed
        check_scale(master, fb, files, "tofu-agent")
        poll(lambda: a.folder().get("state") == b.folder().get("state") == "idle", 60, "both idle", 0.1)
        time.sleep(1.0)  # nothing left to flush or announce
        rescan = tofu_rescan(a, fa, timeout)
        if rescan is not None:
            out["scale_rescan"], out["scale_rescan_scanning"] = rescan
        name = edit_target(files)
        new = rewrite(fa / name)
        t0 = time.perf_counter()
        poll(lambda: content_is(fb / name, new), timeout, "the one-file edit", 0.01)
        out["scale_edit"] = time.perf_counter() - t0
    finally:
        a.stop()
        b.stop()
        for h in homes:
            retire(h)
        retire(stage)
    return out


# -- rsync ---------------------------------------------------------------------------------------


def rsync_has_fsync() -> bool:
    """This rsync knows `--fsync` (rsync 3.2.4 and later)."""
    out = subprocess.run(["rsync", "--help"], capture_output=True, text=True, check=False).stdout
    return "--fsync" in out


def bench_rsync(
    master: Path, work: Path, timeout: float, cases: frozenset[str] = CASES, flags: Sequence[str] = ()
) -> dict[str, float]:
    """Seconds per one-way case of `rsync -a FLAGS` pushing to an rsync daemon on 127.0.0.1 (the
    daemon is the receiver: `--fsync` is passed on to it)."""
    src, dst = work / "rs-src", work / "rs-dst"
    dst.mkdir()
    port = free_port()
    conf = work / "rsyncd.conf"
    conf.write_text(f"use chroot = no\nuid = root\ngid = root\n[m]\npath = {dst}\nread only = no\n")
    daemon = subprocess.Popen(
        ["rsync", "--daemon", "--no-detach", f"--config={conf}", f"--port={port}", "--address=127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    res: dict[str, float] = {}
    try:
        poll(lambda: _port_open(port), 10, "rsync daemon")

        def push() -> float:
            t0 = time.perf_counter()
            subprocess.run(["rsync", "-a", *flags, f"{src}/", f"rsync://127.0.0.1:{port}/m/"], check=True,
                           timeout=timeout)  # fmt: skip
            return time.perf_counter() - t0

        if cases & {"big", "change"}:
            copy_data(master, src, "big.bin")
            res["big"] = push()
        if "small" in cases:
            copy_data(master, src, "small")
            res["small"] = push()
        if "change" in cases:
            flip_middle_byte(src / "big.bin")
            res["change"] = push()
            assert same_file(src / "big.bin", dst / "big.bin"), "rsync: changed file differs"
    finally:
        daemon.terminate()
        daemon.wait(10)
    return res


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# -- Syncthing (runs inside `unshare -n`) --------------------------------------------------------


class Syncthing:
    """One Syncthing instance configured per the yardstick notes, driven over REST."""

    def __init__(self, home: Path, gui_port: int, listen_port: int) -> None:
        self.home = home
        self.gui = f"http://127.0.0.1:{gui_port}"
        self.key = secrets.token_hex(16)
        self.listen = f"tcp://127.0.0.1:{listen_port}"
        out = subprocess.run(
            ["syncthing", "generate", f"--home={home}", "--no-default-folder", "--skip-port-probing"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        text = out.stdout + out.stderr
        self.device_id = text.split("Device ID:")[1].split()[0]
        configure_syncthing(home / "config.xml", gui_port, self.key, self.listen)
        self.proc = subprocess.Popen(
            ["syncthing", "serve", f"--home={home}", "--no-browser", "--no-restart", "--no-upgrade"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "STNOUPGRADE": "1"},
        )  # fmt: skip
        poll(lambda: self._ping(), 60, "syncthing to answer", 0.2)

    def _ping(self) -> bool:
        try:
            return bool(self.rest("GET", "/rest/system/ping").get("ping") == "pong")
        except OSError:
            return False

    def rest(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.gui + path, data=data, method=method, headers={"X-API-Key": self.key})  # noqa: S310 - loopback
        with urllib.request.urlopen(req, timeout=600) as r:  # noqa: S310 - our own loopback URL
            raw = r.read()
        return json.loads(raw) if raw.strip() else {}

    def pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-f", "--", f"--home={self.home}"], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


SYNCTHING_OPTIONS = {
    "globalAnnounceEnabled": "false", "localAnnounceEnabled": "false", "relaysEnabled": "false",
    "natEnabled": "false", "startBrowser": "false", "crashReportingEnabled": "false", "urAccepted": "-1",
    "autoUpgradeIntervalH": "0", "stunKeepaliveStartS": "0", "reconnectionIntervalS": "5",
}  # fmt: skip


def configure_syncthing(cfg: Path, gui_port: int, api_key: str, listen: str) -> None:
    """Edit a generated config.xml: GUI/REST on loopback with our API key, one listen address,
    and discovery, relays, NAT, upgrades and usage reports off."""
    tree = ET.parse(cfg)  # noqa: S314 - the file Syncthing just generated for us
    root = tree.getroot()
    gui = root.find("gui")
    assert gui is not None
    _set(gui, "address", f"127.0.0.1:{gui_port}")
    _set(gui, "apikey", api_key)
    opts = root.find("options")
    assert opts is not None
    for el in opts.findall("listenAddress"):
        opts.remove(el)
    ET.SubElement(opts, "listenAddress").text = listen
    for k, v in SYNCTHING_OPTIONS.items():
        _set(opts, k, v)
    tree.write(cfg)


def _set(parent: ET.Element, tag: str, text: str) -> None:
    el = parent.find(tag)
    if el is None:
        el = ET.SubElement(parent, tag)
    el.text = text


def st_share(a: Syncthing, b: Syncthing, folder: str, path_a: Path, path_b: Path) -> None:
    """Share `folder` between the two instances (send-receive, no watcher, rescans hourly)."""
    for me, path in ((a, path_a), (b, path_b)):
        me.rest("PUT", f"/rest/config/folders/{folder}", {
            "id": folder, "path": str(path), "type": "sendreceive", "fsWatcherEnabled": False,
            "rescanIntervalS": 3600, "devices": [{"deviceID": a.device_id}, {"deviceID": b.device_id}],
        })  # fmt: skip


def st_state(x: Syncthing, folder: str) -> str:
    """The folder's state on `x` ('' while the folder is not running yet)."""
    try:
        return str(x.rest("GET", f"/rest/db/status?folder={folder}")["state"])
    except OSError:
        return ""


def st_sync(a: Syncthing, b: Syncthing, folder: str, timeout: float) -> float:
    """Seconds from asking `a` to scan `folder` (the call returns when the scan is done) until `b`
    is idle with nothing needed, as many files as `a` and a newer sequence."""
    seq = b.rest("GET", f"/rest/db/status?folder={folder}")["sequence"]
    t0 = time.perf_counter()
    a.rest("POST", f"/rest/db/scan?folder={folder}")
    want = a.rest("GET", f"/rest/db/status?folder={folder}")

    def done() -> bool:
        s = b.rest("GET", f"/rest/db/status?folder={folder}")
        ok = s["state"] == "idle" and s["needFiles"] == 0 and s["localFiles"] == want["localFiles"]
        return bool(ok and s["sequence"] > seq)

    poll(done, timeout, "syncthing to sync", 0.1)
    return time.perf_counter() - t0


def syncthing_inside(
    master: Path, work: Path, nfiles: int, timeout: float, cases: frozenset[str] = CASES, settle: float = 2.0
) -> dict[str, float]:
    """The Syncthing runs; call only inside a private network namespace."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    fa, fb = work / "st-fa", work / "st-fb"
    for f in (fa, fb):
        (f / ".stfolder").mkdir(parents=True)
    a = Syncthing(work / "st-a", free_port(), free_port())
    b = Syncthing(work / "st-b", free_port(), free_port())
    res: dict[str, float] = {}
    try:
        for me, other in ((a, b), (b, a)):
            me.rest("PUT", f"/rest/config/devices/{other.device_id}",
                    {"deviceID": other.device_id, "addresses": [other.listen], "name": "peer"})  # fmt: skip
        st_share(a, b, "bench", fa, fb)

        def ready() -> bool:
            conns = a.rest("GET", "/rest/system/connections")["connections"]
            if not conns.get(b.device_id, {}).get("connected"):
                return False
            return all(st_state(x, "bench") == "idle" for x in (a, b))

        poll(ready, 120, "syncthing to connect", 0.2)
        time.sleep(settle)
        res["idle_rss_a"], res["idle_rss_b"] = (sum(rss_mb(p, "VmRSS") for p in x.pids()) for x in (a, b))

        def timed(prepare: Callable[[], None]) -> float:
            prepare()
            return st_sync(a, b, "bench", timeout)

        if cases & {"big", "change"}:
            res["big"] = timed(lambda: copy_data(master, fa, "big.bin"))
            assert same_file(fa / "big.bin", fb / "big.bin"), "syncthing: big file differs"
        if "small" in cases:
            res["small"] = timed(lambda: copy_data(master, fa, "small"))
            assert count_files(fb / "small") == nfiles
        if "change" in cases:
            res["change"] = timed(lambda: flip_middle_byte(fa / "big.bin"))
            assert same_file(fa / "big.bin", fb / "big.bin"), "syncthing: changed file differs"
        if "twoway" in cases:
            res["twoway"] = syncthing_twoway(a, b, master, work, timeout)
        if "scale" in cases:
            res |= syncthing_scale(a, b, master, work, timeout * 3)
    finally:
        a.stop()
        b.stop()
    return res


def syncthing_scale(a: Syncthing, b: Syncthing, master: Path, work: Path, timeout: float) -> dict[str, float]:
    """The scale case on the running, connected instances, in a new folder shared while empty: the
    first sync (from the scan request), with each instance's peak RSS (its VmHWM reset first); a
    full rescan of A that finds no change (from the request until A is idle); one file rewritten
    in place on A, from a scan request for that file alone (what Syncthing's watcher would send
    after its delay) until B holds it."""
    fa, fb = work / "st-sa", work / "st-sb"
    for f in (fa, fb):
        (f / ".stfolder").mkdir(parents=True)
    st_share(a, b, "scale", fa, fb)
    poll(lambda: st_state(a, "scale") == st_state(b, "scale") == "idle", 120, "the scale folder to start", 0.2)
    files = scale_files(master)
    copy_data(master, fa, "scale")
    out: dict[str, float] = {}
    rss = PeakRss({"a": a.pids(), "b": b.pids()}).start()
    try:
        out["scale_first"] = st_sync(a, b, "scale", timeout)
    finally:
        peaks = rss.stop()
    out["scale_peak_a"], out["scale_peak_b"] = peaks["a"], peaks["b"]
    assert holds(fb, files), "syncthing: the scale files are not all there"
    check_scale(master, fb, files, "syncthing")
    time.sleep(1.0)
    t0 = time.perf_counter()
    a.rest("POST", "/rest/db/scan?folder=scale")
    poll(lambda: st_state(a, "scale") == "idle", timeout, "syncthing to rescan", 0.02)
    out["scale_rescan"] = time.perf_counter() - t0
    name = edit_target(files)
    new = rewrite(fa / name)
    t0 = time.perf_counter()
    a.rest("POST", f"/rest/db/scan?folder=scale&sub={urllib.parse.quote(name)}")
    poll(lambda: content_is(fb / name, new), timeout, "syncthing to sync the edit", 0.01)
    out["scale_edit"] = time.perf_counter() - t0
    return out


def syncthing_twoway(a: Syncthing, b: Syncthing, master: Path, work: Path, timeout: float) -> float:
    """Seconds from sharing a folder that is pre-filled on both connected instances, each with data
    the other lacks, until both hold all of it (includes both scans, not Syncthing's start-up)."""
    ta, tb = work / "st-ta", work / "st-tb"
    for side, path in (("a", ta), ("b", tb)):
        fill_twoway(master, side, path)
        (path / ".stfolder").mkdir()
    total = sum(len(f) for f in twoway_files(master).values())
    t0 = time.perf_counter()
    for me, path in ((a, ta), (b, tb)):
        me.rest("PUT", "/rest/config/folders/twoway", {
            "id": "twoway", "path": str(path), "type": "sendreceive", "fsWatcherEnabled": False,
            "rescanIntervalS": 3600, "devices": [{"deviceID": a.device_id}, {"deviceID": b.device_id}],
        })  # fmt: skip

    def done(x: Syncthing) -> bool:
        try:
            s = x.rest("GET", "/rest/db/status?folder=twoway")
        except OSError:  # the folder is not running yet
            return False
        return bool(s["state"] == "idle" and s["needFiles"] == 0 and s["localFiles"] == s["globalFiles"] == total)

    poll(lambda: done(a) and done(b), timeout, "syncthing to sync both ways", 0.1)
    elapsed = time.perf_counter() - t0
    check_twoway(master, (ta, tb), "syncthing")
    return elapsed


def bench_syncthing(
    master: Path, work: Path, nfiles: int, timeout: float, cases: frozenset[str] = CASES, settle: float = 2.0
) -> dict[str, float]:
    """Run the Syncthing part in a fresh network namespace that holds only loopback."""
    job = {"master": str(master), "work": str(work), "nfiles": nfiles, "timeout": timeout,
           "cases": sorted(cases), "settle": settle}  # fmt: skip
    out = subprocess.run(
        ["unshare", "-n", "--", sys.executable, __file__, "--syncthing-inside", json.dumps(job)],
        capture_output=True, text=True, timeout=timeout * 12 + 300, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"syncthing run failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# -- the runs ------------------------------------------------------------------------------------

SLUGS = {"tofu-agent": "ta", AB: "tb", "syncthing": "st", "rsync": "rs", "rsync --fsync": "rf"}  # run directory names


def run_tofu(master: Path, work: Path, nfiles: int, timeout: float, cases: frozenset[str], settle: float) -> Figures:
    """Every case for our agents, each part on its own pair of agents."""
    out: Figures = {}
    if "idle" in cases:
        rss = without_mdns(settle)  # bench/idle_rss.py: two agents paired on loopback, empty folders
        out["idle_rss_a"], out["idle_rss_b"], out["idle_rss"] = rss[0], rss[1], sum(rss)
    if cases & ONE_WAY:
        res, mem = bench_tofu(master, work, nfiles, timeout, cases)
        out |= res | mem
    if "twoway" in cases:
        out["twoway"], out["twoway_startup"], out["twoway_peak_rss"] = bench_tofu_twoway(master, work, timeout)
    if "scale" in cases:
        out |= bench_tofu_scale(master, work, timeout * 3)
    return out


def run_tofu_b(master: Path, work: Path, nfiles: int, timeout: float, cases: frozenset[str], settle: float) -> Figures:
    """`run_tofu` with the agents running the code in `ab_root` (`python -m agent` from there)."""
    global agent_root
    agent_root = ab_root
    try:
        return run_tofu(master, work, nfiles, timeout, cases - {"idle"}, settle)
    finally:
        agent_root = ROOT


def one_run(
    number: int, tools: Sequence[str], master: Path, work: Path, nfiles: int, timeout: float, cases: frozenset[str],
    settle: float, limit_size: int,
) -> Run:  # fmt: skip
    """One run: the machine's limits, then each tool in turn, each in a directory deleted after it."""
    run: Run = {}
    print(f"run {number}: machine limits", file=sys.stderr, flush=True)
    run["limits"] = measure_limits(work, limit_size)
    for tool in tools:
        print(f"run {number}: {tool}", file=sys.stderr, flush=True)
        d = work / f"r{number}-{SLUGS[tool]}"
        d.mkdir()
        try:
            if tool == "tofu-agent":
                run[tool] = run_tofu(master, d, nfiles, timeout, cases, settle)
            elif tool == AB:
                run[tool] = run_tofu_b(master, d, nfiles, timeout, cases, settle)
            elif tool == "syncthing":
                st = bench_syncthing(master, d, nfiles, timeout, cases, settle)
                st["idle_rss"] = st["idle_rss_a"] + st["idle_rss_b"]
                run[tool] = st
            else:
                run[tool] = bench_rsync(master, d, timeout, cases, ["--fsync"] if tool == "rsync --fsync" else [])
        finally:
            retire(d)
    return run


# -- report --------------------------------------------------------------------------------------


def series(runs: Sequence[Run], tool: str, key: str) -> list[float]:
    """The figure `key` of `tool` in each run that has it."""
    return [r[tool][key] for r in runs if key in r.get(tool, {})]


def med(runs: Sequence[Run], tool: str, key: str) -> float | None:
    """The median over the runs of the figure `key` of `tool`; None if no run has it."""
    v = series(runs, tool, key)
    return statistics.median(v) if v else None


def each(runs: Sequence[Run], tool: str, key: str, fmt: str = "{:.2f}") -> str:
    """' (run 1 / run 2 / ...)', each run's own figure, when there is more than one."""
    v = series(runs, tool, key)
    return f" ({' / '.join(fmt.format(x) for x in v)})" if len(v) > 1 else ""


def floor_of(runs: Sequence[Run]) -> tuple[str, float]:
    """The slowest of the machine's limits (median MB/s over the runs): its key and MB/s."""
    lim = {k: statistics.median(series(runs, "limits", k)) for k in LIMITS}
    key = min(lim, key=lambda k: lim[k])
    return key, lim[key]


def report(
    runs: Sequence[Run], sizes: dict[str, int], notes: list[str], nfiles: int, settle: float, edit: str = ""
) -> None:
    ours, sy = "tofu-agent", "syncthing"
    tools = [t for t in TOOLS if any(t in r for r in runs)]
    print()
    if len(runs) > 1:
        print(f"{len(runs)} runs, the tools taking turns in each ({', '.join(tools)}; each run starts with the "
              "next one): every figure is the median "
              "of the runs, each run's own figure in brackets (run 1 / run 2 / ...)")  # fmt: skip
    print("machine limits: " + ", ".join(
        f"{label} {statistics.median(series(runs, 'limits', k)):.0f} MB/s{each(runs, 'limits', k, '{:.0f}')}"
        for k, label in LIMITS.items()))  # fmt: skip
    fkey, floor = floor_of(runs)
    if med(runs, ours, "big"):
        print(f"floor for the big file: the slowest limit, {LIMITS[fkey]}, {floor:.0f} MB/s = "
              f"{sizes['big'] / floor / 1e6:.2f} s for {sizes['big'] // MiB} MiB")  # fmt: skip
    cases = [("big", "1 big file"), ("small", "small files"), ("change", "one-byte change"),
             ("twoway", "two-way")]  # fmt: skip
    others = tools[1:]
    widths = [max(16, len("ours/" + t) + 2) for t in others]
    shown = [(c, label) for c, label in cases if any(series(runs, t, c) for t in tools)]
    if shown:
        print(f"{'case':<18}" + "".join(f"{t:>22}" for t in tools)
              + "".join(f"{'ours/' + t:>{w}}" for t, w in zip(others, widths, strict=True)))  # fmt: skip
    for case, label in shown:
        cells = []
        for t in tools:
            sec = med(runs, t, case)
            cells.append(f"{sec:8.2f} s {sizes[case] / sec / 1e6:7.1f} MB/s" if sec else f"{'-':>22}")
        mine = med(runs, ours, case)
        ratios = []
        for t, w in zip(others, widths, strict=True):
            theirs = med(runs, t, case)
            ratios.append(f"{mine / theirs:{w}.2f}" if mine and theirs else f"{'-':>{w}}")
        print(f"{label:<18}" + "".join(f"{c:>22}" for c in cells) + "".join(ratios))
    if len(runs) > 1 and shown:
        print("each run, seconds:")
        for case, label in shown:
            parts = [f"{t} {' / '.join(f'{x:.2f}' for x in series(runs, t, case))}" for t in tools
                     if series(runs, t, case)]  # fmt: skip
            print(f"  {label:<16}  " + "; ".join(parts))
    ours_big = med(runs, ours, "big")
    if ours_big:
        mbps = sizes["big"] / ours_big / 1e6
        lim = {k: statistics.median(series(runs, "limits", k)) for k in LIMITS}
        print(
            f"our big-file throughput {mbps:.0f} MB/s = {mbps / floor:.0%} of the slowest limit ({floor:.0f} MB/s, "
            f"{LIMITS[fkey]}); TLS {mbps / lim['tls']:.0%}, SHA-256 {mbps / lim['sha256']:.0%}, "
            f"disk {mbps / lim['disk']:.0%}"
        )
    memory = []
    if (x := med(runs, ours, "peak_rss")) is not None:
        memory.append(f"peak during the big file {x:.1f} MB{each(runs, ours, 'peak_rss', '{:.1f}')} (VmHWM)")
    if (x := med(runs, ours, "twoway_peak_rss")) is not None:
        memory.append(f"peak during the two-way case {x:.1f} MB{each(runs, ours, 'twoway_peak_rss', '{:.1f}')} (VmHWM)")
    if (x := med(runs, ours, "change_bytes_received")) is not None:
        memory.append(f"the one-byte change moved {x:.0f} bytes")
    if memory:
        print("tofu-agent memory: " + "; ".join(memory))
    for t in (ours, AB):
        if med(runs, t, "small_user_b") is not None:
            cpu = [f"{side} user {med(runs, t, f'small_user_{k}') or 0:.2f}{each(runs, t, f'small_user_{k}', '{:.2f}')}"
                   f" + system {med(runs, t, f'small_sys_{k}') or 0:.2f}{each(runs, t, f'small_sys_{k}', '{:.2f}')} s"
                   for side, k in (("sender", "a"), ("receiver", "b"))]  # fmt: skip
            print(f"{t} CPU during the small files: " + "; ".join(cpu))
    ours_tw, st_tw = med(runs, ours, "twoway"), med(runs, sy, "twoway")
    if ours_tw:
        versus = f", Syncthing {st_tw:.2f} s, ours/Syncthing {ours_tw / st_tw:.2f}" if st_tw else ""
        print(
            f"two-way ({sizes['twoway'] // 2 // MiB} MiB a side the other lacks): tofu-agent {ours_tw:.2f} s "
            f"from spawning both agents ({med(runs, ours, 'twoway_startup') or 0:.2f} s of it until both answered "
            f"`status`){versus}; Syncthing's is timed from sharing the folder between its running, connected instances"
        )
    if any(series(runs, t, "scale_first") for t in (ours, sy)):
        report_scale(runs, sizes["scale"], edit)
    if any(series(runs, t, "idle_rss") for t in (ours, sy)):
        parts = []
        if (x := med(runs, ours, "idle_rss")) is not None:
            parts.append(
                f"tofu-agent {x:.1f} MB{each(runs, ours, 'idle_rss', '{:.1f}')} = alpha "
                f"{med(runs, ours, 'idle_rss_a') or 0:.1f} + beta {med(runs, ours, 'idle_rss_b') or 0:.1f} "
                f"(bench/idle_rss.py: two agents paired on loopback, empty folders, {settle:.0f} s idle)"
            )
        if (x := med(runs, sy, "idle_rss")) is not None:
            parts.append(
                f"Syncthing {x:.1f} MB{each(runs, sy, 'idle_rss', '{:.1f}')} = A {med(runs, sy, 'idle_rss_a') or 0:.1f}"
                f" + B {med(runs, sy, 'idle_rss_b') or 0:.1f} (two connected instances, every process of each, "
                f"an empty folder, {settle:.0f} s idle)"
            )
        print("idle RSS (VmRSS): " + "; ".join(parts))
    for n in notes:
        print("note:", n)
    print()
    print("goals (issue 17)" + (f", medians of {len(runs)} runs" if len(runs) > 1 else "") + ":")
    for goal, figure, met in goals(runs, sizes, nfiles):
        print(f"  {goal:<46} {figure}: {'met' if met else 'missed' if met is not None else 'not measured'}")


def report_scale(runs: Sequence[Run], total: int, edit: str) -> None:
    """The scale case's lines; `edit` names the file the one-file edit rewrites."""
    ours, sy = "tofu-agent", "syncthing"
    print("scale case:")
    for key, label in (("scale_first", "first sync"), ("scale_rescan", "no-change rescan"),
                       ("scale_edit", "one-file edit")):  # fmt: skip
        parts = []
        for t in (ours, sy):
            if (v := med(runs, t, key)) is not None:
                rate = f", {total / v / 1e6:.1f} MB/s" if key == "scale_first" else ""
                parts.append(f"{t} {v:.2f} s{rate}{each(runs, t, key)}")
        mine, theirs = med(runs, ours, key), med(runs, sy, key)
        if mine and theirs:
            parts.append(f"ours/Syncthing {mine / theirs:.2f}")
        print(f"  {label:<18}{'; '.join(parts) if parts else '-'}")
    peaks = []
    for t, sides in ((ours, ("alpha", "beta")), (sy, ("A", "B"))):
        a, b = med(runs, t, "scale_peak_a"), med(runs, t, "scale_peak_b")
        if a is not None and b is not None:
            peaks.append(f"{t} {sides[0]} {a:.1f}{each(runs, t, 'scale_peak_a', '{:.1f}')} / {sides[1]} {b:.1f}"
                         f"{each(runs, t, 'scale_peak_b', '{:.1f}')} MB")  # fmt: skip
    if peaks:
        print(f"  {'peak RSS':<18}during the first sync, each side (VmHWM, reset when the sync starts): "
              + "; ".join(peaks))  # fmt: skip
    if (mx := med(runs, ours, "status_max_ms")) is not None:
        md = med(runs, ours, "status_median_ms") or 0.0
        n = sum(series(runs, ours, "status_samples"))
        failed = sum(series(runs, ours, "status_failed"))
        print(
            f"  {'status --json':<18}while our first sync runs: max {mx:.0f} ms"
            f"{each(runs, ours, 'status_max_ms', '{:.0f}')},"
            f" median {md:.0f} ms{each(runs, ours, 'status_median_ms', '{:.0f}')}; {n:.0f} sample{'s' * (n != 1)}"
            + (f", {failed:.0f} failed" if failed else "")
            + f" (a fresh `tofu-agent status --json` process every {STATUS_EVERY:.0f} s, alpha and beta in turn)"
        )
    scanning = med(runs, ours, "scale_rescan_scanning")
    shown = f" ({scanning:.2f} s of it shown as scanning)" if scanning is not None else ""
    for line in (
        "timed: first sync, ours from renaming the data into alpha's folder, Syncthing's from the scan request,",
        "  until the other side holds every file (both byte-checked after);",
        "no-change rescan, ours from touching alpha's folder root (the agent has no rescan command; its watcher",
        f"  turns an event on the root into a full rescan of the folder) until alpha's `status` is idle again{shown},",
        "  Syncthing's from POST /rest/db/scan?folder=scale on A until A is idle;",
        f"one-file edit, the file closest to 1 MiB ({edit}) rewritten in place on alpha / A, ours from the",
        "  write (our watcher sees it), Syncthing's from a scan request for that file alone (what its watcher",
        "  would send), until the other side holds it",
    ):
        print("  " + line)
    missed = len(series(runs, ours, "scale_first")) - len(series(runs, ours, "scale_rescan"))
    if missed:
        print(f"  our rescan ended between two status polls in {missed} run(s), so its start was not seen: no figure")


def goals(runs: Sequence[Run], sizes: dict[str, int], nfiles: int) -> list[tuple[str, str, bool | None]]:
    """(goal, figure, met: None if not measured) for each goal of issue 17, from the medians."""
    ours, sy = "tofu-agent", "syncthing"
    out: list[tuple[str, str, bool | None]] = []

    def missing(*needs: tuple[str, str]) -> str | None:
        gone = [f"{t} {k}" for t, k in needs if med(runs, t, k) is None]
        return "no " + ", ".join(gone) + " figure" if gone else None

    def ratio(goal: str, key: str, limit: float) -> None:
        if why := missing((ours, key), (sy, key)):
            out.append((goal, why, None))
            return
        mine, theirs = med(runs, ours, key) or 0.0, med(runs, sy, key) or 1.0
        out.append((goal, f"{mine / theirs:.2f} ({mine:.2f} s / {theirs:.2f} s)", mine / theirs <= limit))

    def at_most(goal: str, key: str, tool: str, unit: str = "s", fmt: str = "{:.2f}") -> None:
        if why := missing((ours, key), (tool, key)):
            out.append((goal, why, None))
            return
        mine, theirs = med(runs, ours, key) or 0.0, med(runs, tool, key) or 0.0
        out.append((goal, f"{fmt.format(mine)} {unit} vs {fmt.format(theirs)} {unit}", mine <= theirs))

    ratio("big file: ours/Syncthing <= 0.8", "big", 0.8)
    ratio(f"{nfiles:,} files: ours/Syncthing <= 0.35", "small", 0.35)
    ratio("one-byte change: ours/Syncthing <= 0.33", "change", 0.33)
    goal = "big file: ours >= 85 % of the slowest limit"
    if (sec := med(runs, ours, "big")) is None:
        out.append((goal, "no tofu-agent big figure", None))
    else:
        fkey, floor = floor_of(runs)
        mbps = sizes["big"] / sec / 1e6
        out.append((goal, f"{mbps:.0f} MB/s = {mbps / floor:.0%} of {floor:.0f} MB/s ({LIMITS[fkey]})",
                    mbps >= 0.85 * floor))  # fmt: skip
    at_most(f"{nfiles:,} files: ours <= rsync --fsync", "small", "rsync --fsync")
    goal = f"{nfiles:,} files: ours <= 2.5 x plain rsync"
    if why := missing((ours, "small"), ("rsync", "small")):
        out.append((goal, why, None))
    else:
        mine, theirs = med(runs, ours, "small") or 0.0, med(runs, "rsync", "small") or 1.0
        out.append((goal, f"{mine:.2f} s = {mine / theirs:.2f} x rsync's {theirs:.2f} s", mine <= 2.5 * theirs))
    ratio("scale: first sync <= 0.5 x Syncthing", "scale_first", 0.5)
    at_most("scale: no-change rescan <= Syncthing's", "scale_rescan", sy)
    goal = "scale: peak RSS <= 200 MB each side"
    if why := missing((ours, "scale_peak_a"), (ours, "scale_peak_b")):
        out.append((goal, why, None))
    else:
        a, b = med(runs, ours, "scale_peak_a") or 0.0, med(runs, ours, "scale_peak_b") or 0.0
        out.append((goal, f"alpha {a:.1f} MB, beta {b:.1f} MB", max(a, b) <= 200))
    goal = "scale: status --json < 300 ms while syncing"
    if why := missing((ours, "status_max_ms")):
        out.append((goal, why, None))
    else:
        mx, md = med(runs, ours, "status_max_ms") or 0.0, med(runs, ours, "status_median_ms") or 0.0
        out.append((goal, f"max {mx:.0f} ms (median {md:.0f} ms)", mx < 300))
    goal = "scale: one-file edit < 1 s"
    if (sec := med(runs, ours, "scale_edit")) is None:
        out.append((goal, "no tofu-agent scale_edit figure", None))
    else:
        out.append((goal, f"{sec:.2f} s", sec < 1.0))
    at_most("idle RSS: our two agents <= Syncthing's two", "idle_rss", sy, "MB", "{:.1f}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes (32 MiB, 300 files, 16 MiB a side two-way, 500 scale files): what the test suite runs",
    )
    p.add_argument(
        "--runs", type=int, default=1, help="runs, the tools taking turns in each; figures are medians (default 1)"
    )
    p.add_argument(
        "--scale-files",
        type=int,
        metavar="N",
        help=f"files in the scale case, {SCALE_PER_DIR} a directory (default 100,000; with --quick 500)",
    )
    p.add_argument("--workdir", default="/tmp", help="where data and homes go (one file system)")
    p.add_argument("--ab", metavar="DIR", help="also run the agent code in DIR (e.g. a `git worktree` "
                   "of the previous commit) as 'tofu-agent B', taking turns with this tree's code")  # fmt: skip
    p.add_argument("--no-syncthing", action="store_true")
    p.add_argument("--no-rsync", action="store_true")
    p.add_argument("--case", action="append", choices=sorted(CASES),
                   help="run only this case (repeatable; default: all)")  # fmt: skip
    p.add_argument("--syncthing-inside", metavar="JOB", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.syncthing_inside:
        job = json.loads(args.syncthing_inside)
        res = syncthing_inside(Path(job["master"]), Path(job["work"]), int(job["nfiles"]), float(job["timeout"]),
                               frozenset(job["cases"]), float(job["settle"]))  # fmt: skip
        print(json.dumps(res))
        return 0
    if args.runs < 1 or (args.scale_files is not None and args.scale_files < 1):
        p.error("--runs and --scale-files need a positive number")
    big, nfiles, ndirs = (32 * MiB, 300, 10) if args.quick else (1024 * MiB, 10_000, 100)
    twoway = (8, 2 * MiB) if args.quick else (50, 10 * MiB)  # files a side, bytes each
    nscale = args.scale_files or (500 if args.quick else 100_000)
    sdirs = max(1, nscale // SCALE_PER_DIR)
    timeout = 120.0 if args.quick else 600.0
    settle = 2.0 if args.quick else 5.0  # seconds idle before the idle RSS is read
    cases = frozenset(args.case) if args.case else CASES
    notes: list[str] = []
    tools = ["tofu-agent"]
    if args.ab:
        global ab_root
        ab_root = Path(args.ab).resolve()
        if not (ab_root / "agent" / "__main__.py").is_file():
            p.error(f"--ab {args.ab}: no agent package there")
        tools.append(AB)
    if args.no_syncthing or shutil.which("syncthing") is None or shutil.which("unshare") is None:
        notes.append("Syncthing skipped (not installed or --no-syncthing): apt-get install -y syncthing")
    else:
        tools.append("syncthing")
    if args.no_rsync or shutil.which("rsync") is None:
        notes.append("rsync skipped (not installed or --no-rsync): apt-get install -y rsync")
    else:
        if cases & ONE_WAY:
            tools.append("rsync")
            if rsync_has_fsync():
                tools.append("rsync --fsync")
            else:
                notes.append("this rsync has no --fsync (`rsync --help`; rsync 3.2.4 and later have it): "
                             "no `rsync --fsync` figures")  # fmt: skip
        if "twoway" in cases:
            notes.append("rsync pushes one way: no two-way figure for it")
        if "scale" in cases:
            notes.append("rsync does not run the scale case")
    work = Path(tempfile.mkdtemp(prefix="tb-", dir=args.workdir))
    try:
        master = make_data(work, big, nfiles, ndirs, cases, twoway, (nscale, sdirs))
        # (--quick checks that the bench runs, not its figures: it does not wait, as in the suite)
        if (settled := wait_for_settled_fs(work, 0.0 if args.quick else SETTLE_MAX)) >= 1:
            notes.append(f"waited {settled:.0f} s for file creation to be fast again before the first run")
        scale_total = sum(scale_files(master).values()) if "scale" in cases else 0
        # each run starts with the next tool: the first turn after the data is made (or after another
        # bench on this disk) pays for whatever the file system still does, and each tool pays it once
        runs = [one_run(i + 1, tools[i % len(tools):] + tools[:i % len(tools)], master, work, nfiles, timeout,
                        cases, settle, min(big, 512 * MiB)) for i in range(args.runs)]  # fmt: skip
        sizes = {"big": big, "small": nfiles * 4096, "change": big, "twoway": 2 * twoway[0] * twoway[1],
                 "scale": scale_total}  # fmt: skip
        data = {
            "big": f"{big // MiB} MiB random file",
            "small": f"{nfiles} x 4 KiB files in {ndirs} directories",
            "change": "one byte changed in the middle of the big file",
            "twoway": f"two-way: {twoway[0]} x {twoway[1] // MiB} MiB random files on each side that the other lacks",
            "scale": f"scale: {nscale:,} random files in {sdirs:,} directories, {scale_total / MiB:,.1f} MiB, sizes "
            f"{SCALE_MIN // 1024} KiB to {SCALE_MAX // MiB} MiB drawn from p(size) ~ size^-{SCALE_ALPHA} "
            f"(seed {SCALE_SEED})",
            "idle": "idle: two paired agents / two Syncthing instances with empty folders",
        }
        print("data: " + "; ".join(v for k, v in data.items() if k in cases))
        edit = ""
        if "scale" in cases:
            files = scale_files(master)
            name = edit_target(files)
            edit = f"{name}, {files[name] / MiB:.2f} MiB"
        report(runs, sizes, notes, nfiles, settle, edit)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
