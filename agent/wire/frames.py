"""Length-prefixed framing: a 4-byte big-endian body length, then that many bytes of msgpack body.

Sans-I/O: `FrameDecoder.feed` takes bytes from the transport, `next_frame` hands back one whole
body at a time. Frames are parsed lazily, one per `next_frame` call, because the size limit
changes between frames (8 KiB before the peer is authenticated, 4 MiB after), and the frame after
READY must be judged by the new limit. A length over the limit is refused as soon as its 4 header
bytes are seen, so a peer cannot make us buffer more than one frame of the current limit.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Final

from agent.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

HEADER_LEN: Final = 4
# Before the peer has proved its key (HELLO, AUTH, READY, ERROR). The largest valid HELLO (12
# rotation statements of 512 bytes and a 1 KiB certificate) is about 7.3 KiB.
PRE_AUTH_MAX_FRAME: Final = 8 * 1024
MAX_FRAME: Final = 4 * 1024 * 1024  # after the handshake: sync messages carry blocks of up to 2 MiB
_HEADER: Final = struct.Struct(">I")
_MAX_ENCODABLE: Final = 2**32 - 1


def frame_header(size: int) -> bytes:
    """The 4-byte header of a frame whose body is `size` bytes.

    :raises LocalProtocolError: `size` is 0 or more than MAX_FRAME.
    """
    if size <= 0:
        raise LocalProtocolError("refusing to send an empty frame", ErrorCode.MALFORMED)
    if size > MAX_FRAME:
        raise LocalProtocolError(f"refusing to send a {size}-byte frame (limit {MAX_FRAME})", ErrorCode.FRAME_TOO_LARGE)
    return _HEADER.pack(size)


def encode_frame(body: bytes) -> bytes:
    """`body` with its 4-byte length header.

    :raises LocalProtocolError: the body is empty or longer than MAX_FRAME.
    """
    return frame_header(len(body)) + body


class FrameDecoder:
    """Reassembles frames from a byte stream, enforcing `max_frame` on every header.

    Call `next_frame()` until it returns None after each `feed()`: the decoder then holds less
    than `max_frame + 4` bytes, which is the bound on what a peer can make us buffer.

    Received chunks are kept as they came (no copy) and joined once per frame: a 1 MiB frame
    that arrives in 64 TLS records costs one copy, not a growing buffer that is copied again on
    every append and sliced out at the end.
    """

    __slots__ = ("_chunks", "_len", "_max_frame", "_off")

    def __init__(self, max_frame: int = PRE_AUTH_MAX_FRAME) -> None:
        self._chunks: deque[bytes] = deque()
        self._off = 0  # bytes of the first chunk already consumed
        self._len = 0  # bytes buffered and not yet returned
        self._max_frame = PRE_AUTH_MAX_FRAME
        self.max_frame = max_frame

    @property
    def max_frame(self) -> int:
        """Largest body accepted from now on; frames already returned are not re-judged."""
        return self._max_frame

    @max_frame.setter
    def max_frame(self, value: int) -> None:
        if not 1 <= value <= _MAX_ENCODABLE:
            raise LocalProtocolError(f"max_frame must be in 1..{_MAX_ENCODABLE}, not {value}")
        self._max_frame = value

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return self._len

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes from the transport.

        :raises RemoteProtocolError: the next frame's header announces an empty or oversized body.
        """
        if not data:
            return
        chunk = data if type(data) is bytes else bytes(data)  # the caller may reuse its buffer
        self._chunks.append(chunk)
        self._len += len(chunk)
        if self._len >= HEADER_LEN:
            self._check_header()

    def next_frame(self) -> bytes | None:
        """The next whole frame body, or None until more data arrives.

        :raises RemoteProtocolError: the next frame's header announces an empty or oversized body.
        """
        if self._len < HEADER_LEN:
            return None
        size = self._check_header()
        end = HEADER_LEN + size
        if self._len < end:
            return None
        chunks = self._chunks
        first = chunks[0]
        off = self._off
        if len(first) - off >= end:  # the whole frame is in the first chunk (small messages)
            body = first[off + HEADER_LEN : off + end]
            off += end
            if off == len(first):
                chunks.popleft()
                off = 0
            self._off = off
        else:
            body = self._gather(off + HEADER_LEN, size)
        self._len -= end
        return body

    def clear(self) -> None:
        """Forget everything buffered (the rest of a stream we no longer read)."""
        self._chunks.clear()
        self._off = 0
        self._len = 0

    def _gather(self, skip: int, size: int) -> bytes:
        """Join `size` bytes that start `skip` bytes into the chunks; consume them and what precedes."""
        chunks = self._chunks
        parts: list[memoryview] = []
        while skip >= len(chunks[0]):  # the header may end exactly at (or span) a chunk boundary
            skip -= len(chunks.popleft())
        need = size
        while need:
            chunk = chunks[0]
            take = min(len(chunk) - skip, need)
            parts.append(memoryview(chunk)[skip : skip + take])
            need -= take
            if skip + take == len(chunk):
                chunks.popleft()
                skip = 0
            else:
                skip += take
        self._off = skip
        return b"".join(parts)

    def _header(self) -> int:
        first = self._chunks[0]
        if len(first) - self._off >= HEADER_LEN:
            (size,) = _HEADER.unpack_from(first, self._off)
        else:  # the 4 header bytes span chunks
            head = bytearray()
            off = self._off
            for chunk in self._chunks:
                head += chunk[off : off + HEADER_LEN - len(head)]
                off = 0
                if len(head) == HEADER_LEN:
                    break
            (size,) = _HEADER.unpack(head)
        return int(size)

    def _check_header(self) -> int:
        size = self._header()
        if size == 0:
            raise RemoteProtocolError("peer sent an empty frame", ErrorCode.MALFORMED)
        if size > self._max_frame:
            raise RemoteProtocolError(
                f"peer announced a {size}-byte frame (limit {self._max_frame})", ErrorCode.FRAME_TOO_LARGE
            )
        return size
