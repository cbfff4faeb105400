"""`tofu-agent service install|uninstall`: put the systemd user unit in place and enable it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

from agent.errors import UserError
from agent.paths import Paths

UNIT_NAME = "tofu-agent.service"


def unit_text(exec_start: str) -> str:
    """The unit file with ExecStart pointing at this installation."""
    template = _template()
    return template.replace("@EXEC@", exec_start)


def _template() -> str:
    here = Path(__file__).resolve().parent.parent / "systemd" / UNIT_NAME
    if here.exists():
        return here.read_text("utf-8")
    return resources.files("agent").joinpath(UNIT_NAME).read_text("utf-8")


def user_unit_dir() -> Path:
    """~/.config/systemd/user (honouring XDG_CONFIG_HOME)."""
    import os

    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user"


def exec_start(paths: Paths) -> str:
    """The command systemd runs: this Python, this package, and --home if one is in use."""
    cmd = f"{sys.executable} -m agent"
    if paths.home is not None:
        cmd += f" --home {paths.home}"
    return cmd


def _systemctl(*args: str) -> None:
    if shutil.which("systemctl") is None:
        raise UserError("systemctl is not available on this machine")
    result = subprocess.run(["systemctl", "--user", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise UserError(f"systemctl --user {' '.join(args)} failed: {result.stderr.strip()}")


def install(paths: Paths) -> str:
    """Write the unit, reload systemd and enable the service now."""
    target = user_unit_dir() / UNIT_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(unit_text(exec_start(paths)), "utf-8")
    _systemctl("daemon-reload")
    _systemctl("enable", "--now", UNIT_NAME)
    return f"installed {target} and started it; see `systemctl --user status tofu-agent`"


def uninstall() -> str:
    """Stop and disable the service and remove the unit."""
    target = user_unit_dir() / UNIT_NAME
    if target.exists():
        _systemctl("disable", "--now", UNIT_NAME)
        target.unlink()
        _systemctl("daemon-reload")
        return f"removed {target}"
    return "the service was not installed"
