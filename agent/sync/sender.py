"""The send side of one peer link: its queue drained by a task of its own (anyio).

Sending never blocks reading: two agents that both waited in `send` while neither read would
deadlock. The service pushes messages onto `_Link.queue`; `send_loop` takes them off in order.
Small messages are coalesced into one TLS write of up to SEND_BATCH_BYTES. A peer's block
requests wait in the same queue as requests and are read from disk only when their turn comes,
in batches of up to SERVE_BATCH_BYTES, by the folder's `BlockServer` in a worker thread (its own
read-only index connection: no wait for the engine's lock).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import anyio
import anyio.to_thread

from agent.errors import ProtocolError
from agent.sync.messages import Index, Request, Response, SyncMessage
from agent.sync.state import _Folder, _Link

log = logging.getLogger(__name__)

SEND_BATCH_BYTES = 256 * 1024  # small messages coalesced into one TLS write
SERVE_BATCH_BYTES = 8 * 1024 * 1024  # blocks read from disk in one worker-thread call


def _send_size(msg: SyncMessage) -> int:
    """About how many bytes `msg` takes on the wire (an index message counts as a full write)."""
    if isinstance(msg, Response):
        return len(msg.data) + 32
    if isinstance(msg, Index):
        return SEND_BATCH_BYTES
    return 128


def _to_serve(folder: _Folder | None, msg: SyncMessage) -> bool:
    """True for a queued peer request we must answer from `folder` (else: a message to send)."""
    return folder is not None and isinstance(msg, Request)


async def send_loop(ls: _Link, folders: Mapping[str, _Folder]) -> None:
    """Send what is queued on `ls` until it closes; `folders` (the service's folders by id, read
    as they are then) hear when one of their index messages went out."""
    try:
        while not ls.closed:
            if not ls.queue:
                ls.wake = anyio.Event()
                await ls.wake.wait()
                continue
            folder, msg = ls.queue[0]
            if not _to_serve(folder, msg):
                group: list[SyncMessage] = []
                size = 0
                while ls.queue and size < SEND_BATCH_BYTES and not _to_serve(*ls.queue[0]):
                    group.append(ls.queue.popleft()[1])
                    size += _send_size(group[-1])
                    if isinstance(group[-1], Response):
                        ls.serves -= 1  # an INVALID answer (the queue holds no other Response)
                ls.room.set()
                await send_group(ls, group, folders)
                continue
            ls.queue.popleft()
            assert isinstance(msg, Request) and folder is not None
            batch, size = [msg], msg.size
            while ls.queue and ls.queue[0][0] is folder and size < SERVE_BATCH_BYTES:
                nxt = ls.queue.popleft()[1]
                assert isinstance(nxt, Request)
                batch.append(nxt)
                size += nxt.size
            ls.serves -= len(batch)
            ls.room.set()
            await send_group(ls, await anyio.to_thread.run_sync(folder.server.serve, batch), folders)
    except (ProtocolError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
        log.debug("sending to %s stopped: %s", ls.name, exc)


async def send_group(ls: _Link, messages: Sequence[SyncMessage], folders: Mapping[str, _Folder]) -> None:
    """Send `messages` in order, up to SEND_BATCH_BYTES per TLS write."""
    start = 0
    while start < len(messages):
        end, size = start, 0
        while end < len(messages) and (end == start or size + _send_size(messages[end]) <= SEND_BATCH_BYTES):
            size += _send_size(messages[end])
            end += 1
        await ls.link.send_many(messages[start:end])
        for m in messages[start:end]:
            if isinstance(m, Index) and (mine := folders.get(m.folder)) is not None:
                mine.put("sent", ls)  # the engine hands over the next part of its index
        start = end
