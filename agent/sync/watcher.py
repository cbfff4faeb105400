"""Watching a folder for changes (anyio, watchfiles): changed names into the folder's inputs.

`watchfiles` reports changed paths, debounced; our own temp files are filtered out. Each name goes
into `_Folder.changed` and wakes the folder's worker; an event on the root itself, or more than
MAX_EVENT_NAMES names at once, becomes one full scan (`_Folder.rescan`). A watch that ends (the
root went away) or fails is set up again; once in place again it asks for a full scan of what
nobody watched meanwhile. The periodic rescan (the engine's timer) stays the safety net.

What `watch` reads and sets of the folder: `config.path`, `started` and `halted` (set by the
service's folder task), `watch_scope` (cancelled by that task when a stopped folder's root is
back), `watching` (set here once the watch is in place), `changed`, `rescan` and `wake`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import anyio
import anyio.to_thread

from agent.sync.names import TEMP_PREFIX, is_valid_name
from agent.sync.state import _Folder

log = logging.getLogger(__name__)

WATCH_DEBOUNCE_MS = 1600  # longest a burst of events is grouped
WATCH_STEP_MS = 50  # quiet time that ends a group: a single change is seen within ~50 ms
WATCH_RETRY = 10.0  # seconds before watching a folder again whose root went away
MAX_EVENT_NAMES = 20_000  # changed names queued per folder; more become one full scan (the engine
# itself rescans everything past 256 names that are not its own writes)


async def watch(f: _Folder, rescan_interval: float) -> None:
    """Watch `f`'s root until cancelled; a watch that failed is tried again after `rescan_interval`."""
    import watchfiles  # a Rust extension: loaded only when there is a folder to watch

    root = str(f.config.path.absolute())
    warned = False
    while True:
        # cancelled (from the service's `_run_folder`) when a stopped folder's root is back: watch
        # afresh at once
        with anyio.CancelScope() as f.watch_scope:
            failure: Exception | None = None
            present = await anyio.to_thread.run_sync(os.path.isdir, root)
            if present:
                try:
                    await _watch_once(f, watchfiles, root)
                except Exception as exc:  # no inotify watches left, the folder vanished, ...
                    failure = exc
                present = await anyio.to_thread.run_sync(os.path.isdir, root)
            if failure is not None and present and not warned:  # a missing root is the engine's to report
                log.warning("not watching %s for changes (%s); periodic rescans still run", root, failure)
                warned = True
            if f.watching.is_set():
                f.watching = anyio.Event()
            # The watch ended (its root went away) or failed: try again, on the root as it is
            # then; at once when a new folder's root is made, soon while the folder is stopped,
            # rarely if watching itself fails (a big tree costs).
            if not present and not f.started.is_set():
                with anyio.move_on_after(WATCH_RETRY):
                    await f.started.wait()
                continue
            await anyio.sleep(WATCH_RETRY if f.halted or not present else rescan_interval)


async def _watch_once(f: _Folder, watchfiles: Any, root: str) -> None:
    async for changes in watchfiles.awatch(
        root, watch_filter=None, debounce=WATCH_DEBOUNCE_MS, step=WATCH_STEP_MS, recursive=True,
        ignore_permission_denied=True,
        # The watcher thread notices cancellation only between waits: keep them short so
        # SIGTERM stops the agent well inside its 5 s. Each wait ends in a yield (empty on a
        # timeout), and the first one says the watch is in place.
        rust_timeout=500, yield_on_timeout=True,
    ):  # fmt: skip
        if not f.watching.is_set():
            f.watching.set()
            if f.started.is_set():
                # watching again (the root is back, the watch failed) or for the first time
                # after a new folder's start: what changed while nobody watched is found by
                # a full scan
                f.rescan = True
                f.wake.set()
        for _, path in changes:
            name = event_name(root, path)
            if name is None:
                continue
            if name == "":
                f.rescan = True
            else:
                f.changed.add(name)
        if len(f.changed) > MAX_EVENT_NAMES:
            f.changed.clear()
            f.rescan = True
        if f.changed or f.rescan:
            f.wake.set()


def event_name(root: str, path: str) -> str | None:
    """The folder-relative name to rescan for an event at `path` ('' for all, None to ignore)."""
    if path.startswith(root) and path[len(root) : len(root) + 1] == os.sep and ".." not in path:
        rel = path[len(root) + 1 :]  # the common case, without relpath's normalising
    else:
        rel = os.path.relpath(path, root)
    if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
        return "" if rel == "." else None
    name = rel.replace(os.sep, "/")
    if os.path.basename(name).startswith(TEMP_PREFIX):
        return None  # our own partial files
    while name and not is_valid_name(name):
        name = name.rpartition("/")[0]  # rescanning the parent skips the invalid name with a warning
    return name
