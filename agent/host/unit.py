"""`tofu-agent service install|uninstall`: put the systemd user unit in place and enable it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

from agent.errors import UserError
from agent.host.paths import Paths

UNIT_NAME = "tofu-agent.service"


def unit_text(exec_start: str) -> str:
    """The unit file with ExecStart pointing at this installation."""
    template = _template()
    return template.replace("@EXEC@", exec_start)


def _template() -> str:
    # Package data (agent/data/), so a wheel install has it as well as a source checkout.
    return resources.files("agent").joinpath("data", UNIT_NAME).read_text("utf-8")


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
        reason = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        raise UserError(f"systemctl --user {' '.join(args)} failed: {reason}")


def install(paths: Paths) -> str:
    """Write the unit, reload systemd and enable the service now.

    :raises UserError: systemctl is missing or fails (no user manager); the unit is written anyway.
    """
    target = user_unit_dir() / UNIT_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(unit_text(exec_start(paths)), "utf-8")
    try:
        _systemctl("daemon-reload")
        _systemctl("enable", "--now", UNIT_NAME)
    except UserError as exc:
        raise UserError(
            f"wrote {target} but could not enable and start it: {exc}; once a user manager runs, "
            f"`systemctl --user daemon-reload && systemctl --user enable --now {UNIT_NAME}`"
        ) from exc
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
