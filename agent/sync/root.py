"""The folder root guard: a folder whose root or marker is missing stops, and looks for it again.

Theory of operation. Before the engine scans or writes it asks `ok(now)`: the root must be there
with its `.tofu` marker. If it is not, the folder stops (`halted` says why) and the engine's
`on_halt` drops all work in progress; a folder that recorded files and then finds its root gone
is most likely on a disk that is not mounted, and what looks deleted must not be sent as
deletions to every peer. A stopped folder looks again every `ROOT_RECHECK` seconds
(`next_check`, from the engine's timer) with `back(now)`; when the root is back, the engine
starts the folder afresh (a full scan finds what changed meanwhile).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.sync.clock import Now
from agent.sync.fs import FolderFS
from agent.sync.names import MARKER

log = logging.getLogger(__name__)
ROOT_RECHECK = 10.0  # a folder stopped for a missing root or marker looks for it again this often


class FolderRoot:
    """Whether a folder's root and marker are there, and why the folder is stopped if not."""

    def __init__(self, folder_id: str, fs: FolderFS, *, on_halt: Callable[[], None]) -> None:
        self.folder_id = folder_id
        self.fs = fs
        self._on_halt = on_halt  # the engine drops all work in progress (temp files stay)
        self.halted: str | None = None  # why the folder is stopped: its root or marker is missing
        self.next_check = 0.0  # when a stopped folder looks for its root again (monotonic)

    def make(self) -> None:
        """Create the root and its marker (for a folder that recorded nothing yet); a failure is
        logged, and `ok` then stops the folder."""
        try:
            self.fs.make_marker()
        except OSError as exc:
            log.error("folder %r: cannot create %s: %s", self.folder_id, self.fs.root / MARKER, exc)

    def ok(self, now: Now) -> bool:
        """True if we may scan and write: the root is there with its marker. Otherwise stop."""
        if self.fs.refresh():
            return self.halted is None  # a stopped folder resumes from `back` only
        if self.halted is None:
            self._halt()
        self.next_check = now.mono + ROOT_RECHECK
        return False

    def _halt(self) -> None:
        """Stop all work: the folder root or its marker is missing (deleted, moved, unmounted)."""
        root = self.fs.root
        self.halted = (
            f"{root} or its {MARKER} directory is missing (folder deleted, moved, or its disk not "
            f"mounted?): nothing is scanned, written or deleted until it is back; to sync the "
            f"directory as it is now, create the directory {root / MARKER}"
        )
        log.error("folder %r stopped: %s", self.folder_id, self.halted)
        self._on_halt()

    def back(self, now: Now) -> bool:
        """Look for the root of a stopped folder; True (no longer `halted`) if it is back: the
        engine then starts the folder again."""
        if not self.fs.refresh():
            self.next_check = now.mono + ROOT_RECHECK
            return False
        log.warning("folder %r: %s is back; syncing it again", self.folder_id, self.fs.root)
        self.halted = None
        return True
