"""Folder sync benchmark: tofu-agent against Syncthing and an rsync daemon, plus this machine's limits.

    .venv/bin/python bench/sync_bench.py            # 1 GiB file, 10,000 x 4 KiB files, one-byte change
    .venv/bin/python bench/sync_bench.py --quick    # small sizes, a minute at most (the test suite runs it)

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.agent.harness import AgentProc, free_port, wait_for  # noqa: E402

MiB = 1024 * 1024
CASES = frozenset({"big", "small", "change"})
Results = dict[str, dict[str, float]]  # tool -> case -> seconds


# -- data ----------------------------------------------------------------------------------------


def make_data(work: Path, big: int, files: int, dirs: int) -> Path:
    """The master data set: big.bin (random) and small/DIR/FILE (4 KiB each, random)."""
    master = work / "master"
    (master / "small").mkdir(parents=True)
    with (master / "big.bin").open("wb") as fh:
        left = big
        while left:
            n = min(left, 8 * MiB)
            fh.write(os.urandom(n))
            left -= n
    for i in range(files):
        d = master / "small" / f"d{i % dirs:03d}"
        d.mkdir(exist_ok=True)
        (d / f"f{i:05d}.dat").write_bytes(os.urandom(4096))
    os.sync()
    return master


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


def poll(pred: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(step)


def bench_tofu(
    master: Path, work: Path, nfiles: int, timeout: float, cases: frozenset[str] = CASES
) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per case for two tofu-agents, and their memory figures (MB).

    The one-byte change needs the big file in place first: it is synced (untimed) if `big` is not a case.
    """
    homes = [work / "ta-a", work / "ta-b"]
    for h in homes:
        h.mkdir()
    a, b = AgentProc(homes[0], "alpha"), AgentProc(homes[1], "beta")
    fa, fb = homes[0] / "f", homes[1] / "f"
    stage = work / "ta-stage"
    res: dict[str, float] = {}
    mem: dict[str, float] = {}
    try:
        a.start("--folder", str(fa), peers=[b])
        b.start("--folder", str(fb), peers=[a])
        idb = b.identity()["device_id"]
        a.wait_peer(idb, connected=True, timeout=30)
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
        wait_for(lambda: (s := b.status()) and s["folders"][0]["state"] == "idle", 30, "beta idle")
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
        wait_for(lambda: (s := b.status()) and s["folders"][0]["state"] == "idle", 30, "beta idle")
        st = b.status()
        assert st is not None
        mem["change_bytes_received"] = float(st["folders"][0]["bytes_received"] - received_before)
    finally:
        a.stop()
        b.stop()
    return res, mem


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
    finally:
        a.stop()
        b.stop()
    return res


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
    cases = [("big", "1 big file"), ("small", "small files"), ("change", "one-byte change")]
    tools = list(results)
    print(f"{'case':<18}" + "".join(f"{t:>22}" for t in tools) + "".join(f"{'ours/' + t:>16}" for t in tools[1:]))
    for case, label in cases:
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
    print(
        f"tofu-agent memory: idle {mem.get('idle_rss', 0):.1f} MB RSS, peak during the big file "
        f"{mem.get('peak_rss', 0):.1f} MB (VmHWM); "
        f"the one-byte change moved {mem.get('change_bytes_received', 0):.0f} bytes"
    )
    if "syncthing_idle_rss" in mem:
        print(f"syncthing idle: {mem['syncthing_idle_rss']:.1f} MB RSS per instance (monitor + main process)")
    for n in notes:
        print("note:", n)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (32 MiB, 300 files), for the test suite")
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
    timeout = 120.0 if args.quick else 600.0
    work = Path(tempfile.mkdtemp(prefix="tb-", dir=args.workdir))
    notes: list[str] = []
    try:
        master = make_data(work, big, nfiles, ndirs)
        limits = {
            "tls": tls_throughput(min(big, 512 * MiB)),
            "sha256": sha256_speed(min(big, 512 * MiB)),
            "disk": disk_write_speed(work, min(big, 512 * MiB)),
        }
        results: Results = {}
        cases = frozenset(args.case) if args.case else CASES
        ours, mem = bench_tofu(master, work, nfiles, timeout, cases)
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
            results["rsync"] = bench_rsync(master, work, timeout, cases)
        sizes = {"big": big, "small": nfiles * 4096, "change": big}
        print(f"data: {big // MiB} MiB random file; {nfiles} x 4 KiB files in {ndirs} directories; "
              "one byte changed in the middle of the big file")  # fmt: skip
        report(results, sizes, limits, mem, notes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
