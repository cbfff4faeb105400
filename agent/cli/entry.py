"""The `tofu-agent` command's entry point: a plain `status` asks the running agent without loading
the rest of the CLI (the trust store, cryptography, config parsing); everything else, and a
`status` that finds no agent, goes to `agent.cli.main`.

`status` is what a person, a panel applet or a script runs most, also while the agent works hard
on both cores; importing the whole CLI first cost more than the answer itself. The output and the
exit code are the same either way (`agent.cli.status` renders both).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def status_home(argv: Sequence[str]) -> tuple[str | None, bool] | None:
    """(home, json) if `argv` is exactly a plain `status` (with `--json`, `--home H`), else None."""
    home: str | None = None
    as_json = seen = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "status" and not seen:
            seen = True
        elif arg == "--json":
            as_json = True
        elif arg == "--home" and i + 1 < len(argv):
            home = argv[i + 1]
            i += 1
        elif arg.startswith("--home="):
            home = arg.partition("=")[2]
        else:
            return None  # anything else (--watch, -v, --help, another command): the full CLI
        i += 1
    if not seen or home == "":
        return None  # an empty --home is refused by the full CLI, with its message
    return home, as_json


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tofu-agent` command; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    plain = status_home(args)
    if plain is not None:
        from agent.app import control
        from agent.cli import status
        from agent.errors import TofuError
        from agent.host.paths import resolve_paths

        try:
            st = control.request(resolve_paths(plain[0]).control_socket, "status", timeout=5.0)
        except TofuError:
            pass  # not running, or an error the full CLI words for a person: it asks again
        else:
            print(status.dumps(st) if plain[1] else status.render(st))
            return status.EXIT_RUNNING
    from agent.cli.main import main as full_main

    return full_main(args)
