"""Which blocks of a folder's pulls to ask of which peer, and what became of each request (pure).

Theory of operation. The engine owns the pulls (`jobs`: name -> a `Pull`, whose `fetch` lists the
block indexes still to ask for and `outstanding` those asked) and the connected peers (`PeerLoad`:
ready, bytes in flight, last answer, stalled); the scheduler reads both and keeps the request
table. `issue(now)` asks each pull's blocks of the first source with room in its in-flight window
(a full window holds up only the blocks asked of that peer); `answered(peer, state, msg, now)`
takes a request off the table, only for the peer it was sent to; `cancel(job)` writes off the
requests of a pull we gave up (their bytes stay in the peer's window until it answers, so a peer
that never answers cannot grow the table past its window); `stall(peer, state)` writes off the
requests of a peer that left them unanswered for `stall_timeout` on the monotonic clock.
Request ids carry the engine's `request_id_base` in their top bits (a response names no folder);
ids still awaiting an answer are skipped when the counter wraps. No I/O and no clock: `now` is
passed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from agent.errors import ErrorCode, RemoteProtocolError
from agent.sync.clock import Now
from agent.sync.messages import Request, Response, SyncMessage
from agent.sync.model import FileInfo

Outgoing = tuple[str, SyncMessage]
MAX_BAD_BLOCKS = 3  # blocks failing their hash from one peer before its link is closed (bad_block)
REQUEST_ID_MASK = 0xFFFFFF  # low 24 bits count; the top 8 bits are the engine's `request_id_base`
# A peer that leaves our requests unanswered this long (not one response) is stalled: its
# requests are written off and its files are asked of other peers, or wait (a slow but honest
# peer answers something well within this: a whole window of 48 MiB at 1 MB/s takes 48 s).
STALL_TIMEOUT = 120.0


@dataclass(slots=True)
class PeerLoad:
    """What we asked of a connected peer, and whether it may be asked more."""

    ready: bool = False  # it said hello
    inflight_bytes: int = 0
    answered_at: float = 0.0  # (monotonic) its last response, or our first request since it had none open
    stalled: bool = False  # it left requests unanswered for the stall timeout; cleared by any response
    bad_blocks: int = 0


class Pull(Protocol):
    """What the scheduler sees of one file being pulled (`puller.Job`)."""

    @property
    def name(self) -> str: ...
    @property
    def target(self) -> FileInfo: ...
    @property
    def sources(self) -> set[str]: ...
    @property
    def fetch(self) -> deque[int]: ...
    @property
    def outstanding(self) -> set[int]: ...


J = TypeVar("J", bound=Pull)


def block_bytes(target: FileInfo, i: int) -> int:
    """The size of block `i` of `target`."""
    return min(target.block_size, target.size - i * target.block_size)


class RequestScheduler(Generic[J]):
    """The block requests of one folder: issued, answered, cancelled, stalled."""

    def __init__(
        self, folder_id: str, peers: Mapping[str, PeerLoad], jobs: Mapping[str, J], *,
        max_inflight_bytes: int, request_id_base: int = 0, request_id_mask: int = REQUEST_ID_MASK,
        stall_timeout: float = STALL_TIMEOUT, max_bad_blocks: int = MAX_BAD_BLOCKS,
    ) -> None:  # fmt: skip
        self.folder_id = folder_id
        self.peers = peers  # the engine's, read only
        self.jobs = jobs  # the engine's: their `fetch` and `outstanding` move here
        self.max_inflight_bytes = max_inflight_bytes
        self.mask = request_id_mask
        # Responses carry no folder: each engine of a service draws ids from its own range
        # (top 8 bits) so the shell can route a response to the engine that asked.
        self.base = request_id_base & ~request_id_mask & 0xFFFFFFFF
        self.stall_timeout = stall_timeout
        self.max_bad_blocks = max_bad_blocks
        self.requests: dict[int, tuple[str, str, int]] = {}  # request id -> (peer, name, block)
        # Requests of pulls we gave up (a newer version superseded them): an honest peer's late
        # answer to one is expected, so it is dropped quietly instead of closing the link. Their
        # bytes stay in the peer's in-flight window until answered, which bounds this table too.
        self.cancelled: dict[int, tuple[str, int]] = {}  # request id -> (peer, bytes)
        self.requested_blocks = 0  # requests issued, for tests and status
        self._next = 0

    def can_ask(self, peer: str) -> bool:
        """`peer` said hello and is not stalled."""
        state = self.peers.get(peer)
        return state is not None and state.ready and not state.stalled

    def room(self, peer: str, size: int) -> bool:
        """`peer`'s window takes `size` more bytes (an empty window takes any one block)."""
        inflight = self.peers[peer].inflight_bytes
        return not inflight or inflight + size <= self.max_inflight_bytes

    def new_request_id(self) -> int:
        while True:
            rid = self.base | self._next
            self._next = (self._next + 1) & self.mask
            if rid not in self.requests and rid not in self.cancelled:
                return rid  # (after a wrap, ids still awaiting an answer are skipped)

    def issue(self, now: Now) -> list[Outgoing]:
        """Ask the blocks every pull still needs of its sources, as their windows allow."""
        out: list[Outgoing] = []
        for job in self.jobs.values():
            while job.fetch:
                i = job.fetch[0]
                offset = i * job.target.block_size
                size = min(job.target.block_size, job.target.size - offset)
                # the first source with room in its window (a full one holds up only its own blocks)
                peer = next((p for p in sorted(job.sources) if self.can_ask(p) and self.room(p, size)), None)
                if peer is None:
                    break
                state = self.peers[peer]
                job.fetch.popleft()
                job.outstanding.add(i)
                if not state.inflight_bytes:
                    state.answered_at = now.mono  # the stall clock starts with the first open request
                state.inflight_bytes += size
                rid = self.new_request_id()
                self.requests[rid] = (peer, job.name, i)
                self.requested_blocks += 1
                out.append((peer, Request(self.folder_id, job.name, offset, size, job.target.block_hash(i), rid)))
        return out

    def answered(self, peer: str, state: PeerLoad, msg: Response, now: Now) -> tuple[J, int] | None:
        """Take `msg`'s request off the table: the pull and block it answers, or None (a late
        answer to a cancelled request, or a pull that is gone).

        :raises RemoteProtocolError: `msg` answers no request we sent to `peer`.
        """
        entry = self.requests.get(msg.request_id)
        late = self.cancelled.get(msg.request_id)
        if entry is None and late is not None and late[0] == peer:
            del self.cancelled[msg.request_id]
            state.inflight_bytes -= late[1]
            state.answered_at, state.stalled = now.mono, False
            return None
        if entry is None or entry[0] != peer:
            # (checked before the entry is taken: a peer answering another's id must not steal it)
            raise RemoteProtocolError("response to no request of ours", ErrorCode.UNEXPECTED_MESSAGE)
        del self.requests[msg.request_id]
        state.answered_at, state.stalled = now.mono, False
        _, name, i = entry
        job = self.jobs.get(name)
        if job is None:
            return None
        state.inflight_bytes -= block_bytes(job.target, i)
        job.outstanding.discard(i)
        return job, i

    def refused(self, peer: str, job: Pull, i: int) -> bool:
        """`peer` no longer has `job`'s version (its index update will follow): ask the block of
        the other sources. True if none is left."""
        job.sources.discard(peer)
        job.fetch.appendleft(i)
        return not job.sources

    def bad_block(self, state: PeerLoad, job: Pull, i: int) -> None:
        """Block `i` of `job` failed its hash: ask it again.

        :raises RemoteProtocolError: the peer sent `max_bad_blocks` such blocks (`bad_block`).
        """
        state.bad_blocks += 1
        job.fetch.appendleft(i)
        if state.bad_blocks >= self.max_bad_blocks:
            raise RemoteProtocolError(f"{state.bad_blocks} corrupt blocks", ErrorCode.BAD_BLOCK)

    def cancel(self, job: Pull) -> None:
        """`job` was given up: its requests become cancelled (their bytes stay in the windows)."""
        for rid, (p, n, i) in list(self.requests.items()):
            if n == job.name:
                del self.requests[rid]
                self.cancelled[rid] = (p, block_bytes(job.target, i))

    def peer_gone(self, peer: str) -> None:
        """`peer` disconnected: its open requests are asked of someone else."""
        self.cancelled = {rid: c for rid, c in self.cancelled.items() if c[0] != peer}
        for rid, (p, name, i) in list(self.requests.items()):
            if p == peer:
                del self.requests[rid]
                job = self.jobs.get(name)
                if job is not None:
                    job.outstanding.discard(i)
                    job.fetch.appendleft(i)

    def stall_times(self) -> list[float]:
        """When each peer with open requests and no answer stalls (monotonic)."""
        return [s.answered_at + self.stall_timeout for s in self.peers.values() if s.inflight_bytes and not s.stalled]

    def stalls_due(self, now: Now) -> list[str]:
        """The peers whose open requests went unanswered for `stall_timeout`."""
        return [
            peer for peer, s in self.peers.items()
            if s.inflight_bytes and not s.stalled and now.mono - s.answered_at >= self.stall_timeout
        ]  # fmt: skip

    def stall(self, peer: str, state: PeerLoad) -> list[str]:
        """Write off `peer`'s open requests (their blocks go back to `fetch`, for other peers);
        the names of the pulls no peer that may be asked has, which the caller gives up."""
        state.stalled = True
        for rid, (p, name, i) in list(self.requests.items()):
            if p != peer:
                continue
            job = self.jobs.get(name)
            # its bytes stay in the peer's window (as `cancelled`) until it answers or goes
            del self.requests[rid]
            self.cancelled[rid] = (peer, block_bytes(job.target, i) if job is not None else 0)
            if job is not None:
                job.outstanding.discard(i)
                job.fetch.appendleft(i)
        return [name for name, job in self.jobs.items() if not any(self.can_ask(p) for p in job.sources)]
