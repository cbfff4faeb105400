"""Logging to stderr: one line an event, with levels; syslog priority prefixes under systemd."""

from __future__ import annotations

import logging
import os
import sys

# sd-daemon(3): "<N>" at the start of a line sets the journal priority.
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    """`<prio>logger: message` with no timestamp (the journal adds its own)."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        # One line an event: a multi-line message keeps its priority on every line.
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


def setup(level: int = logging.INFO) -> None:
    """Send the `agent` loggers to stderr in the format that suits where we run."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
        )
    root = logging.getLogger("agent")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
