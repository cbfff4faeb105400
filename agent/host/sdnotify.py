"""The systemd notify protocol (sd_notify(3)): READY=1, STOPPING=1, WATCHDOG=1, STATUS=..."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends datagrams to $NOTIFY_SOCKET; does nothing when not run by systemd."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address: str | None = None
        if address:
            # A leading @ names a socket in the abstract namespace.
            self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Half the watchdog timeout systemd asked for, in seconds, or None."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return max(int(usec) / 2e6, 0.5)
        except ValueError:
            return None

    def notify(self, *fields: str) -> None:
        """Send `fields` (e.g. "READY=1") as one message; errors are logged, never raised."""
        if self._address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode("utf-8"), self._address)
        except OSError as exc:
            log.debug("sd_notify failed: %s", exc)

    def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
