"""Pure pieces of sync: vectors, names, ignore patterns, block sizes, messages, planner."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import ErrorCode, RemoteProtocolError
from agent.sync.blocks import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, block_size_for, hash_bytes
from agent.sync.ignore import Ignore
from agent.sync.messages import (
    MAX_FILES_PER_MESSAGE,
    MESSAGE_TYPES,
    BlockError,
    FolderHello,
    Index,
    Request,
    Response,
    SyncMessage,
    file_from_wire,
    file_to_wire,
)  # fmt: skip
from agent.sync.model import FileInfo, FileType
from agent.sync.names import BadPath, validate_name
from agent.sync.planner import Action, conflict_name, decide
from agent.sync.vectors import Ordering, Vector

DEVS = ["A" * 32, "B" * 32, "C" * 32]
vectors = st.dictionaries(st.sampled_from(DEVS), st.integers(0, 5)).map(Vector.of)


@given(vectors, vectors)
def test_vector_compare_is_antisymmetric(a: Vector, b: Vector) -> None:
    flip = {Ordering.GREATER: Ordering.LESSER, Ordering.LESSER: Ordering.GREATER}
    assert b.compare(a) == flip.get(a.compare(b), a.compare(b))
    assert (a.compare(b) is Ordering.EQUAL) == (a == b)


@given(vectors, vectors)
def test_merge_dominates_both(a: Vector, b: Vector) -> None:
    m = a.merge(b)
    assert m.compare(a) in (Ordering.GREATER, Ordering.EQUAL)
    assert m.compare(b) in (Ordering.GREATER, Ordering.EQUAL)
    assert m == b.merge(a)


@given(vectors, st.sampled_from(DEVS))
def test_bump_is_greater(a: Vector, dev: str) -> None:
    assert a.bump(dev).compare(a) is Ordering.GREATER


@pytest.mark.parametrize(
    "name",
    ["../x", "a/../../x", "/etc/passwd", "a//b", "a/./b", "a\x00b", "a\nb", "a\\b", "", "x/", "a/.tofu-tmp-1",
     ".tofu-index.db", "é" * 200, "a/" * 2100, "cafe\u0301"],
)  # fmt: skip
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(BadPath) as info:
        validate_name(name)
    assert info.value.code is ErrorCode.BAD_PATH


@pytest.mark.parametrize("name", ["a", "dir/sub/file.txt", ".tofuignore", "..hidden", "日本/語", "a b"])
def test_good_names_pass(name: str) -> None:
    assert validate_name(name) == name


def test_ignore_patterns() -> None:
    ig = Ignore.from_text("# comment\n*.log\n!keep.log\nbuild/\n/top\nx/**/z\n")
    assert ig.matches("a.log") and ig.matches("d/a.log") and not ig.matches("keep.log")
    assert ig.matches("build", is_dir=True) and ig.matches("build/deep/f") and not ig.matches("build")
    assert ig.matches("top") and not ig.matches("d/top")
    assert ig.matches("x/1/2/z") and not ig.matches("x/1/2/y")
    assert ig.matches(".tofu-tmp-abc") and ig.matches("d/.tofu-tmp-abc") and not ig.matches(".tofuignore")


def test_block_size_grows() -> None:
    assert block_size_for(0) == MIN_BLOCK_SIZE
    assert block_size_for(250 * 1024 * 1024) == MIN_BLOCK_SIZE
    assert block_size_for(1024**3) == 1024 * 1024
    assert block_size_for(100 * 1024**3) == MAX_BLOCK_SIZE
    for size in (1, 10**6, 10**9, 10**10):
        bs = block_size_for(size)
        assert bs == MAX_BLOCK_SIZE or -(-size // bs) <= 2000


def _file(name: str = "f", **kw: object) -> FileInfo:
    data = kw.pop("data", b"hello")
    assert isinstance(data, bytes)
    base = FileInfo(name, FileType.FILE, len(data), 10**18, False, False, Vector.of({DEVS[0]: 1}), 1,
                    MIN_BLOCK_SIZE, hash_bytes(data, MIN_BLOCK_SIZE), DEVS[0])  # fmt: skip
    return base.replace(**kw)


def test_file_round_trips() -> None:
    f = _file(data=b"x" * 300_000)
    assert file_from_wire(msgpack.unpackb(msgpack.packb(file_to_wire(f)))) == f


def test_index_with_too_many_files_is_refused_cheaply() -> None:
    fields: dict[str, object] = {"folder": "default", "files": [None] * (MAX_FILES_PER_MESSAGE + 1)}
    with pytest.raises(RemoteProtocolError) as info:
        Index.from_fields(fields)
    assert info.value.code is ErrorCode.LIMIT_EXCEEDED


def test_hostile_fields_are_refused() -> None:
    bad = file_to_wire(_file())
    bad[8] = b"short"
    with pytest.raises(RemoteProtocolError):
        file_from_wire(bad)
    with pytest.raises(RemoteProtocolError):
        Request.from_fields({"folder": "d", "name": "../x", "offset": 0, "size": 1, "hash": b"0" * 32, "request_id": 1})
    with pytest.raises(RemoteProtocolError):
        Response.from_fields({"request_id": 1, "data": b"", "error": "bogus"})
    with pytest.raises(RemoteProtocolError):
        FolderHello.from_fields({"folder": "d", "index_id": b"1" * 16, "have_index_id": b"", "have_sequence": True})
    assert Response.from_fields({"request_id": 1, "data": b"", "error": "not_found"}).error is BlockError.NOT_FOUND


@given(st.sampled_from(MESSAGE_TYPES), st.dictionaries(st.text(max_size=20), st.from_type(object), max_size=8))
def test_random_fields_parse_or_raise(kind: type[SyncMessage], fields: dict[str, object]) -> None:
    try:
        kind.from_fields(fields)
    except RemoteProtocolError:
        pass


def test_planner_conflict_rules() -> None:
    base = Vector.of({DEVS[0]: 1})
    mine = _file(data=b"mine", version=base.bump(DEVS[0]), mtime_ns=2 * 10**18, modified_by=DEVS[0])
    theirs = _file(data=b"theirs", version=base.bump(DEVS[1]), mtime_ns=10**18, modified_by=DEVS[1])
    assert decide(mine, theirs).action is Action.NONE  # ours is newer: the holder of theirs acts
    d = decide(theirs, mine)
    assert d.action is Action.PULL and d.conflict_name == conflict_name(theirs)
    assert d.target is not None and d.target.version == mine.version.merge(theirs.version)
    gone = theirs.replace(deleted=True, size=0, block_size=0, hashes=b"")
    assert decide(mine, gone).action is Action.NONE  # an edit beats a concurrent delete
    assert decide(gone, mine).action is Action.PULL and decide(gone, mine).conflict_name is None
    assert conflict_name(_file("a/b.tar.gz", mtime_ns=0)) == "a/b.tar.sync-conflict-19700101-000000-AAAAAAA.gz"
    assert conflict_name(_file(".bashrc", mtime_ns=0)) == ".bashrc.sync-conflict-19700101-000000-AAAAAAA"
