"""Hand freed heap pages back to the OS after a burst of work (glibc `malloc_trim`; a no-op elsewhere).

Why: CPython frees a decoded index or a scan's records into malloc, and glibc keeps those pages
in the process (in the main heap and in each worker thread's arena) until something asks for
them back. After a peer's 10,000-record index the agent would otherwise sit tens of MB above its
working set for good. `malloc_trim(0)` returns every whole free page (MADV_DONTNEED), which costs
a few milliseconds per call, so callers use it after bursts, not per message.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Callable

TRIM_AFTER_BYTES = 4 * 1024 * 1024  # callers trim after handling at least this much decoded input
GC_YOUNG_THRESHOLD = 7000  # allocations between collections of the young generation (Python's: 700)


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


def settle_gc() -> None:
    """Take what start-up made out of the cycle collector's view and collect young objects less often.

    Why: syncing many small files allocates records, messages and jobs by the hundred thousand,
    and every full collection walked all the modules, classes and functions loaded at start-up
    as well: the collector was about a seventh of the agent's Python time for 10,000 files.
    Those objects live as long as the process, so `gc.freeze()` parks them in the permanent
    generation (cycles among them are never collected, and they have none that matter). The young
    generation's threshold goes from 700 to GC_YOUNG_THRESHOLD allocations: cycles still go,
    in fewer, larger passes.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
