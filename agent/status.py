"""`tofu-agent status`: ask the running agent, or show what the trust store knows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent import control
from agent.paths import Paths


def show(paths: Paths, as_json: bool, watch: bool = False) -> int:
    """Print the agent's status; 0 if it runs, 3 if not."""
    try:
        result: dict[str, Any] = control.request(paths.control_socket, "status", timeout=5.0)
    except control.AgentNotRunning:
        return _not_running(paths, as_json)
    print(json.dumps(result, indent=2) if as_json else str(result))
    return 0


def _not_running(paths: Paths, as_json: bool) -> int:
    print(json.dumps({"running": False}) if as_json else "tofu-agent is not running")
    return 3


__all__ = ["Path", "show"]
