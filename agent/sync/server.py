"""Answering block requests from the folder and our index records (disk).

Theory: a request names a file, an offset, a size and the hash the requester expects. We answer
only for files our index holds as the current version, at a block boundary of that version, with
the bytes read through `FolderFS` (never through a symlink); if the file on disk no longer
matches the record, the answer is CHANGED rather than bytes that would fail the hash check.
`BlockServer` does this from its own read-only database connection and folder handle, so the
shell answers requests while the engine scans or commits: WAL readers never wait for the writer,
and a record becomes visible to the server when the transaction that announces it commits.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path

from agent.sync import puller
from agent.sync.fs import FolderFS
from agent.sync.index import FolderIndex
from agent.sync.messages import BlockError, Request, Response
from agent.sync.model import FileType

log = logging.getLogger(__name__)


def serve_block(folder_id: str, index: FolderIndex, fs: FolderFS, req: Request) -> Response:
    """The answer to `req`: a block of our current version of the file, or why there is none."""
    if req.folder != folder_id:
        return Response(req.request_id, b"", BlockError.INVALID)
    rec = index.local(req.name)
    if rec is None or rec.deleted or rec.type is not FileType.FILE or req.offset % rec.block_size:
        return Response(req.request_id, b"", BlockError.NOT_FOUND)
    i = req.offset // rec.block_size
    if i >= rec.n_blocks or rec.block_hash(i) != req.hash:
        return Response(req.request_id, b"", BlockError.NOT_FOUND)
    if req.size != min(rec.block_size, rec.size - req.offset):
        return Response(req.request_id, b"", BlockError.INVALID)
    try:
        fd = fs.open_read(req.name)
    except OSError:
        return Response(req.request_id, b"", BlockError.CHANGED)
    try:
        # The receiver verifies every block's hash; checking the stat here answers CHANGED honestly
        # instead of sending bytes that would look corrupt.
        if not puller.unchanged(os.fstat(fd), rec):
            return Response(req.request_id, b"", BlockError.CHANGED)
        data = os.pread(fd, req.size, req.offset)
    except OSError as exc:
        log.warning("cannot read %r to serve it: %s", req.name, exc)
        return Response(req.request_id, b"", BlockError.CHANGED)
    finally:
        os.close(fd)
    if len(data) != req.size:
        return Response(req.request_id, b"", BlockError.CHANGED)
    return Response(req.request_id, data)


class BlockServer:
    """Serves one folder's blocks beside its engine, from a read-only connection to its index."""

    def __init__(self, folder_id: str, root: Path, index_path: Path | str) -> None:
        self.folder_id = folder_id
        self.fs = FolderFS(root, need_root=False)  # made by the engine's start if missing
        self.index = FolderIndex(index_path, read_only=True)
        self._lock = threading.Lock()  # links' send loops serve from several worker threads

    def serve(self, requests: list[Request]) -> list[Response]:
        """Answers to `requests`, in order."""
        out: list[Response] = []
        with self._lock, self.fs.batch():
            # (re)open the root if it was made or replaced (a disk mounted again) since the last batch
            self.fs.refresh()
            for r in requests:
                try:
                    out.append(serve_block(self.folder_id, self.index, self.fs, r))
                except sqlite3.Error as exc:  # the index is unreadable: the requester tries elsewhere
                    log.warning("folder %r: cannot look up %r to serve it: %s", self.folder_id, r.name, exc)
                    out.append(Response(r.request_id, b"", BlockError.CHANGED))
        return out

    def close(self) -> None:
        """Close the folder handle and the database connection."""
        with self._lock:
            self.fs.close()
            self.index.close()
