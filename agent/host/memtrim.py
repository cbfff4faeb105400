"""Hand freed heap pages back to the OS after a burst of work (glibc `malloc_trim`; a no-op elsewhere).

Why: CPython frees a decoded index or a scan's records into malloc, and glibc keeps those pages
in the process (in the main heap and in each worker thread's arena) until something asks for
them back. After a peer's 10,000-record index the agent would otherwise sit tens of MB above its
working set for good. `malloc_trim(0)` returns every whole free page (MADV_DONTNEED), which costs
a few milliseconds per call, so callers use it after bursts, not per message.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

TRIM_AFTER_BYTES = 4 * 1024 * 1024  # callers trim after handling at least this much decoded input


def _load() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim  # absent on musl: then there is nothing to call
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_malloc_trim = _load()


def trim() -> bool:
    """Return free heap pages to the OS; True if the C library did (and released anything)."""
    return bool(_malloc_trim(0)) if _malloc_trim is not None else False
