"""Sync messages: folder hello, index, index update, block request/response, progress (pure).

Theory: each message is a frozen dataclass registered with the wire registry
(`agent.wire.messages.register`; its wire name is `TYPE`, also kept as `KIND`), with `to_fields()`
giving plain msgpack-able values and `from_fields()` that treats its input as hostile: exact
types, bounded lengths and counts, validated names; anything else raises RemoteProtocolError
(MALFORMED, or LIMIT_EXCEEDED for counts, or BAD_PATH for names). The wire layer adds the type
and framing, and rejects unknown keys before `from_fields` runs. Sizes are bounded so every
message fits a 4 MiB frame: a block is at most 2 MiB, a file's hash list at most 2 MiB, and
senders batch index messages to at most `INDEX_BATCH_BYTES`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, Self, TypeVar

from agent.errors import ErrorCode, RemoteProtocolError
from agent.identity.ids import is_device_id
from agent.sync.blocks import HASH_LEN, MAX_BLOCK_SIZE, MAX_FILE_SIZE, block_count, is_valid_block_size
from agent.sync.model import FileInfo, FileType
from agent.sync.names import validate_name
from agent.sync.vectors import MAX_COUNTER, Vector
from agent.wire.messages import WireMessage, register

MAX_FILES_PER_MESSAGE = 10_000
INDEX_BATCH_BYTES = 1024 * 1024  # senders cut index messages at about this many encoded bytes
MAX_VECTOR_ENTRIES = 256
MAX_FOLDER_ID = 64
INDEX_ID_LEN = 16
MAX_REQUEST_ID = 2**32 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLAG_DELETED = 1
FLAG_EXEC = 2

T = TypeVar("T")


def _malformed(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"malformed sync message: {what}", ErrorCode.MALFORMED)


def _get(fields: dict[str, object], key: str, kind: type[T]) -> T:
    value = fields.get(key)
    # bool is an int subclass: never accept one where a number is expected, or the reverse
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _malformed(f"{key!r} must be {kind.__name__}")
    return value


def _int(value: object, what: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _malformed(f"{what} must be an integer in [{lo}, {hi}]")
    return value


def _folder(fields: dict[str, object]) -> str:
    folder = _get(fields, "folder", str)
    if not 0 < len(folder) <= MAX_FOLDER_ID or not folder.isprintable():
        raise _malformed("bad folder id")
    return folder


def _device(value: object, what: str) -> str:
    if not is_device_id(value):
        raise _malformed(f"{what} is not a device id")
    assert isinstance(value, str)
    return value


def vector_to_wire(v: Vector) -> dict[str, int]:
    """A version vector as a msgpack map."""
    return dict(v.counters)


def vector_from_wire(value: object) -> Vector:
    """Parse a version vector map from a peer."""
    if not isinstance(value, dict):
        raise _malformed("version must be a map")
    if len(value) > MAX_VECTOR_ENTRIES:
        raise RemoteProtocolError("version vector too long", ErrorCode.LIMIT_EXCEEDED)
    return Vector.of({_device(d, "version key"): _int(c, "version counter", 1, MAX_COUNTER) for d, c in value.items()})


def file_to_wire(f: FileInfo) -> list[object]:
    """A FileInfo as the positional list the protocol sends (inode stays local)."""
    flags = (FLAG_DELETED if f.deleted else 0) | (FLAG_EXEC if f.executable else 0)
    return [
        f.name, int(f.type), f.size, f.mtime_ns, flags, vector_to_wire(f.version),
        f.sequence, f.block_size, f.hashes, f.modified_by,
    ]  # fmt: skip


def file_from_wire(value: object) -> FileInfo:
    """Parse and validate one FileInfo from a peer."""
    if not isinstance(value, list | tuple) or len(value) != 10:
        raise _malformed("file entry must be a list of 10")
    name, ftype, size, mtime_ns, flags, version, sequence, block_size, hashes, modified_by = value
    name = validate_name(name)
    ftype = FileType(_int(ftype, "type", 0, 1))
    size = _int(size, "size", 0, MAX_FILE_SIZE)
    mtime_ns = _int(mtime_ns, "mtime_ns", INT64_MIN, INT64_MAX)
    flags = _int(flags, "flags", 0, FLAG_DELETED | FLAG_EXEC)
    deleted = bool(flags & FLAG_DELETED)
    vec = vector_from_wire(version)
    if not vec.counters:
        raise _malformed("empty version vector")
    sequence = _int(sequence, "sequence", 1, INT64_MAX)
    block_size = _int(block_size, "block_size", 0, MAX_BLOCK_SIZE)
    if not isinstance(hashes, bytes):
        raise _malformed("hashes must be bytes")
    if ftype is FileType.FILE and not deleted:
        if not is_valid_block_size(block_size) or len(hashes) != HASH_LEN * block_count(size, block_size):
            raise _malformed("block size or hash list does not match the file size")
    elif size or block_size or hashes:
        raise _malformed("a directory or deleted file has no size or blocks")
    return FileInfo(
        name=name, type=ftype, size=size, mtime_ns=mtime_ns, executable=bool(flags & FLAG_EXEC),
        deleted=deleted, version=vec, sequence=sequence, block_size=block_size, hashes=hashes,
        modified_by=_device(modified_by, "modified_by"),
    )  # fmt: skip


def wire_size(f: FileInfo) -> int:
    """An upper bound of the encoded size of a FileInfo, for batching."""
    return 64 + len(f.name.encode("utf-8", "surrogatepass")) + len(f.hashes) + 48 * len(f.version.counters)


def _index_fields(fields: dict[str, object]) -> tuple[str, tuple[FileInfo, ...]]:
    folder = _folder(fields)
    files = _get(fields, "files", list)
    if len(files) > MAX_FILES_PER_MESSAGE:
        raise RemoteProtocolError(
            f"index message with {len(files)} files (at most {MAX_FILES_PER_MESSAGE})", ErrorCode.LIMIT_EXCEEDED
        )
    return folder, tuple(file_from_wire(f) for f in files)


@register("folder_hello")
@dataclass(frozen=True, slots=True)
class FolderHello(WireMessage):
    """Sent first for each shared folder: my index id, and how much of yours I already hold."""

    KIND: ClassVar[str] = "folder_hello"
    folder: str
    index_id: bytes  # identifies the sender's index; a new one means "forget what you had"
    have_index_id: bytes  # the receiver's index id the sender holds data from (b"" if none)
    have_sequence: int  # the highest sequence of the receiver's index the sender holds

    def to_fields(self) -> dict[str, object]:
        return {"folder": self.folder, "index_id": self.index_id, "have_index_id": self.have_index_id,
                "have_sequence": self.have_sequence}  # fmt: skip

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> Self:
        """:raises RemoteProtocolError: on any malformed field."""
        index_id = _get(fields, "index_id", bytes)
        have = _get(fields, "have_index_id", bytes)
        if len(index_id) != INDEX_ID_LEN or len(have) not in (0, INDEX_ID_LEN):
            raise _malformed("bad index id")
        seq = _int(fields.get("have_sequence"), "have_sequence", 0, INT64_MAX)
        return cls(_folder(fields), index_id, have, seq)


@register("index")
@dataclass(frozen=True, slots=True)
class Index(WireMessage):
    """The first batch of a full index: the receiver forgets what it held from the sender."""

    KIND: ClassVar[str] = "index"
    folder: str
    files: tuple[FileInfo, ...]

    def to_fields(self) -> dict[str, object]:
        return {"folder": self.folder, "files": [file_to_wire(f) for f in self.files]}

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> Self:
        """:raises RemoteProtocolError: on a malformed entry, a bad name, or too many files."""
        return cls(*_index_fields(fields))


@register("index_update")
@dataclass(frozen=True, slots=True)
class IndexUpdate(Index):
    """More files of the sender's index, in increasing sequence order; applied on top."""

    KIND: ClassVar[str] = "index_update"

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> Self:
        """:raises RemoteProtocolError: on a malformed entry, a bad name, or too many files."""
        return cls(*_index_fields(fields))


class BlockError(StrEnum):
    """Why a block request could not be served."""

    NONE = ""
    NOT_FOUND = "not_found"  # no such file or block in the current version
    CHANGED = "changed"  # the file changed on disk since it was indexed
    INVALID = "invalid"  # the request itself made no sense


@register("request")
@dataclass(frozen=True, slots=True)
class Request(WireMessage):
    """Ask for one block of the sender's current version of `name`."""

    KIND: ClassVar[str] = "request"
    folder: str
    name: str
    offset: int
    size: int
    hash: bytes
    request_id: int

    def to_fields(self) -> dict[str, object]:
        return {"folder": self.folder, "name": self.name, "offset": self.offset, "size": self.size,
                "hash": self.hash, "request_id": self.request_id}  # fmt: skip

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> Self:
        """:raises RemoteProtocolError: on any malformed field."""
        digest = _get(fields, "hash", bytes)
        if len(digest) != HASH_LEN:
            raise _malformed("hash must be 32 bytes")
        return cls(
            _folder(fields), validate_name(fields.get("name")),
            _int(fields.get("offset"), "offset", 0, MAX_FILE_SIZE),
            _int(fields.get("size"), "size", 1, MAX_BLOCK_SIZE), digest,
            _int(fields.get("request_id"), "request_id", 0, MAX_REQUEST_ID),
        )  # fmt: skip


@register("response")
@dataclass(frozen=True, slots=True)
class Response(WireMessage):
    """The data of a requested block, or why there is none."""

    KIND: ClassVar[str] = "response"
    request_id: int
    data: bytes
    error: BlockError = BlockError.NONE

    def to_fields(self) -> dict[str, object]:
        return {"request_id": self.request_id, "data": self.data, "error": str(self.error)}

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> Self:
        """:raises RemoteProtocolError: on any malformed field."""
        data = _get(fields, "data", bytes)
        if len(data) > MAX_BLOCK_SIZE:
            raise RemoteProtocolError("block larger than 2 MiB", ErrorCode.LIMIT_EXCEEDED)
        try:
            error = BlockError(_get(fields, "error", str))
        except ValueError as exc:
            raise _malformed("unknown block error") from exc
        if error is not BlockError.NONE and data:
            raise _malformed("an error response carries no data")
        return cls(_int(fields.get("request_id"), "request_id", 0, MAX_REQUEST_ID), data, error)


@register("progress")
@dataclass(frozen=True, slots=True)
class Progress(WireMessage):
    """The sender's remaining work on a folder, for the receiver's `status`."""

    KIND: ClassVar[str] = "progress"
    folder: str
    need_files: int
    need_bytes: int

    def to_fields(self) -> dict[str, object]:
        return {"folder": self.folder, "need_files": self.need_files, "need_bytes": self.need_bytes}

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> Self:
        """:raises RemoteProtocolError: on any malformed field."""
        return cls(
            _folder(fields), _int(fields.get("need_files"), "need_files", 0, INT64_MAX),
            _int(fields.get("need_bytes"), "need_bytes", 0, INT64_MAX),
        )  # fmt: skip


SyncMessage = FolderHello | Index | IndexUpdate | Request | Response | Progress
MESSAGE_TYPES: tuple[type[SyncMessage], ...] = (FolderHello, Index, IndexUpdate, Request, Response, Progress)


def next_batch(
    files: Iterator[FileInfo], budget: int = INDEX_BATCH_BYTES, max_files: int = MAX_FILES_PER_MESSAGE
) -> tuple[list[FileInfo], bool]:
    """The next records of `files` that fit one index message, and whether any are left after them."""
    batch: list[FileInfo] = []
    size = 0
    for f in files:
        w = wire_size(f)
        if batch and (size + w > budget or len(batch) >= max_files):
            return batch, True
        batch.append(f)
        size += w
    return batch, False
