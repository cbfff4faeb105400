"""Folder sync benchmark: tofu-agent against Syncthing and an rsync daemon, plus this machine's limits.

    .venv/bin/python bench/sync_bench.py            # 1 GiB file, 10,000 x 4 KiB files, one-byte change, two-way
    .venv/bin/python bench/sync_bench.py --quick    # small sizes, a minute at most (the test suite runs it)
    .venv/bin/python bench/sync_bench.py --case twoway --no-rsync   # 500 MiB a side the other lacks, vs Syncthing

Needs `syncthing` and `rsync` (Debian: `apt-get install -y syncthing rsync`); a missing tool's
columns are skipped with a note. All traffic stays on loopback: our agents and rsync use
127.0.0.1, and the two Syncthing instances run in a private network namespace (`unshare -n`,
only `lo` up) with discovery, relays and NAT off, driven through their REST API.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

MiB = 1024 * 1024
CASES = frozenset({"big", "small", "change", "twoway"})
ONE_WAY = frozenset({"big", "small", "change"})  # the cases one pair of running agents syncs in turn
Results = dict[str, dict[str, float]]  # tool -> case -> seconds


# -- data ----------------------------------------------------------------------------------------


def make_data(
    work: Path, big: int, files: int, dirs: int, cases: frozenset[str] = ONE_WAY, twoway: tuple[int, int] = (0, 0)
) -> Path:
    """The master data set, only what `cases` need: big.bin (random), small/DIR/FILE (4 KiB each,
    random), and for the two-way case twoway/a/ta/ and twoway/b/tb/ (`twoway` = (files, bytes
    each) per side, random), the data each side starts with and the other lacks."""
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
    os.sync()
    return master


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
    """MB/s writing `total` bytes and fsyncing them."""
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
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=ROOT)
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
                           capture_output=True, text=True, timeout=30, check=False, cwd=ROOT)  # fmt: skip
        return json.loads(r.stdout) if r.returncode == 0 else None

    def status(self) -> dict[str, Any] | None:
        """`status --json` if the agent answers, else None."""
        st = self._cli("status", "--json")
        return st if isinstance(st, dict) and st.get("running", True) else None

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
        time.sleep(3.0)  # let start-up work finish before calling it idle
        assert a.proc is not None and b.proc is not None
        mem["idle_rss"] = max(rss_mb(a.proc.pid, "VmRSS"), rss_mb(b.proc.pid, "VmRSS"))
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
            t0 = time.perf_counter()
            os.rename(stage / "small", fa / "small")
            poll(lambda: count_files(fb / "small") == nfiles if (fb / "small").exists() else False, timeout,
                 "the small files", 0.1)  # fmt: skip
            res["small"] = time.perf_counter() - t0
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
            shutil.rmtree(h, ignore_errors=True)  # the space for Syncthing's copies
    return elapsed, started, peak


# -- rsync ---------------------------------------------------------------------------------------


def bench_rsync(master: Path, work: Path, timeout: float, cases: frozenset[str] = CASES) -> dict[str, float]:
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
            subprocess.run(["rsync", "-a", f"{src}/", f"rsync://127.0.0.1:{port}/m/"], check=True, timeout=timeout)
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


def syncthing_inside(
    master: Path, work: Path, nfiles: int, timeout: float, cases: frozenset[str] = CASES
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
        for me, other, path in ((a, b, fa), (b, a, fb)):
            me.rest("PUT", f"/rest/config/devices/{other.device_id}",
                    {"deviceID": other.device_id, "addresses": [other.listen], "name": "peer"})  # fmt: skip
            me.rest("PUT", "/rest/config/folders/bench", {
                "id": "bench", "path": str(path), "type": "sendreceive", "fsWatcherEnabled": False,
                "rescanIntervalS": 3600, "devices": [{"deviceID": a.device_id}, {"deviceID": b.device_id}],
            })  # fmt: skip

        def ready() -> bool:
            conns = a.rest("GET", "/rest/system/connections")["connections"]
            if not conns.get(b.device_id, {}).get("connected"):
                return False
            return all(x.rest("GET", "/rest/db/status?folder=bench")["state"] == "idle" for x in (a, b))

        poll(ready, 120, "syncthing to connect", 0.2)
        time.sleep(2.0)
        res["idle_rss"] = max(sum(rss_mb(p, "VmRSS") for p in x.pids()) for x in (a, b))

        def timed(prepare: Callable[[], None], changed: bool) -> float:
            prepare()
            seq = b.rest("GET", "/rest/db/status?folder=bench")["sequence"]
            t0 = time.perf_counter()
            a.rest("POST", "/rest/db/scan?folder=bench")
            want = a.rest("GET", "/rest/db/status?folder=bench")

            def done() -> bool:
                s = b.rest("GET", "/rest/db/status?folder=bench")
                ok = s["state"] == "idle" and s["needFiles"] == 0 and s["localFiles"] == want["localFiles"]
                return bool(ok and (s["sequence"] > seq if changed else True))

            poll(done, timeout, "syncthing to sync", 0.1)
            return time.perf_counter() - t0

        if cases & {"big", "change"}:
            res["big"] = timed(lambda: copy_data(master, fa, "big.bin"), True)
            assert same_file(fa / "big.bin", fb / "big.bin"), "syncthing: big file differs"
        if "small" in cases:
            res["small"] = timed(lambda: copy_data(master, fa, "small"), True)
            assert count_files(fb / "small") == nfiles
        if "change" in cases:
            res["change"] = timed(lambda: flip_middle_byte(fa / "big.bin"), True)
            assert same_file(fa / "big.bin", fb / "big.bin"), "syncthing: changed file differs"
        if "twoway" in cases:
            res["twoway"] = syncthing_twoway(a, b, master, work, timeout)
    finally:
        a.stop()
        b.stop()
    return res


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
    master: Path, work: Path, nfiles: int, timeout: float, cases: frozenset[str] = CASES
) -> dict[str, float]:
    """Run the Syncthing part in a fresh network namespace that holds only loopback."""
    out = subprocess.run(
        ["unshare", "-n", "--", sys.executable, __file__, "--syncthing-inside", str(master), str(work), str(nfiles),
         str(timeout), ",".join(sorted(cases))],
        capture_output=True, text=True, timeout=timeout * 4 + 300, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"syncthing run failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# -- report --------------------------------------------------------------------------------------


def report(results: Results, sizes: dict[str, int], limits: dict[str, float], mem: dict[str, float],
           notes: list[str]) -> None:  # fmt: skip
    print()
    print(
        f"machine limits: loopback TLS {limits['tls']:.0f} MB/s, SHA-256 {limits['sha256']:.0f} MB/s, "
        f"disk write+fsync {limits['disk']:.0f} MB/s"
    )
    cases = [("big", "1 big file"), ("small", "small files"), ("change", "one-byte change"),
             ("twoway", "two-way")]  # fmt: skip
    tools = list(results)
    print(f"{'case':<18}" + "".join(f"{t:>22}" for t in tools) + "".join(f"{'ours/' + t:>16}" for t in tools[1:]))
    for case, label in cases:
        if not any(case in r for r in results.values()):
            continue
        cells = []
        for t in tools:
            sec = results[t].get(case)
            cells.append(f"{sec:8.2f} s {sizes[case] / sec / 1e6:7.1f} MB/s" if sec else f"{'-':>22}")
        ours = results["tofu-agent"].get(case)
        ratios = [
            f"{ours / results[t][case]:16.2f}" if ours and results[t].get(case) else f"{'-':>16}" for t in tools[1:]
        ]
        print(f"{label:<18}" + "".join(f"{c:>22}" for c in cells) + "".join(ratios))
    ours_big = results["tofu-agent"].get("big")
    if ours_big:
        mbps = sizes["big"] / ours_big / 1e6
        limit = min(limits["tls"], limits["sha256"], limits["disk"])
        print(
            f"our big-file throughput {mbps:.0f} MB/s = {mbps / limit:.0%} of the slowest limit ({limit:.0f} MB/s); "
            f"TLS {mbps / limits['tls']:.0%}, SHA-256 {mbps / limits['sha256']:.0%}, disk {mbps / limits['disk']:.0%}"
        )
    memory = []
    if "idle_rss" in mem:
        memory.append(f"idle {mem['idle_rss']:.1f} MB RSS")
    if "peak_rss" in mem:
        memory.append(f"peak during the big file {mem['peak_rss']:.1f} MB (VmHWM)")
    if "twoway_peak_rss" in mem:
        memory.append(f"peak during the two-way case {mem['twoway_peak_rss']:.1f} MB (VmHWM)")
    if "change_bytes_received" in mem:
        memory.append(f"the one-byte change moved {mem['change_bytes_received']:.0f} bytes")
    if memory:
        print("tofu-agent memory: " + "; ".join(memory))
    ours_tw, st_tw = results["tofu-agent"].get("twoway"), results.get("syncthing", {}).get("twoway")
    if ours_tw:
        versus = f", Syncthing {st_tw:.2f} s, ours/Syncthing {ours_tw / st_tw:.2f}" if st_tw else ""
        print(
            f"two-way ({sizes['twoway'] // 2 // MiB} MiB a side the other lacks): tofu-agent {ours_tw:.2f} s "
            f"from spawning both agents ({mem.get('twoway_startup', 0):.2f} s of it until both answered `status`)"
            f"{versus}; Syncthing's is timed from sharing the folder between its running, connected instances"
        )
    if "syncthing_idle_rss" in mem:
        print(f"syncthing idle: {mem['syncthing_idle_rss']:.1f} MB RSS per instance (monitor + main process)")
    for n in notes:
        print("note:", n)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="small sizes (32 MiB, 300 files, 16 MiB a side two-way), for the test suite")  # fmt: skip
    p.add_argument("--workdir", default="/tmp", help="where data and homes go (one file system)")
    p.add_argument("--no-syncthing", action="store_true")
    p.add_argument("--no-rsync", action="store_true")
    p.add_argument("--case", action="append", choices=sorted(CASES),
                   help="run only this case (repeatable; default: all)")  # fmt: skip
    p.add_argument("--syncthing-inside", nargs=5, metavar=("MASTER", "WORK", "NFILES", "TIMEOUT", "CASES"),
                   help=argparse.SUPPRESS)  # fmt: skip
    args = p.parse_args()
    if args.syncthing_inside:
        master, work, n, to, which = args.syncthing_inside
        print(json.dumps(syncthing_inside(Path(master), Path(work), int(n), float(to), frozenset(which.split(",")))))
        return 0
    big, nfiles, ndirs = (32 * MiB, 300, 10) if args.quick else (1024 * MiB, 10_000, 100)
    twoway = (8, 2 * MiB) if args.quick else (50, 10 * MiB)  # files a side, bytes each
    timeout = 120.0 if args.quick else 600.0
    cases = frozenset(args.case) if args.case else CASES
    work = Path(tempfile.mkdtemp(prefix="tb-", dir=args.workdir))
    notes: list[str] = []
    try:
        master = make_data(work, big, nfiles, ndirs, cases, twoway)
        limits = {
            "tls": tls_throughput(min(big, 512 * MiB)),
            "sha256": sha256_speed(min(big, 512 * MiB)),
            "disk": disk_write_speed(work, min(big, 512 * MiB)),
        }
        results: Results = {}
        ours: dict[str, float] = {}
        mem: dict[str, float] = {}
        if cases & ONE_WAY:
            ours, mem = bench_tofu(master, work, nfiles, timeout, cases)
        if "twoway" in cases:
            ours["twoway"], mem["twoway_startup"], mem["twoway_peak_rss"] = bench_tofu_twoway(master, work, timeout)
        results["tofu-agent"] = ours
        if args.no_syncthing or shutil.which("syncthing") is None or shutil.which("unshare") is None:
            notes.append("Syncthing skipped (not installed or --no-syncthing): apt-get install -y syncthing")
        else:
            st = bench_syncthing(master, work, nfiles, timeout, cases)
            mem["syncthing_idle_rss"] = st.pop("idle_rss")
            results["syncthing"] = st
        if args.no_rsync or shutil.which("rsync") is None:
            notes.append("rsync skipped (not installed or --no-rsync): apt-get install -y rsync")
        else:
            if cases & ONE_WAY:
                results["rsync"] = bench_rsync(master, work, timeout, cases)
            if "twoway" in cases:
                notes.append("rsync pushes one way: no two-way figure for it")
        sizes = {"big": big, "small": nfiles * 4096, "change": big, "twoway": 2 * twoway[0] * twoway[1]}
        data = {
            "big": f"{big // MiB} MiB random file",
            "small": f"{nfiles} x 4 KiB files in {ndirs} directories",
            "change": "one byte changed in the middle of the big file",
            "twoway": f"two-way: {twoway[0]} x {twoway[1] // MiB} MiB random files on each side that the other lacks",
        }
        print("data: " + "; ".join(v for k, v in data.items() if k in cases))
        report(results, sizes, limits, mem, notes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
