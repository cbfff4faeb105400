"""A home for an agent under test: a short private directory, with a `config.toml` if asked."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path

ConfigValue = float | int | str | bool

# Short keepalives, so an event loop stalled for more than ~3 s shows up as a peer dropped, and no
# folder: what the hostile tests and the benches that attack or load an agent start from.
QUICK = "keepalive_idle = 1.5\nkeepalive_timeout = 1.5\nfolder = []\n"


def new_home(prefix: str = "ta-", config: Mapping[str, ConfigValue] | None = None) -> Path:
    """A fresh directory in /tmp (Unix socket paths must stay under 108 bytes), with `config` written if given."""
    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    if config:
        write_config(home, "".join(f"{k} = {_toml(v)}\n" for k, v in config.items()))
    return home


def write_config(home: Path, text: str) -> Path:
    """Write HOME/config/config.toml; returns `home`."""
    (home / "config").mkdir(mode=0o700, exist_ok=True)
    (home / "config" / "config.toml").write_text(text)
    return home


def configure(home: Path, extra: str = "") -> Path:
    """The `QUICK` config plus `extra` lines in `home`; returns `home`."""
    return write_config(home, QUICK + extra)


def _toml(value: ConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)
