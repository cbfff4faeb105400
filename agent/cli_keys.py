"""Subcommands registered into `tofu-agent` by cli.py (placeholder until filled)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    """Add this module's subcommands to the `tofu-agent` parser."""
