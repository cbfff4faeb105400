"""The index exchange of one folder: hello, peers' index messages within budgets, ours in windows.

Theory of operation. On session start the engine sends `connected(peer)`'s `FolderHello`. On the
peer's hello (`on_hello`) we forget its records if its index id changed, then stream our index to
it: a full `Index` (then `IndexUpdate`s) if it holds nothing of our current index id, else the
records after the sequence it holds. At most `index_window` messages per peer are handed to the
shell before it reports one sent (`index_sent`), and each is read from the database only then, so
a slow reader never makes us hold a whole index in memory. A peer's `Index`/`IndexUpdate` is
checked against its budget (`max_remote_records` names, `max_remote_bytes` of records), stored,
and compared with our records by the planner (`consider`): what we need joins the engine's `need`,
and its name the pull `queue` or the pending `deletes` (containers the engine owns and shares).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.errors import ErrorCode, RemoteProtocolError
from agent.sync.index import FolderIndex
from agent.sync.messages import MAX_FILES_PER_MESSAGE, FolderHello, Index, IndexUpdate, next_batch, wire_size
from agent.sync.model import FileInfo, FileType
from agent.sync.planner import Action, decide
from agent.sync.scanner import Scanner
from agent.sync.scheduler import Outgoing, PeerLoad

# Index messages per peer handed to the shell and not yet reported sent (`index_sent`). Our index
# goes out as a stream read from the database as the link drains: a peer that reads slowly, or
# twenty peers at once, cannot make us hold a 100,000-record index in memory per peer.
INDEX_WINDOW = 2
# Names one peer may announce in one folder (deletion records included), and the bytes of their
# records (names, vectors, block hashes). Remote indexes live on disk, not in memory, but a
# trusted peer gone bad must not fill the disk with made-up names or block lists: a record can be
# up to ~2 MiB (a 128 GiB file's hashes), so the names alone would not bound it. 1 GiB of records
# describes ~60 TB of content in 2 MiB blocks. Past either, the peer is refused with limit_exceeded.
MAX_REMOTE_RECORDS = 2_000_000
MAX_REMOTE_BYTES = 1 << 30


@dataclass(slots=True)
class Peer(PeerLoad):
    """A connected peer: what we asked of it (`PeerLoad`), what we announced to it, what it told us."""

    sent_seq: int = 0  # our records up to this sequence are handed to the shell for this peer
    full: bool = False  # the next index message is a full `Index` (the peer holds none of ours)
    window: int = INDEX_WINDOW  # index messages we may still hand over before `index_sent`
    records: int = -1  # at least how many names it announced to us (-1: not counted yet)
    record_bytes: int = -1  # at least how many bytes of records it announced (-1: not counted yet)
    progress: tuple[int, int] | None = None  # its (need_files, need_bytes) as it reported


@dataclass(slots=True)
class Need:
    """A version of a name that we lack, and the peers that announced it."""

    target: FileInfo
    sources: set[str] = field(default_factory=set)


class IndexExchange:
    """Our index out to each peer, theirs in; what we need of theirs."""

    def __init__(
        self, folder_id: str, index: FolderIndex, scanner: Scanner, *,
        peers: dict[str, Peer], need: dict[str, Need], queue: deque[str], deletes: set[str],
        drop_job: Callable[[str], None], hold: set[str] | None = None,
        max_remote_records: int = MAX_REMOTE_RECORDS, max_remote_bytes: int = MAX_REMOTE_BYTES,
        index_window: int = INDEX_WINDOW, max_files_per_message: int = MAX_FILES_PER_MESSAGE,
    ) -> None:  # fmt: skip
        self.folder_id = folder_id
        self.index = index
        self.scanner = scanner  # for its current `.tofuignore`
        self.peers, self.need, self.queue, self.deletes = peers, need, queue, deletes  # the engine's
        self._drop_job = drop_job  # the engine stops a pull whose version is superseded
        self.hold = hold  # a send-only folder's: names we would apply, held back instead (None: apply)
        self.max_remote_records = max_remote_records
        self.max_remote_bytes = max_remote_bytes
        self.index_window = index_window
        self.max_files_per_message = max_files_per_message

    def connected(self, peer: str) -> list[Outgoing]:
        """A session with `peer` that shares this folder is up: our hello."""
        self.peers[peer] = Peer(window=self.index_window)
        have_id, have_seq = self.index.peer_state(peer)
        return [(peer, FolderHello(self.folder_id, self.index.index_id, have_id, have_seq))]

    def index_sent(self, peer: str) -> list[Outgoing]:
        """The shell sent one of our index messages to `peer`: the next, if any."""
        state = self.peers.get(peer)
        if state is None:
            return []
        state.window = min(self.index_window, state.window + 1)
        return self.announce_to(peer, state)

    def on_hello(self, peer: str, state: Peer, msg: FolderHello) -> list[Outgoing]:
        if self.index.peer_state(peer)[0] != msg.index_id:
            self.index.reset_peer(peer, msg.index_id)
            state.records = state.record_bytes = 0
            self.forget_source(peer)
        state.ready = True
        state.full = msg.have_index_id != self.index.index_id
        state.sent_seq = 0 if state.full else min(msg.have_sequence, self.index.sequence)
        return self.announce_to(peer, state)

    def on_full_index(self, peer: str, state: Peer, files: tuple[FileInfo, ...]) -> None:
        """A full `Index`: what we held of `peer`'s index is forgotten first."""
        self.index.reset_peer(peer, self.index.peer_state(peer)[0])
        state.records = state.record_bytes = 0
        self.forget_source(peer)
        self.on_update(peer, state, files)

    def on_update(self, peer: str, state: Peer, files: tuple[FileInfo, ...]) -> None:
        """An `IndexUpdate` (or the rest of an `Index`), within `peer`'s budget.

        :raises RemoteProtocolError: it takes `peer` past its budget (`limit_exceeded`).
        """
        self._check_room(peer, state, files)
        self.index.apply_remote(peer, list(files))
        self.consider(list(files), peer)

    def announce(self) -> list[Outgoing]:
        """Our new records, to every peer as its window allows."""
        out: list[Outgoing] = []
        for peer, state in self.peers.items():
            out += self.announce_to(peer, state)
        return out

    def announce_to(self, peer: str, state: Peer) -> list[Outgoing]:
        """Our records `peer` has not been handed yet, as index messages, up to its window."""
        out: list[Outgoing] = []
        while state.ready and state.window > 0 and (state.full or state.sent_seq < self.index.sequence):
            # read lazily: only the rows of this one message are ever decoded
            batch, more = next_batch(self.index.changes_since(state.sent_seq), max_files=self.max_files_per_message)
            if not batch and not state.full:
                state.sent_seq = self.index.sequence  # only numbers no record holds any more were left
                break
            # the last batch covers the sequence numbers no record holds any more, too
            state.sent_seq = batch[-1].sequence if more else self.index.sequence
            kind = Index if state.full else IndexUpdate
            state.full = False
            state.window -= 1
            out.append((peer, kind(self.folder_id, tuple(batch))))
        return out

    def _check_room(self, peer: str, state: Peer, files: tuple[FileInfo, ...]) -> None:
        """Refuse an index message that would take `peer` past `max_remote_records` names."""
        if state.records < 0:
            state.records = self.index.count_remote(peer)
        if state.records + len(files) > self.max_remote_records:
            # the running figure is an upper bound (updates of known names count too): be exact
            state.records = self.index.count_remote(peer)
            new = len(files) - len(self.index.remote_names(peer, (f.name for f in files)))
            if state.records + new > self.max_remote_records:
                raise RemoteProtocolError(
                    f"announces more than {self.max_remote_records} names in folder {self.folder_id!r}",
                    ErrorCode.LIMIT_EXCEEDED,
                )
        state.records += len(files)
        size = sum(wire_size(f) for f in files)
        if state.record_bytes < 0 or state.record_bytes + size > self.max_remote_bytes:
            # the running figure is an upper bound (replaced records still count): be exact
            state.record_bytes = self.index.remote_bytes(peer)
            if state.record_bytes + size > self.max_remote_bytes:
                raise RemoteProtocolError(
                    f"announces more than {self.max_remote_bytes >> 20} MiB of records in folder {self.folder_id!r}",
                    ErrorCode.LIMIT_EXCEEDED,
                )
        state.record_bytes += size

    def consider(self, files: list[FileInfo], peer: str) -> None:
        """Queue what we need among `files` announced by `peer`."""
        local = self.index.local_many(f.name for f in files)
        for remote in files:
            if self.scanner.ignore.matches(remote.name, remote.type is FileType.DIR):
                continue
            action = decide(local.get(remote.name), remote).action
            if action is Action.NONE:
                if self.hold is not None:
                    self.hold.discard(remote.name)
                continue
            if self.hold is not None and action is not Action.RECORD:
                # send-only: never applied (`status` counts them); adopting a record that changes
                # nothing on disk (same content and mtime, a deletion of what we lack) is harmless
                self.hold.add(remote.name)
                continue
            cur = self.need.get(remote.name)
            if cur is not None:
                order = remote.version.compare(cur.target.version)
                if order.name == "EQUAL":
                    cur.sources.add(peer)
                    continue
                if order.name == "LESSER" or (order.name == "CONCURRENT" and decide(cur.target, remote).action
                                              is Action.NONE):  # fmt: skip
                    continue
                self._drop_job(remote.name)
            self.need[remote.name] = Need(remote, {peer})
            if remote.deleted:
                self.deletes.add(remote.name)
            else:
                self.queue.append(remote.name)

    def forget_source(self, peer: str) -> None:
        """`peer`'s records are gone: what only it had is no longer needed."""
        for name, n in list(self.need.items()):
            n.sources.discard(peer)
            if not n.sources:
                self._drop_job(name)
                del self.need[name]

    def reconsider(self, names: list[str]) -> None:
        """Decide `names` afresh against every peer's stored records."""
        for peer in self.index.peers():
            got = self.index.remote_many(peer, names)
            self.consider([got[n] for n in names if n in got], peer)
