"""Framing: round trips, limits checked at the header, bounded buffering, garbage in."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from agent.wire.frames import MAX_FRAME, PRE_AUTH_MAX_FRAME, FrameDecoder, encode_frame


def drain(decoder: FrameDecoder) -> list[bytes]:
    """Every whole frame the decoder holds."""
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


def test_encode_frame_is_length_then_body() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"


def test_encode_refuses_empty_and_oversized() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(b"")
    with pytest.raises(LocalProtocolError) as info:
        encode_frame(bytes(MAX_FRAME + 1))
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert len(encode_frame(bytes(MAX_FRAME))) == MAX_FRAME + 4


def test_decoder_waits_for_whole_frames() -> None:
    decoder = FrameDecoder()
    wire = encode_frame(b"hello") + encode_frame(b"world")
    decoder.feed(wire[:3])
    assert decoder.next_frame() is None
    decoder.feed(wire[3:8])
    assert decoder.next_frame() is None
    decoder.feed(wire[8:])
    assert drain(decoder) == [b"hello", b"world"]
    assert decoder.buffered == 0


def test_oversized_header_is_refused_before_the_body_arrives() -> None:
    decoder = FrameDecoder()
    with pytest.raises(RemoteProtocolError) as info:
        decoder.feed((PRE_AUTH_MAX_FRAME + 1).to_bytes(4, "big"))
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE


def test_exactly_max_frame_is_accepted() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(bytes(PRE_AUTH_MAX_FRAME)))
    assert drain(decoder) == [bytes(PRE_AUTH_MAX_FRAME)]


def test_zero_length_frame_is_malformed() -> None:
    decoder = FrameDecoder()
    with pytest.raises(RemoteProtocolError) as info:
        decoder.feed(b"\x00\x00\x00\x00")
    assert info.value.code is ErrorCode.MALFORMED


def test_limit_applies_from_the_next_frame_on() -> None:
    # A small frame then a large one in one read: the large one is judged by the limit in force
    # when it is reached, which is how READY followed by a big sync message must work.
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"ready") + encode_frame(bytes(100_000)))
    assert decoder.next_frame() == b"ready"
    decoder.max_frame = MAX_FRAME
    assert decoder.next_frame() == bytes(100_000)


def test_large_header_after_small_frame_fails_if_limit_unchanged() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"x") + (PRE_AUTH_MAX_FRAME + 1).to_bytes(4, "big"))
    assert decoder.next_frame() == b"x"
    with pytest.raises(RemoteProtocolError):
        decoder.next_frame()


def test_buffer_stays_below_one_frame_when_drained() -> None:
    decoder = FrameDecoder()
    wire = encode_frame(bytes(PRE_AUTH_MAX_FRAME)) * 3
    for i in range(0, len(wire), 1000):
        decoder.feed(wire[i : i + 1000])
        drain(decoder)
        assert decoder.buffered < PRE_AUTH_MAX_FRAME + 4


def test_max_frame_setter_validates() -> None:
    decoder = FrameDecoder()
    with pytest.raises(LocalProtocolError):
        decoder.max_frame = 0
    with pytest.raises(LocalProtocolError):
        decoder.max_frame = 2**32


def test_clear_forgets_everything() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"abc")[:5])
    decoder.clear()
    assert decoder.buffered == 0
    decoder.feed(encode_frame(b"def"))
    assert drain(decoder) == [b"def"]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=10), st.data())
def test_round_trip_in_any_chunking(bodies: list[bytes], data: st.DataObject) -> None:
    wire = b"".join(encode_frame(b) for b in bodies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    decoder = FrameDecoder()
    out: list[bytes] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        decoder.feed(wire[start:end])
        out.extend(drain(decoder))
    assert out == bodies
    assert decoder.buffered == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.sampled_from([1, 7, 64, PRE_AUTH_MAX_FRAME]))
def test_garbage_in_frames_or_remote_protocol_error(garbage: bytes, max_frame: int) -> None:
    decoder = FrameDecoder(max_frame)
    try:
        for i in range(len(garbage)):  # one byte at a time: the hardest chunking
            decoder.feed(garbage[i : i + 1])
            for frame in drain(decoder):
                assert 0 < len(frame) <= max_frame
            assert decoder.buffered < max_frame + 4
    except RemoteProtocolError as exc:
        assert exc.code in (ErrorCode.MALFORMED, ErrorCode.FRAME_TOO_LARGE)
