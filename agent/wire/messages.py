"""Typed wire messages, their msgpack encoding, and the registry other layers add types to.

Body layout: one msgpack map ``{"t": <type name>, <field>: <value>, ...}`` (no frame header; see
`agent.wire.frames`). Bytes are msgpack bin, text is str, numbers are ints, sequences are arrays.
Wire keys are the dataclass field names; unknown and missing keys are errors.

Registry API (how `agent.sync.messages` adds "index", "request", ...)::

    @register("index")                      # the wire name in "t"; must be unique
    @dataclass(frozen=True, slots=True)
    class Index(WireMessage):
        folder: str
        entries: tuple[Entry, ...]

        def __post_init__(self) -> None:    # semantic rules; raise via check(...)
            check(len(self.entries) <= MAX_ENTRIES, "too many entries")

        @classmethod
        def from_fields(cls, fields: dict[str, object]) -> Index:
            return cls(
                folder=field_str(fields, "folder", max_len=255),
                entries=field_list(fields, "entries", max_len=MAX_ENTRIES, item=Entry.from_wire),
            )

        def to_fields(self) -> dict[str, object]:   # optional: the default maps field -> value
            return {"folder": self.folder, "entries": [e.to_wire() for e in self.entries]}

- `from_fields` gets the map without "t" and builds the message with the `field_*` helpers,
  which raise `RemoteProtocolError(MALFORMED)` for a missing key or a value of the wrong type
  or size. `as_*` do the same for one value (nested maps, list items). A list's `item` is called
  as `item(value, what)` (`what` names the element for errors), e.g. `Entry.from_wire` or
  `functools.partial(as_bytes, max_len=32)`.
- Containers decode as lists (arrays) and dicts (maps; `as_map` checks the keys are str).
- `from_fields` is called for peer input only after the unknown-key check; it must not trust
  anything else about the map.
- `__post_init__` checks the rules with `check(cond, why)`, which raises `LocalProtocolError`
  so building a bad message locally is a bug; `decode_message` turns it (and any exception a
  sloppy `from_fields` lets out) into `RemoteProtocolError(MALFORMED)`.
- `to_fields` returns msgpack-ready values (bytes, str, int, bool, None, lists/tuples, maps with
  str keys). The default returns the dataclass fields as they are.
- Import the module that registers a type before decoding it; `decode_message` raises
  `RemoteProtocolError(UNEXPECTED_MESSAGE)` for a "t" nobody registered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final, NoReturn, Self, TypeVar

import msgpack

from agent.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from agent.identity.ids import DEVICE_ID_BYTES, MAX_NAME_LEN, is_device_id
from agent.wire.frames import MAX_FRAME

SUPPORTED_VERSIONS: Final = (1,)
NONCE_LEN: Final = 32
MAX_VERSIONS: Final = 16
MAX_VERSION: Final = 0xFFFF  # versions go into the auth transcript as 2 bytes
MAX_CERT: Final = 1024  # our P-256 certificates are about 400 bytes
MAX_SIGNATURE: Final = 256
MAX_ROTATIONS: Final = 12  # 12 x 512 + a certificate fit the 8 KiB pre-auth frame
MAX_ROTATION_LEN: Final = 512
# Arrays and maps one message may hold in all: an index batch of 10,000 files needs about 30,000.
MAX_CONTAINERS: Final = 100_000
MAX_REASON: Final = 200
MAX_U64: Final = 2**64 - 1
_DEVICE_ID_LEN: Final = DEVICE_ID_BYTES * 8 // 5

T = TypeVar("T")
M = TypeVar("M", bound="WireMessage")


class WireMessage:
    """Base of every registered message: a frozen, slotted dataclass with a wire name in TYPE."""

    __slots__ = ()
    TYPE: ClassVar[str] = ""
    WIRE_FIELDS: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> Self:
        """Build the message from its decoded map (without "t"); RemoteProtocolError if invalid."""
        raise NotImplementedError

    def to_fields(self) -> dict[str, object]:
        """The map to encode (without "t")."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


_REGISTRY: dict[str, type[WireMessage]] = {}


def register(type_name: str) -> Callable[[type[M]], type[M]]:
    """Class decorator: make a WireMessage dataclass encodable and decodable as `type_name`."""

    def decorate(cls: type[M]) -> type[M]:
        if not 0 < len(type_name) <= 32:
            raise ValueError(f"bad message type name {type_name!r}")
        # Checked here too because other modules register types: fail at import, not on the wire.
        if "__dataclass_fields__" not in cls.__dict__ or "from_fields" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} must be a dataclass with its own from_fields")
        if type_name in _REGISTRY and _REGISTRY[type_name] is not cls:
            raise ValueError(f"message type {type_name!r} is already registered")
        cls.TYPE = type_name
        if not cls.__dict__.get("WIRE_FIELDS"):
            cls.WIRE_FIELDS = frozenset(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        if "t" in cls.WIRE_FIELDS:
            raise ValueError(f"{cls.__name__} may not have a field named 't'")
        _REGISTRY[type_name] = cls
        return cls

    return decorate


def registered_types() -> dict[str, type[WireMessage]]:
    """A copy of the registry: wire name -> class."""
    return dict(_REGISTRY)


# -- validation helpers ---------------------------------------------------------------------------


def check(condition: bool, why: str) -> None:
    """For `__post_init__`: raise LocalProtocolError(MALFORMED) with `why` unless `condition`."""
    if not condition:
        raise LocalProtocolError(why, ErrorCode.MALFORMED)


def malformed(why: str) -> NoReturn:
    """Raise RemoteProtocolError(MALFORMED) with `why`."""
    raise RemoteProtocolError(why, ErrorCode.MALFORMED)


def as_bytes(value: object, what: str, *, max_len: int, exact: int | None = None) -> bytes:
    """`value` if it is bytes of the right size (`exact`, else at most `max_len`)."""
    if not isinstance(value, bytes):
        malformed(f"{what} must be bytes")
    if exact is not None and len(value) != exact:
        malformed(f"{what} must be exactly {exact} bytes")
    if len(value) > max_len:
        malformed(f"{what} is longer than {max_len} bytes")
    return value


def as_str(value: object, what: str, *, max_len: int, min_len: int = 0) -> str:
    """`value` if it is a str of `min_len`..`max_len` characters."""
    if not isinstance(value, str):
        malformed(f"{what} must be a string")
    if not min_len <= len(value) <= max_len:
        malformed(f"{what} must be {min_len} to {max_len} characters")
    return value


def as_int(value: object, what: str, *, min_value: int = 0, max_value: int = MAX_U64) -> int:
    """`value` if it is an int (not a bool) in `min_value`..`max_value`."""
    if not isinstance(value, int) or isinstance(value, bool):
        malformed(f"{what} must be an integer")
    if not min_value <= value <= max_value:
        malformed(f"{what} must be in {min_value}..{max_value}")
    return value


def as_bool(value: object, what: str) -> bool:
    """`value` if it is a bool."""
    if not isinstance(value, bool):
        malformed(f"{what} must be true or false")
    return value


def as_list(value: object, what: str, *, max_len: int, item: Callable[[object, str], T]) -> tuple[T, ...]:
    """`value` as a tuple if it is an array of at most `max_len` items, each checked by `item`."""
    if not isinstance(value, list):
        malformed(f"{what} must be an array")
    if len(value) > max_len:
        malformed(f"{what} has more than {max_len} items")
    return tuple(item(v, f"{what}[{i}]") for i, v in enumerate(value))


def as_map(value: object, what: str, *, max_len: int) -> dict[str, object]:
    """`value` if it is a map of at most `max_len` entries with str keys."""
    if not isinstance(value, dict):
        malformed(f"{what} must be a map")
    if len(value) > max_len:
        malformed(f"{what} has more than {max_len} entries")
    if not all(isinstance(k, str) for k in value):
        malformed(f"{what} keys must be strings")
    return value


def _get(fields: dict[str, object], name: str) -> object:
    try:
        return fields[name]
    except KeyError:
        malformed(f"missing field {name!r}")


def field_bytes(fields: dict[str, object], name: str, *, max_len: int = MAX_FRAME, exact: int | None = None) -> bytes:
    """Field `name` as bytes (see `as_bytes`)."""
    return as_bytes(_get(fields, name), name, max_len=exact if exact is not None else max_len, exact=exact)


def field_str(fields: dict[str, object], name: str, *, max_len: int, min_len: int = 0) -> str:
    """Field `name` as str (see `as_str`)."""
    return as_str(_get(fields, name), name, max_len=max_len, min_len=min_len)


def field_int(fields: dict[str, object], name: str, *, min_value: int = 0, max_value: int = MAX_U64) -> int:
    """Field `name` as int (see `as_int`)."""
    return as_int(_get(fields, name), name, min_value=min_value, max_value=max_value)


def field_bool(fields: dict[str, object], name: str) -> bool:
    """Field `name` as bool."""
    return as_bool(_get(fields, name), name)


def field_list(
    fields: dict[str, object], name: str, *, max_len: int, item: Callable[[object, str], T]
) -> tuple[T, ...]:
    """Field `name` as a tuple of checked items (see `as_list`)."""
    return as_list(_get(fields, name), name, max_len=max_len, item=item)


def field_map(fields: dict[str, object], name: str, *, max_len: int) -> dict[str, object]:
    """Field `name` as a map with str keys (see `as_map`)."""
    return as_map(_get(fields, name), name, max_len=max_len)


def is_printable_text(text: str, max_len: int) -> bool:
    """True if `text` has 1..`max_len` characters, all printable (safe to show on a terminal)."""
    return 0 < len(text) <= max_len and text.isprintable()


# -- encoding -------------------------------------------------------------------------------------


def encode_message(msg: WireMessage) -> bytes:
    """The msgpack body of `msg` (no frame header).

    :raises LocalProtocolError: the message type is not registered.
    """
    cls = type(msg)
    if _REGISTRY.get(cls.TYPE) is not cls:
        raise LocalProtocolError(f"{cls.__name__} is not a registered message type")
    body: dict[str, object] = {"t": cls.TYPE}
    body.update(msg.to_fields())
    return msgpack.packb(body, use_bin_type=True)


def _no_ext(code: int, data: bytes) -> NoReturn:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def decode_message(body: bytes) -> WireMessage:
    """Parse one frame body into its registered message.

    :raises RemoteProtocolError: MALFORMED for anything invalid, UNEXPECTED_MESSAGE for an
        unknown type, or the code a registered `from_fields` chose (e.g. LIMIT_EXCEEDED).
        Nothing else escapes, whatever `body` holds.
    """
    limit = min(len(body), MAX_FRAME)  # no container or string can be longer than the frame
    # The max_*_len limits bound each container, not their sum: a frame of nested empty arrays
    # would build millions of lists. Count every array and map against one budget instead.
    budget = MAX_CONTAINERS

    def spend(container: Any) -> Any:
        nonlocal budget
        budget -= 1
        if budget < 0:
            raise RemoteProtocolError(f"more than {MAX_CONTAINERS} arrays and maps in one message", ErrorCode.MALFORMED)
        return container

    try:
        obj: Any = msgpack.unpackb(
            body,
            use_list=True,
            raw=False,
            strict_map_key=True,
            max_bin_len=limit,
            max_str_len=limit,
            max_array_len=limit,
            max_map_len=limit,
            max_ext_len=0,
            ext_hook=_no_ext,
            list_hook=spend,
            object_hook=spend,
        )
    except RemoteProtocolError:
        raise
    except Exception as exc:  # msgpack raises a zoo (ValueError, TypeError, StackError, ...)
        raise RemoteProtocolError(f"undecodable message ({type(exc).__name__}: {exc})", ErrorCode.MALFORMED) from exc
    if not isinstance(obj, dict):
        malformed("message is not a map")
    type_name = obj.pop("t", None)
    if not isinstance(type_name, str):
        malformed("message has no type")
    cls = _REGISTRY.get(type_name)
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {type_name[:32]!r}", ErrorCode.UNEXPECTED_MESSAGE)
    unknown = obj.keys() - cls.WIRE_FIELDS
    if unknown:
        malformed(f"{type_name} message has unknown fields: {sorted(map(str, unknown))[:5]}")
    try:
        return cls.from_fields(obj)
    except RemoteProtocolError:
        raise
    except Exception as exc:  # __post_init__'s LocalProtocolError, or a from_fields bug: still peer input
        raise RemoteProtocolError(f"invalid {type_name} message: {exc}", ErrorCode.MALFORMED) from exc


# -- the connection's own messages ----------------------------------------------------------------


def _version(value: object, what: str) -> int:
    return as_int(value, what, min_value=1, max_value=MAX_VERSION)


def _rotation(value: object, what: str) -> bytes:
    return as_bytes(value, what, max_len=MAX_ROTATION_LEN)


@register("hello")
@dataclass(frozen=True, slots=True)
class Hello(WireMessage):
    """First message of both sides: who I am, what I speak, and a fresh nonce."""

    versions: tuple[int, ...]
    device_id: str
    name: str
    cert: bytes
    nonce: bytes
    rotations: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        check(0 < len(self.versions) <= MAX_VERSIONS, "hello must offer 1 to 16 versions")
        check(all(1 <= v <= MAX_VERSION for v in self.versions), "versions must be in 1..65535")
        check(is_device_id(self.device_id), "device_id is not a device id")
        check(is_printable_text(self.name, MAX_NAME_LEN), "name must be 1 to 64 printable characters")
        check(0 < len(self.cert) <= MAX_CERT, f"cert must be 1 to {MAX_CERT} bytes")
        check(len(self.nonce) == NONCE_LEN, f"nonce must be {NONCE_LEN} bytes")
        check(len(self.rotations) <= MAX_ROTATIONS, f"at most {MAX_ROTATIONS} rotation statements")
        check(all(0 < len(r) <= MAX_ROTATION_LEN for r in self.rotations), "rotation statement size")

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> Hello:
        return cls(
            versions=field_list(fields, "versions", max_len=MAX_VERSIONS, item=_version),
            device_id=field_str(fields, "device_id", max_len=_DEVICE_ID_LEN),
            name=field_str(fields, "name", max_len=MAX_NAME_LEN),
            cert=field_bytes(fields, "cert", max_len=MAX_CERT),
            nonce=field_bytes(fields, "nonce", exact=NONCE_LEN),
            rotations=field_list(fields, "rotations", max_len=MAX_ROTATIONS, item=_rotation),
        )


@register("auth")
@dataclass(frozen=True, slots=True)
class Auth(WireMessage):
    """Client only: its signature over the auth transcript."""

    signature: bytes

    def __post_init__(self) -> None:
        check(0 < len(self.signature) <= MAX_SIGNATURE, f"signature must be 1 to {MAX_SIGNATURE} bytes")

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> Auth:
        return cls(signature=field_bytes(fields, "signature", max_len=MAX_SIGNATURE))


@register("ready")
@dataclass(frozen=True, slots=True)
class Ready(WireMessage):
    """The sender trusts the peer and will speak `version`."""

    version: int

    def __post_init__(self) -> None:
        check(1 <= self.version <= MAX_VERSION, "version must be in 1..65535")

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> Ready:
        return cls(version=field_int(fields, "version", min_value=1, max_value=MAX_VERSION))


@register("error")
@dataclass(frozen=True, slots=True)
class Error(WireMessage):
    """The sender is closing the connection, and why."""

    code: ErrorCode
    reason: str = ""

    def __post_init__(self) -> None:
        check(isinstance(self.code, ErrorCode), "code must be an ErrorCode")
        check(len(self.reason) <= MAX_REASON, f"reason is longer than {MAX_REASON} characters")
        check(self.reason.isprintable(), "reason must be printable")

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> Error:
        raw_code = field_str(fields, "code", max_len=64)
        try:
            code = ErrorCode(raw_code)
        except ValueError:
            code = ErrorCode.PROTOCOL_ERROR  # a newer peer's reason: still a close, shown generically
        return cls(code=code, reason=clean_reason(field_str(fields, "reason", max_len=MAX_REASON)))

    def to_fields(self) -> dict[str, object]:
        return {"code": self.code.value, "reason": self.reason}


def clean_reason(text: str) -> str:
    """`text` made fit for an ERROR reason: printable characters only, at most 200 of them."""
    return "".join(ch if ch.isprintable() else "?" for ch in text[:MAX_REASON])


@register("ping")
@dataclass(frozen=True, slots=True)
class Ping(WireMessage):
    """Keepalive probe; the peer answers with a PONG carrying the same `seq`."""

    seq: int

    def __post_init__(self) -> None:
        check(0 <= self.seq <= MAX_U64, "seq must fit in 64 bits")

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> Ping:
        return cls(seq=field_int(fields, "seq"))


@register("pong")
@dataclass(frozen=True, slots=True)
class Pong(WireMessage):
    """Answer to a PING."""

    seq: int

    def __post_init__(self) -> None:
        check(0 <= self.seq <= MAX_U64, "seq must fit in 64 bits")

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> Pong:
        return cls(seq=field_int(fields, "seq"))


CONTROL_TYPES: Final = (Hello, Auth, Ready, Error, Ping, Pong)
