"""Send-only and receive-only folders: what the engine holds back, and override / revert (disk).

Theory of operation. A folder is `sendreceive` (the default), `sendonly` or `receiveonly`, as in
Syncthing.
  - Send-only: a peer's change is never applied. The index exchange puts each name a peer has a
    version of that we would apply into `differs` instead of `need`; `status` shows how many.
    `override` gives each of them a record of ours whose version dominates every peer's (our
    content, or a deletion where we have none), so our state wins everywhere.
  - Receive-only: a local change is never announced. A scan's records of changed names go into
    `local_changes` instead of the index; the index keeps the last synced state, which is what
    peers see. A peer's change to a locally changed name is applied, the local file first kept
    as a version. `revert` keeps every local change as a version, forgets the index record of
    its name without announcing that, and asks the peers' records again: their content comes back.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Callable
from enum import Enum

from agent.sync.fs import FolderFS
from agent.sync.index import FolderIndex
from agent.sync.model import FileInfo, FileType
from agent.sync.vectors import Vector
from agent.sync.versions import Versions

log = logging.getLogger(__name__)
MAX_TRACKED = 100_000  # names remembered as differing or locally changed; the rest show in the count only


class FolderType(Enum):
    """Which way changes flow for a folder."""

    SENDRECEIVE = "sendreceive"
    SENDONLY = "sendonly"
    RECEIVEONLY = "receiveonly"


class TypeRules:
    """The held-back names of one folder and the person's override / revert."""

    def __init__(self, kind: FolderType, fs: FolderFS, index: FolderIndex, versions: Versions, device_id: str) -> None:
        self.kind = kind
        self.fs, self.index, self.versions, self.device_id = fs, index, versions, device_id
        self.differs: set[str] = set()  # send-only: names a peer changed that we do not apply
        self.local_changes: dict[str, FileInfo] = {}  # receive-only: our changes, not announced

    @property
    def send_only(self) -> bool:
        return self.kind is FolderType.SENDONLY

    @property
    def receive_only(self) -> bool:
        return self.kind is FolderType.RECEIVEONLY

    def hold_back(self, changed: list[FileInfo]) -> list[FileInfo]:
        """What of a scan's `changed` records goes into the index (receive-only: only names whose
        disk is back to the synced state; the rest is remembered as local changes)."""
        if not self.receive_only:
            return changed
        synced = self.index.local_many(f.name for f in changed)
        for f in changed:
            s = synced.get(f.name)
            if s is not None and s.deleted == f.deleted and (f.deleted or s.same_content(f)):
                self.local_changes.pop(f.name, None)  # changed back to what the peers have
            elif len(self.local_changes) < MAX_TRACKED or f.name in self.local_changes:
                if s is None and f.deleted:
                    self.local_changes.pop(f.name, None)  # a local file that came and went
                else:
                    self.local_changes[f.name] = f
        return []

    def drop_local_change(self, name: str, wall: float) -> bool:
        """Receive-only, before a peer's change to `name` is applied: keep our local file as a
        version (or, with versions off, let it go). False if what is there is not a plain file."""
        st = self.fs.lstat(name)
        if st is not None and not stat.S_ISREG(st.st_mode):
            return False
        if st is not None and self.versions.keep(name, self.device_id, wall, replaced=False) is None:
            self.fs.unlink(name)
        self.local_changes.pop(name, None)
        return True

    def override(self, wall: float, peer_records: Callable[[str], list[FileInfo]]) -> list[FileInfo]:
        """Send-only: records of ours that dominate every peer's for the names that differ (our
        content, or a deletion where we have none); the caller records them. `peer_records(name)`:
        the peers' records of that name."""
        out: list[FileInfo] = []
        for name in sorted(self.differs):
            theirs = peer_records(name)
            if not theirs:
                continue
            ours = self.index.local(name)
            version = ours.version if ours is not None else Vector()
            for r in theirs:
                version = version.merge(r.version)
            version = version.bump(self.device_id, int(wall))
            if ours is None:
                t = theirs[0]
                ours = FileInfo(name, t.type, 0, 0, False, True, version, 0, 0, b"", self.device_id)
            out.append(ours.replace(version=version, modified_by=self.device_id))
        self.differs.clear()
        return out

    def revert(self, wall: float) -> list[str]:
        """Receive-only: keep each local change as a version and forget its name's record (not
        announced); the names, deepest first, for the caller to ask the peers' records again."""
        names = sorted(self.local_changes, key=lambda n: (-n.count("/"), n))
        done: list[str] = []
        for name in names:
            change = self.local_changes[name]
            try:
                if change.type is FileType.DIR and not change.deleted:
                    if not self.fs.rmdir(name):
                        continue  # still holds files (ignored ones): left as it is
                elif not self.drop_local_change(name, wall):
                    continue
            except OSError as exc:
                log.warning("cannot revert %r: %s", name, exc)
                continue
            self.local_changes.pop(name, None)
            done.append(name)
        self.index.forget_local(done)
        return done
