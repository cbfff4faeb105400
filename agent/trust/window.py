"""The pairing window: while it is open, a new device is trusted on first use; otherwise it waits.

Theory of operation. Under the `window` trust policy (the default) a device seen for the first
time is pinned as `tofu` only while this machine's pairing window is open, and as `pending` (its
key remembered, no data) otherwise, until a person accepts it. The window opens by itself for
FRESH_INSTALL_SECONDS when an agent starts and trusts no device yet (install on every home machine
within that time and they pair with no command), and on demand for up to MAX_SECONDS. As
Bluetooth and AirDrop's "everyone for 10 minutes": consent is the act of opening it.

Pure: the deadline runs on the monotonic clock passed in as `now`; the wall-clock end is kept only
to show people when it closes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from agent.errors import UserError
from agent.trust.model import DeviceRecord, TrustLevel

FRESH_INSTALL_SECONDS = 15 * 60.0
DEFAULT_SECONDS = 10 * 60.0
MAX_SECONDS = 60 * 60.0
MAX_PENDING = 64  # pending requests kept; a flood of strangers cannot grow the store past it
PENDING_MAX_AGE = 30 * 24 * 3600.0  # seconds a pending request is kept without an answer

FRESH_INSTALL = "fresh install"
OPENED = "opened by a person"


@dataclass(frozen=True, slots=True)
class PairingWindow:
    """Open until `closes_at` (monotonic), or closed (`closes_at` None)."""

    closes_at: float | None = None
    closes_at_wall: float | None = None  # the same moment by the wall clock, for people
    reason: str = ""

    def is_open(self, now: float) -> bool:
        """Whether a new device seen at `now` is trusted on first use."""
        return self.closes_at is not None and now < self.closes_at

    def remaining(self, now: float) -> float:
        """Seconds until it closes (0 when closed)."""
        return max(0.0, self.closes_at - now) if self.closes_at is not None else 0.0

    def view(self, now: float) -> dict[str, object]:
        """What `status` shows: open or not, until when (Unix seconds), why."""
        if not self.is_open(now):
            return {"open": False, "until": None, "reason": ""}
        return {"open": True, "until": self.closes_at_wall, "reason": self.reason}


def open_window(now: float, wall: float, seconds: float = DEFAULT_SECONDS, reason: str = OPENED) -> PairingWindow:
    """A window open for `seconds` from `now`.

    :raises UserError: `seconds` is not between 1 second and an hour.
    """
    if not 1.0 <= seconds <= MAX_SECONDS:
        raise UserError(f"a pairing window lasts from 1 second to {MAX_SECONDS / 60:.0f} minutes")
    return PairingWindow(now + seconds, wall + seconds, reason)


def close_window() -> PairingWindow:
    """A closed window."""
    return PairingWindow()


def at_start(records: Iterable[DeviceRecord], now: float, wall: float) -> PairingWindow:
    """The window an agent starts with: open for a fresh install (no device it may sync with)."""
    if any(r.trust.may_sync for r in records):
        return close_window()
    return open_window(now, wall, FRESH_INSTALL_SECONDS, FRESH_INSTALL)


def parse_duration(text: str) -> float:
    """Seconds in `10m`, `1h`, `90s` or a bare number of minutes.

    :raises UserError: not a duration, or outside what `open_window` accepts.
    """
    t = text.strip().lower()
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    scale = units.get(t[-1:], None)
    number = t[:-1] if scale is not None else t
    try:
        value = float(number) * (scale if scale is not None else 60.0)
    except ValueError:
        raise UserError(f"not a duration: {text!r} (try 10m, 1h or 90s)") from None
    if not 1.0 <= value <= MAX_SECONDS:  # also refuses nan
        raise UserError(f"a pairing window lasts from 1 second to {MAX_SECONDS / 60:.0f} minutes")
    return value


def pending_to_drop(records: Iterable[DeviceRecord], wall: float) -> list[str]:
    """Pending requests to forget: older than PENDING_MAX_AGE, then the oldest past MAX_PENDING."""
    pending = sorted((r for r in records if r.trust is TrustLevel.PENDING), key=lambda r: (r.last_seen, r.device_id))
    expired = [r.device_id for r in pending if wall - r.last_seen > PENDING_MAX_AGE]
    kept = [r for r in pending if r.device_id not in set(expired)]
    over = [r.device_id for r in kept[: max(0, len(kept) - MAX_PENDING)]]
    return expired + over
