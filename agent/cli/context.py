"""What every command shares: the context (paths, config, output mode), exit codes, JSON shapes."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent import config
from agent.app.report import rfc3339
from agent.host.paths import Paths
from agent.trust.model import DeviceRecord
from agent.trust.store import TrustStore

if TYPE_CHECKING:
    from agent.identity.keys import Identity

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_NOT_RUNNING = 3


@dataclass(frozen=True, slots=True)
class Ctx:
    """What every command needs: where things live, the config, and how to print."""

    paths: Paths
    json: bool
    args: argparse.Namespace

    def config(self) -> config.Config:
        return config.load(self.paths.config_file, self.paths.default_folder)

    def store(self) -> TrustStore:
        self.paths.ensure()
        return TrustStore(self.paths.trust_db, self.config().trust_policy)

    def identity(self) -> Identity:
        from agent.identity import keys as identity

        return identity.load_or_create(self.paths, self.config().name or _stored_name(self.paths), _utcnow())

    def out(self, data: Any, text: str) -> None:
        print(json.dumps(data, indent=2, sort_keys=True) if self.json else text)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _stored_name(paths: Paths) -> str | None:
    try:
        return (paths.data_dir / "name").read_text("utf-8").strip() or None
    except OSError:
        return None


def record_json(r: DeviceRecord) -> dict[str, Any]:
    """A device record as the JSON object every command prints."""
    return {
        "device_id": r.device_id,
        "name": r.name,
        "trust": r.trust.value,
        "fingerprint": r.fingerprint,
        "pending_fingerprint": r.pending_fingerprint,
        "first_seen": rfc3339(r.first_seen),
        "last_seen": rfc3339(r.last_seen),
        "sync_count": r.sync_count,
        "addresses": list(r.addresses),
        "notes": r.notes,
        "introducer": r.introducer,
    }


def port_arg(text: str) -> int:
    """argparse type for a TCP port (0 = any free port)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range")
    return value
