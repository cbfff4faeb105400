"""Fixtures every test may use: short private home directories and a way to run the CLI.

The helpers behind them live in `testkit/` (shared with `bench/`); these are thin wrappers.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from testkit.agents import cli as run_cli
from testkit.homes import new_home

CliResult = tuple[int, str, str]


class Cli(Protocol):
    """The `cli` fixture: run the CLI with a default `--home`."""

    def __call__(
        self, *args: str, home: Path | None = ..., env: dict[str, str] | None = ..., stdin: str | None = ...
    ) -> CliResult: ...


@pytest.fixture
def homes() -> Iterator[list[Path]]:
    """Three fresh `--home` directories (tests take as many as they need), removed after the test."""
    made = [new_home() for _ in range(3)]
    yield made
    for h in made:
        shutil.rmtree(h, ignore_errors=True)


@pytest.fixture
def home() -> Iterator[Path]:
    """A fresh `--home` directory, removed after the test."""
    path = new_home()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cli(home: Path) -> Cli:
    """`cli("peers", "--json")` runs the CLI with `--home` set to the `home` fixture; (exit code, stdout, stderr)."""

    default_home = home

    def call(
        *args: str,
        home: Path | None = default_home,
        env: dict[str, str] | None = None,
        stdin: str | None = None,
    ) -> CliResult:
        r = run_cli(home, *args, env=env, stdin=stdin)
        return r.returncode, r.stdout, r.stderr

    return call
