"""Soak finding (seed 7, 5 agents): one device's two versions of a file with one mtime (a chmod
keeps the mtime), each merged with other devices' counters elsewhere, were concurrent, equal in
mtime and `modified_by`, and different in content (the exec bit). The conflict rule then said
"neither wins" on both sides: each kept its own and the folders never agreed. The rule is now a
total order: of two records that differ, exactly one wins, whoever compares them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.sync.model import FileInfo, FileType
from agent.sync.planner import Action, decide, wins
from agent.sync.vectors import Vector

A, B, C = "A" * 32, "B" * 32, "C" * 32
H1, H2 = b"\x01" * 32, b"\x02" * 32


def _rec(executable: bool, version: Vector, hashes: bytes = H1, size: int = 10, mtime: int = 5) -> FileInfo:
    return FileInfo("a6.txt", FileType.FILE, size, mtime, executable, False, version, 1, 131072, hashes, B)


def test_a_chmod_merged_differently_on_two_devices_has_exactly_one_winner() -> None:
    before_chmod = _rec(False, Vector().bump(B, 10).bump(C, 31))  # merged with C's counter on one device
    after_chmod = _rec(True, Vector().bump(B, 11).bump(A, 48))  # chmod by B, merged with A's elsewhere
    assert before_chmod.version.compare(after_chmod.version).name == "CONCURRENT"
    one, other = decide(before_chmod, after_chmod), decide(after_chmod, before_chmod)
    # exactly one side takes the other's version (and keeps its own as a conflict copy)
    assert sorted([one.action is Action.NONE, other.action is Action.NONE]) == [False, True]
    acting = one if one.action is not Action.NONE else other
    assert acting.conflict_name is not None and ".sync-conflict-" in acting.conflict_name


records = st.builds(
    _rec,
    st.booleans(),
    st.just(Vector().bump(A, 1)),
    st.sampled_from([H1, H2]),
    st.sampled_from([10, 11]),
    st.sampled_from([5, 6]),
)


@given(records, records)
def test_of_two_different_records_exactly_one_wins(a: FileInfo, b: FileInfo) -> None:
    if a.same_content(b) and a.mtime_ns == b.mtime_ns:
        return
    assert wins(a, b) != wins(b, a)
