"""Length-prefixed framing: a 4-byte big-endian body length, then that many bytes of msgpack body.

Sans-I/O: `FrameDecoder.feed` takes bytes from the transport, `next_frame` hands back one whole
body at a time. Frames are parsed lazily, one per `next_frame` call, because the size limit
changes between frames (8 KiB before the peer is authenticated, 4 MiB after), and the frame after
READY must be judged by the new limit. A length over the limit is refused as soon as its 4 header
bytes are seen, so a peer cannot make us buffer more than one frame of the current limit.
"""

from __future__ import annotations

import struct
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
    """

    __slots__ = ("_buf", "_max_frame")

    def __init__(self, max_frame: int = PRE_AUTH_MAX_FRAME) -> None:
        self._buf = bytearray()
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
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes from the transport.

        :raises RemoteProtocolError: the next frame's header announces an empty or oversized body.
        """
        self._buf += data
        if len(self._buf) >= HEADER_LEN:
            self._check_header()

    def next_frame(self) -> bytes | None:
        """The next whole frame body, or None until more data arrives.

        :raises RemoteProtocolError: the next frame's header announces an empty or oversized body.
        """
        buf = self._buf
        if len(buf) < HEADER_LEN:
            return None
        size = self._check_header()
        end = HEADER_LEN + size
        if len(buf) < end:
            return None
        # One copy out of the buffer; deleting a bytearray prefix only moves its start (O(1)).
        with memoryview(buf) as view:
            body = bytes(view[HEADER_LEN:end])
        del buf[:end]
        return body

    def clear(self) -> None:
        """Forget everything buffered (the rest of a stream we no longer read)."""
        self._buf.clear()

    def _check_header(self) -> int:
        (size,) = _HEADER.unpack_from(self._buf)
        if size == 0:
            raise RemoteProtocolError("peer sent an empty frame", ErrorCode.MALFORMED)
        if size > self._max_frame:
            raise RemoteProtocolError(
                f"peer announced a {size}-byte frame (limit {self._max_frame})", ErrorCode.FRAME_TOO_LARGE
            )
        return int(size)
