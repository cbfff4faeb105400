"""`tofu-agent status`: ask the running agent, or show what the trust store knows (exit 3)."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from typing import Any

from agent.app import control
from agent.errors import TofuError
from agent.host.paths import Paths
from agent.identity.ids import format_fingerprint

EXIT_RUNNING = 0
EXIT_NOT_RUNNING = 3


def _ago(stamp: str | None) -> str:
    if not stamp:
        return "never"
    try:
        then = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return stamp
    secs = max(0, int(time.time() - then))
    if secs < 60:
        return "just now" if secs < 5 else f"{secs} s ago"
    if secs < 3600:
        return f"{secs // 60} min ago"
    if secs < 86400:
        return f"{secs // 3600} h ago"
    return dt.datetime.fromtimestamp(then).strftime("%Y-%m-%d %H:%M")


def _size(n: int) -> str:
    """Bytes for people: 512 B, 4.0 KiB, 1.5 GiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _bar(fraction: float, width: int = 20) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def render(st: dict[str, Any]) -> str:
    """The human form of a status object."""
    lines = []
    if st.get("running"):
        lines.append(f"tofu-agent is running (pid {st.get('pid')}), listening on {st.get('bind')}:{st.get('port')}")
    else:
        lines.append("tofu-agent is not running; showing what the trust store knows.")
    if st.get("device_id"):
        lines.append(f"This device: {st.get('name') or '(name not set)'}  {st['device_id']}")
        lines.append(f"Fingerprint: {format_fingerprint(st.get('fingerprint') or '')}")
    pw = st.get("pairing_window") if st.get("trust_policy") == "window" else None
    if isinstance(pw, dict) and pw.get("open") and isinstance(pw.get("until"), int | float):
        until = time.strftime("%H:%M", time.localtime(pw["until"]))
        lines.append(
            f"Pairing window OPEN until {until}: new devices are trusted on first use ({pw.get('reason', '')})"
        )
    elif isinstance(pw, dict):
        lines.append("Pairing window closed: new devices wait for approval (`tofu-agent window open` to pair)")
    for f in st.get("folders", []):
        need = f.get("need_bytes", 0)
        lines.append(
            f"Folder {f['id']}: {f['path']}  {f.get('state', '?')}  "
            f"{f.get('files', 0)} files, {_size(f.get('bytes', 0))}"
            + (f"  needs {f.get('need_files', 0)} files / {_size(need)}" if need or f.get("need_files") else "")
        )
        if f.get("error"):
            lines.append(f"  STOPPED: {f['error']}")
        if f.get("failed_files"):
            lines.append(f"  {f['failed_files']} files could not be written; trying again every minute (see the log)")
        for p in f.get("peers", []):
            if p.get("need_bytes") or p.get("need_files"):
                lines.append(
                    f"  {p.get('name') or p['device_id'][:8]}: {_bar(p.get('percent', 0) / 100)} "
                    f"{p.get('percent', 0):.0f}%  {p.get('need_files', 0)} files, {_size(p.get('need_bytes', 0))} to go"
                )
    peers = st.get("peers", [])
    anomalies = sum(len(p.get("anomalies", [])) for p in peers)
    connected = sum(1 for p in peers if p.get("connected"))
    lines.append(
        f"Peers: {len(peers)} known, {connected} connected"
        + (f"; {anomalies} ANOMALIES (see `tofu-agent anomalies`)" if anomalies else "")
    )
    for p in peers:
        state = "connected" if p.get("connected") else "offline"
        lines.append(
            f"  {p.get('name') or '?':<20} {p['device_id'][:12]}..  {p.get('trust', '?'):<11} {state:<9} "
            f"{p.get('address') or '-':<16} last seen {_ago(p.get('last_seen'))}"
        )
        if p.get("trust") == "key_changed" and p.get("pending_fingerprint"):
            lines.append(f"      KEY CHANGED: pinned {format_fingerprint(p.get('fingerprint') or '')}")
            lines.append(f"                   offered {format_fingerprint(p['pending_fingerprint'])}")
            lines.append(f"      accept the new key only if you know why: tofu-agent trust retrust {p['device_id']}")
        if p.get("trust") == "pending":
            lines.append(
                f"      asks to join, waiting for approval: tofu-agent trust accept {p['device_id']} "
                f"(or reject {p['device_id']})"
            )
        if p.get("refused_us"):
            lines.append(f"      {p['refused_us']}")
        for a in p.get("anomalies", []):
            lines.append(f"      ANOMALY {a.get('code')}: {a.get('summary', '')}".rstrip())
    return "\n".join(lines)


def offline_status(paths: Paths) -> dict[str, Any]:
    """What `status --json` says with no agent: running false, plus the trust store's devices."""
    from agent.cli.context import record_json
    from agent.identity.ids import is_device_id
    from agent.trust.store import TrustStore

    result: dict[str, Any] = {"running": False, "peers": []}
    try:
        device_id = paths.device_id_file.read_text("ascii").strip()
        if is_device_id(device_id):
            result["device_id"] = device_id
        result["name"] = (
            (paths.data_dir / "name").read_text("utf-8").strip() if (paths.data_dir / "name").exists() else None
        )
        if paths.cert_file.exists():
            from cryptography import x509

            from agent.identity.crypto import fingerprint_of_public_key

            key = x509.load_pem_x509_certificate(paths.cert_file.read_bytes()).public_key()
            result["fingerprint"] = fingerprint_of_public_key(key)  # type: ignore[arg-type]
    except (OSError, ValueError):
        pass
    if paths.trust_db.exists():
        with TrustStore(paths.trust_db) as store:
            result["peers"] = [{**record_json(r), "connected": False, "anomalies": []} for r in store.all()]
    return result


def dumps(st: dict[str, Any]) -> str:
    """`status --json` text."""
    return json.dumps(st, indent=2, sort_keys=True)


def show(paths: Paths, as_json: bool, watch: bool = False) -> int:
    """Print the agent's status; 0 if it runs, 3 if not. `watch` redraws every second."""
    while True:
        try:
            st: dict[str, Any] = control.request(paths.control_socket, "status", timeout=5.0)
            code = EXIT_RUNNING
        except control.AgentNotRunning:
            st, code = offline_status(paths), EXIT_NOT_RUNNING
        except TofuError:
            if not watch:
                raise
            st, code = offline_status(paths), EXIT_NOT_RUNNING
        text = dumps(st) if as_json else render(st)
        if not watch:
            print(text)
            return code
        sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
        sys.stdout.flush()
        time.sleep(1.0)
