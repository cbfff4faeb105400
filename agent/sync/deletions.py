"""Remote deletions of one folder, applied when no pull runs, deepest first.

Theory of operation. The index exchange adds the names a peer deleted to `pending`; the engine
calls `apply()` only when no pull runs or waits, so a renamed file can still copy its blocks from
the old name. A file or directory goes only if it still matches our index record (a change made
here since our last scan is the scan's to decide: a conflict that keeps the edit). A directory that
still holds files is kept and remembered (`kept_dirs`): a large tree's deletion records arrive over
several messages, the directory's own (lowest sequence) first, so it is decided again once
deletions inside it were applied. Each deletion's record waits with the committer's, and the
directory it changed is synced to disk before the index records it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping

from agent.sync import puller
from agent.sync.clock import Now
from agent.sync.committer import Committer
from agent.sync.exchange import Need
from agent.sync.fs import FolderFS
from agent.sync.index import FolderIndex
from agent.sync.model import FileType
from agent.sync.names import parent_names
from agent.sync.planner import Action, decide

log = logging.getLogger(__name__)
MAX_DEPTH_PASSES = 8  # deletion passes per call when emptied directories become deletable in turn
MAX_KEPT_DIRS = 10_000  # directories remembered for a second look; past that the full rescan decides


class Deletions:
    """The pending remote deletions of one folder and the directories kept for now."""

    def __init__(
        self, fs: FolderFS, index: FolderIndex, committer: Committer, *,
        need: dict[str, Need], queue: deque[str], jobs: Mapping[str, puller.Job],
        reconsider: Callable[[list[str]], None], retry_later: Callable[[str, Now], None],
    ) -> None:  # fmt: skip
        self.fs, self.index, self.committer = fs, index, committer
        self.need, self.queue, self.jobs = need, queue, jobs  # the engine's
        self._reconsider = reconsider  # decides names afresh against the peers' records
        self._retry_later = retry_later  # a deletion that failed (a read-only directory, no version kept) waits
        self.pending: set[str] = set()  # names a peer deleted, not applied yet
        self.kept_dirs: set[str] = set()  # directories a peer deleted that still held files here

    def apply(self, now: Now, under: str | None = None) -> None:
        """Apply the pending deletions (only those inside directory `under`, if given); `now.wall`
        stamps the versions kept."""
        for _ in range(MAX_DEPTH_PASSES):
            deleted = self._apply_once(now, under)
            # A directory's deletion that found it still full is tried again once deletions inside
            # it were applied: a large tree's records come over several messages, the directory's
            # (lowest sequence) first, so its files may only have gone in this later pass.
            ready = self.kept_dirs & {a for n in deleted for a in parent_names(n)}
            if not ready:
                return
            self.kept_dirs -= ready
            self._reconsider(sorted(ready))
            if under is not None:
                return  # the caller goes on with its own name; the rest waits for the next pump

    def _apply_once(self, now: Now, under: str | None) -> list[str]:
        """One pass of `apply`; the names it deleted from the disk."""
        deleted: list[str] = []
        names = set(self.pending) if under is None else {n for n in self.pending if n.startswith(under + "/")}
        self.pending -= names  # (in place: the index exchange adds to this set)
        # deepest first, so a directory's files go before the directory itself
        for name in sorted(names, key=lambda n: (-n.count("/"), n)):
            n = self.need.get(name)
            if n is None:
                continue
            if not n.target.deleted:
                # a newer live version took this name's place: it is pulled, not deleted
                if name not in self.jobs and name not in self.queue:
                    self.queue.append(name)
                continue
            del self.need[name]
            local = self.index.local(name)
            d = decide(local, n.target)
            if d.target is None or d.action is Action.NONE:
                continue
            if d.action is Action.DELETE and local is not None:
                if not puller.unchanged(self.fs.lstat(name), local):
                    continue  # changed here since our last scan: the scan makes it a conflict
                try:
                    if local.type is FileType.DIR:
                        # temp files of pulls that this deletion cancelled would keep it
                        self.fs.remove_temps(name, keep=self.committer.temps_in_use(name))
                        if not self.fs.rmdir(name):
                            # holds files we keep (ignored or new), or files whose deletions are
                            # still on their way: keep it, and look again if some of them go
                            if len(self.kept_dirs) < MAX_KEPT_DIRS:
                                self.kept_dirs.add(name)
                            continue
                    else:
                        self._delete_file(name, d.target.modified_by, now.wall)
                except OSError as exc:
                    log.warning("cannot delete %r (trying again later): %s", name, exc)
                    self._retry_later(name, now)
                    continue
                self.committer.dirty_dirs.add(name.rpartition("/")[0])
                deleted.append(name)
            self.committer.records.append(d.target)
        return deleted

    def _delete_file(self, name: str, by: str, wall: float) -> None:
        """Move file `name` into the kept versions (or unlink it, when the folder keeps none)."""
        if self.committer.versions.keep(name, by, wall, replaced=False) is None:
            self.fs.unlink(name)

    def clear(self) -> None:
        """Forget everything (the folder stopped)."""
        self.pending.clear()
        self.kept_dirs.clear()
