"""The time a sync engine is given: a monotonic clock for timers, the wall clock for records (pure).

Timers (the periodic rescan, the stall of a peer that leaves requests unanswered, retries, the
recheck of files that were changing) compare `mono`, which neither steps when the wall clock is
set nor, on Linux, advances while the machine is suspended. What is recorded or shown (version
floors `max(counter + 1, unix_time)`, the time of a conflict copy) uses `wall`. The shell reads
both once per batch (`time.monotonic()`, `time.time()`); the engine never reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Now:
    """One instant on both clocks: `mono` (seconds, any origin) for timers, `wall` (Unix time) for records."""

    mono: float
    wall: float

    def later(self, seconds: float) -> Now:
        """`seconds` later on both clocks (as if the machine ran that long with no clock step)."""
        return Now(self.mono + seconds, self.wall + seconds)
