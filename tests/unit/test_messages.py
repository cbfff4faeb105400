"""Messages: round trips for every type, validation, the registry, known-good bytes, garbage in.

Regenerate the vectors after a deliberate format change with:
    .venv/bin/python -m tests.unit.test_messages
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from agent.wire.frames import PRE_AUTH_MAX_FRAME, encode_frame
from agent.wire.messages import (
    MAX_CERT,
    MAX_ROTATION_LEN,
    MAX_ROTATIONS,
    MAX_U64,
    MAX_VERSIONS,
    Auth,
    Error,
    Hello,
    Ping,
    Pong,
    Ready,
    WireMessage,
    check,
    decode_message,
    encode_message,
    field_int,
    field_str,
    register,
    registered_types,
)

VECTORS_DIR = Path(__file__).resolve().parent.parent / "vectors"
DEVICE_ID = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"

# Fixed inputs for the checked-in wire bytes (tests/vectors/<name>.bin holds the whole frame).
VECTORS: dict[str, WireMessage] = {
    "hello": Hello(
        versions=(1,),
        device_id=DEVICE_ID,
        name="laptop",
        cert=bytes(range(256)) * 2,
        nonce=bytes(range(32)),
        rotations=(b"rotation-statement-1",),
    ),
    "auth": Auth(signature=bytes(range(70))),
    "ready": Ready(version=1),
    "error": Error(ErrorCode.KEY_CHANGED, "the key of this device changed"),
    "ping": Ping(seq=7),
    "pong": Pong(seq=7),
}


def write_vectors(directory: Path = VECTORS_DIR) -> None:
    """Rewrite tests/vectors/*.bin from VECTORS (only after a deliberate format change)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, msg in VECTORS.items():
        (directory / f"{name}.bin").write_bytes(encode_frame(encode_message(msg)))


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_encoding_matches_known_good_bytes(name: str) -> None:
    path = VECTORS_DIR / f"{name}.bin"
    assert path.exists(), f"missing {path}; run: .venv/bin/python -m tests.unit.test_messages"
    wire = path.read_bytes()
    assert encode_frame(encode_message(VECTORS[name])) == wire, "wire format changed: deliberate?"
    assert decode_message(wire[4:]) == VECTORS[name]


# -- strategies -----------------------------------------------------------------------------------

_PRINTABLE = st.characters(exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"))
device_ids = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", min_size=32, max_size=32)
names = st.text(alphabet=_PRINTABLE, min_size=1, max_size=64)
u64 = st.integers(0, MAX_U64)

hellos = st.builds(
    Hello,
    versions=st.lists(st.integers(1, 0xFFFF), min_size=1, max_size=MAX_VERSIONS).map(tuple),
    device_id=device_ids,
    name=names,
    cert=st.binary(min_size=1, max_size=MAX_CERT),
    nonce=st.binary(min_size=32, max_size=32),
    rotations=st.lists(st.binary(min_size=1, max_size=MAX_ROTATION_LEN), max_size=MAX_ROTATIONS).map(tuple),
)
messages: st.SearchStrategy[WireMessage] = st.one_of(
    hellos,
    st.builds(Auth, signature=st.binary(min_size=1, max_size=256)),
    st.builds(Ready, version=st.integers(1, 0xFFFF)),
    st.builds(Error, code=st.sampled_from(ErrorCode), reason=st.text(alphabet=_PRINTABLE, max_size=200)),
    st.builds(Ping, seq=u64),
    st.builds(Pong, seq=u64),
)


@settings(max_examples=200, deadline=None)
@given(messages)
def test_round_trip_every_type(msg: WireMessage) -> None:
    assert decode_message(encode_message(msg)) == msg


# -- garbage in -----------------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), MAX_U64)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=600)
)
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
)
_field_names = st.sampled_from(["versions", "device_id", "name", "cert", "nonce", "rotations", "signature",
                                "version", "code", "reason", "seq", "t", "x"])  # fmt: skip
# Maps that look like messages: a real type name and real field names, with random values.
near_misses = st.builds(
    lambda t, fields: msgpack.packb({"t": t, **fields}, use_bin_type=True),
    st.sampled_from([*registered_types(), "nope", ""]),
    st.dictionaries(_field_names, _values, max_size=7),
)


def _mutate(wire: bytes, positions: list[int], value: int) -> bytes:
    data = bytearray(wire)
    for p in positions:
        data[p % len(data)] = value
    return bytes(data)


mutated = st.builds(
    _mutate, messages.map(encode_message), st.lists(st.integers(0, 10_000), max_size=3), st.integers(0, 255)
)


@settings(max_examples=600, deadline=None)
@given(st.one_of(st.binary(max_size=300), near_misses, mutated))
@pytest.mark.slow
def test_garbage_in_message_or_remote_protocol_error(body: bytes) -> None:
    try:
        msg = decode_message(body)
    except RemoteProtocolError as exc:
        assert exc.code in (ErrorCode.MALFORMED, ErrorCode.UNEXPECTED_MESSAGE)
    else:
        assert isinstance(msg, WireMessage)
        assert decode_message(encode_message(msg)) == msg


# -- validation -----------------------------------------------------------------------------------


def _decode_map(obj: object) -> WireMessage:
    return decode_message(msgpack.packb(obj, use_bin_type=True))


@pytest.mark.parametrize(
    "obj",
    [
        [1, 2],
        {"seq": 1},
        {"t": 5, "seq": 1},
        {"t": "ping"},
        {"t": "ping", "seq": True},
        {"t": "ping", "seq": -1},
        {"t": "ping", "seq": 1.0},
        {"t": "ping", "seq": 1, "extra": 0},
        {"t": "ready", "version": 0},
        {"t": "auth", "signature": "text, not bytes"},
        {"t": "auth", "signature": b""},
        {"t": "error", "code": 1, "reason": ""},
        {"t": "hello", **{**VECTORS["hello"].to_fields(), "nonce": bytes(31)}},
        {"t": "hello", **{**VECTORS["hello"].to_fields(), "device_id": "a" * 32}},
        {"t": "hello", **{**VECTORS["hello"].to_fields(), "name": "tab\there"}},
        {"t": "hello", **{**VECTORS["hello"].to_fields(), "name": ""}},
        {"t": "hello", **{**VECTORS["hello"].to_fields(), "versions": []}},
        {"t": "hello", **{**VECTORS["hello"].to_fields(), "rotations": [b"r"] * (MAX_ROTATIONS + 1)}},
        {"t": "hello", **{**VECTORS["hello"].to_fields(), "rotations": [bytes(MAX_ROTATION_LEN + 1)]}},
        {"t": "hello", **{**VECTORS["hello"].to_fields(), "cert": bytes(MAX_CERT + 1)}},
    ],
)
def test_invalid_maps_are_malformed(obj: object) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        _decode_map(obj)
    assert info.value.code is ErrorCode.MALFORMED


def test_huge_int_and_ext_types_are_malformed() -> None:
    for body in (
        b"\x82\xa1t\xa4ping\xa3seq\xd3\x80\x00\x00\x00\x00\x00\x00\x00",  # int64 min
        b"\x82\xa1t\xa4ping\xa3seq\xd6\xff\x00\x00\x00\x00",  # timestamp extension
        b"\x91" * 100_000,  # deep nesting
        msgpack.packb({"t": "ping", "seq": 1}) + b"\x00",  # trailing data
    ):
        with pytest.raises(RemoteProtocolError):
            decode_message(body)


def test_unknown_type_is_unexpected() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        _decode_map({"t": "from_the_future"})
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE


def test_unknown_error_code_becomes_protocol_error_and_reason_is_cleaned() -> None:
    msg = _decode_map({"t": "error", "code": "brand_new_code", "reason": "bad\x1b[31m"})
    assert msg == Error(ErrorCode.PROTOCOL_ERROR, "bad?[31m")


def test_local_construction_is_checked() -> None:
    with pytest.raises(LocalProtocolError):
        Hello(versions=(1,), device_id="nope", name="x", cert=b"c", nonce=bytes(32))
    with pytest.raises(LocalProtocolError):
        Error(ErrorCode.TIMEOUT, "x" * 201)
    with pytest.raises(LocalProtocolError):
        Hello(versions=(1,), device_id=DEVICE_ID, name="x", cert=b"c", nonce=bytes(32), rotations=(b"",))


def test_largest_hello_fits_in_a_pre_auth_frame() -> None:
    hello = Hello(
        versions=tuple(range(1, MAX_VERSIONS + 1)),
        device_id=DEVICE_ID,
        name="\U0001f600" * 64,  # 4 UTF-8 bytes each
        cert=bytes(MAX_CERT),
        nonce=bytes(32),
        rotations=(bytes(MAX_ROTATION_LEN),) * MAX_ROTATIONS,
    )
    assert len(encode_message(hello)) <= PRE_AUTH_MAX_FRAME


# -- the registry, as another module uses it ------------------------------------------------------


@register("test_note")
@dataclass(frozen=True, slots=True)
class Note(WireMessage):
    text: str
    count: int = 0

    def __post_init__(self) -> None:
        check(self.count < 100, "count must be below 100")

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> Note:
        return cls(text=field_str(fields, "text", max_len=10), count=field_int(fields, "count"))


def test_registered_type_round_trips_and_validates() -> None:
    assert registered_types()["test_note"] is Note
    assert decode_message(encode_message(Note("hi", 3))) == Note("hi", 3)
    with pytest.raises(RemoteProtocolError):
        _decode_map({"t": "test_note", "text": "hi", "count": 100})  # __post_init__ rule
    with pytest.raises(RemoteProtocolError):
        _decode_map({"t": "test_note", "text": "x" * 11, "count": 1})


def test_register_refuses_duplicates_and_non_dataclasses() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register("ping")(Note)

    class NotADataclass(WireMessage):
        pass

    with pytest.raises(TypeError):
        register("test_plain")(NotADataclass)


def test_encode_refuses_unregistered_types() -> None:
    @dataclass(frozen=True, slots=True)
    class Loose(WireMessage):
        x: int

    with pytest.raises(LocalProtocolError):
        encode_message(Loose(1))


if __name__ == "__main__":
    write_vectors()
    print(f"wrote {len(VECTORS)} vectors to {VECTORS_DIR}")
