"""The one poll loop: wait until a condition holds, or fail naming what did not happen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

POLL = 0.05


class WaitTimeout(AssertionError):
    """The condition did not hold within the timeout (an AssertionError, so pytest reports it as a failure)."""


def wait_for(
    predicate: Callable[[], T | None], timeout: float = 15.0, what: str = "condition", *, poll: float = POLL
) -> T:
    """Call `predicate` every `poll` s until it returns something truthy, and return that.

    It is called at least once, and once more at the deadline; after `timeout` s `WaitTimeout` names
    `what` and the last value it returned.
    """
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")
        time.sleep(poll)


def seconds_until(predicate: Callable[[], object], timeout: float, *, poll: float = POLL) -> float | None:
    """Seconds until `predicate()` is truthy (polled as by `wait_for`), or None if it is not within `timeout`."""
    t0 = time.monotonic()
    try:
        wait_for(predicate, timeout, poll=poll)
    except WaitTimeout:
        return None
    return time.monotonic() - t0
