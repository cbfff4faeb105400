"""Fixtures every test may use: a short private home directory and a way to run the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

CliResult = tuple[int, str, str]


class Cli(Protocol):
    """The `cli` fixture: run the CLI with a default `--home`."""

    def __call__(
        self, *args: str, home: Path | None = ..., env: dict[str, str] | None = ..., stdin: str | None = ...
    ) -> CliResult: ...


def make_home() -> Path:
    """A fresh, short temp directory (Unix socket paths must stay under 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix="ta-", dir="/tmp"))


@pytest.fixture
def homes() -> Iterator[list[Path]]:
    """Three fresh `--home` directories (tests take as many as they need), removed after the test."""
    made = [make_home() for _ in range(3)]
    yield made
    for h in made:
        shutil.rmtree(h, ignore_errors=True)


@pytest.fixture
def home() -> Iterator[Path]:
    """A fresh `--home` directory, removed after the test."""
    path = make_home()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_cli(
    *args: str,
    home: Path | None,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 30.0,
) -> CliResult:
    """Run `python -m agent [--home HOME] ARGS...`; returns (exit code, stdout, stderr).

    The XDG variables point into a throw-away directory, so a command that ignored `--home` could
    never touch the real home of whoever runs the tests.
    """
    scratch = Path(tempfile.mkdtemp(prefix="ta-xdg-", dir="/tmp"))
    try:
        full_env = {k: v for k, v in os.environ.items() if k != "TOFU_AGENT_HOME"}
        full_env.update(
            {
                "HOME": str(scratch),
                "XDG_CONFIG_HOME": str(scratch / "config"),
                "XDG_DATA_HOME": str(scratch / "data"),
                "XDG_RUNTIME_DIR": str(scratch / "run"),
                "PYTHONDONTWRITEBYTECODE": "1",
            }
        )
        full_env.update(env or {})
        argv = [sys.executable, "-m", "agent"]
        if home is not None:
            argv += ["--home", str(home)]
        proc = subprocess.run(
            [*argv, *args],
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            check=False,
        )
        return proc.returncode, proc.stdout, proc.stderr
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture
def cli(home: Path) -> Cli:
    """`cli("peers", "--json")` runs the CLI with `--home` set to the `home` fixture."""

    default_home = home

    def call(
        *args: str,
        home: Path | None = default_home,
        env: dict[str, str] | None = None,
        stdin: str | None = None,
    ) -> CliResult:
        return run_cli(*args, home=home, env=env, stdin=stdin)

    return call
