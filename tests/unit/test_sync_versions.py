"""File versions: what a peer's change deletes or replaces is kept, listed, restored and cleaned up."""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

import pytest

from agent.errors import RemoteProtocolError
from agent.sync.messages import IndexUpdate
from agent.sync.model import FileInfo, FileType
from agent.sync.names import validate_name
from agent.sync.vectors import Vector
from agent.sync.versioning import (
    DAY,
    HOUR,
    VERSIONS_DIR,
    Kind,
    Versioning,
    expired,
    parse_version_path,
    version_path,
)
from testkit.engines import A_ID, B_ID, Net, tree, wire, write

NOW = 1_700_000_000.0


# -- the pure policy ----------------------------------------------------------------------------


def test_version_path_round_trips_and_marks_a_second_version_in_one_second() -> None:
    p = version_path("docs/a.txt", NOW)
    assert p.startswith(f"{VERSIONS_DIR}/docs/a.txt~")
    assert parse_version_path(p) == ("docs/a.txt", NOW)
    p2 = version_path("docs/a.txt", NOW + 0.5, attempt=1)
    assert p2 == p + "-2" and parse_version_path(p2) == ("docs/a.txt", NOW)
    assert parse_version_path("docs/a.txt~20261207-010203") is None  # not inside the versions dir
    assert parse_version_path(f"{VERSIONS_DIR}/a.txt") is None
    long = "x" * 255
    assert len(version_path(long, NOW).rpartition("/")[2].encode()) <= 255


def test_trash_keeps_keep_days() -> None:
    stamps = [NOW - 31 * DAY, NOW - 29 * DAY, NOW - 1]
    assert expired(stamps, Versioning(Kind.TRASH, keep_days=30), NOW) == {0}


def test_simple_keeps_exactly_n_newest() -> None:
    stamps = [NOW - i * 10 for i in range(8)]
    assert expired(stamps, Versioning(Kind.SIMPLE, keep=5), NOW) == {5, 6, 7}
    assert expired(stamps[:3], Versioning(Kind.SIMPLE, keep=5), NOW) == set()


def test_staggered_thins_to_one_an_hour_a_day_a_week_and_drops_after_a_year() -> None:
    # every 10 minutes for 3 hours: one an hour is left (the newest of each hour-long slot)
    recent = [NOW - i * 600 for i in range(18)]
    kept = [s for i, s in enumerate(recent) if i not in expired(recent, Versioning(Kind.STAGGERED), NOW)]
    assert kept == [NOW, NOW - HOUR, NOW - 2 * HOUR]
    # hourly for 10 days: within the first day hourly, after that one a day
    hourly = [NOW - i * HOUR for i in range(240)]
    gone = expired(hourly, Versioning(Kind.STAGGERED), NOW)
    kept = sorted((NOW - hourly[i]) / HOUR for i in range(240) if i not in gone)
    assert kept[:24] == list(range(24))
    assert all(b - a >= 24 for a, b in itertools.pairwise(kept[24:]))
    assert 8 <= len(kept) - 24 <= 10
    # older than a year: gone; off: nothing is touched
    assert expired([NOW - 400 * DAY], Versioning(Kind.STAGGERED), NOW) == {0}
    assert expired([NOW - 400 * DAY], Versioning(Kind.OFF), NOW) == set()


# -- engines ------------------------------------------------------------------------------------


def _paired(tmp_path: Path) -> Net:
    net = Net(tmp_path, [A_ID, B_ID])
    net.connect(A_ID, B_ID)
    write(net.root(A_ID) / "keep/x.txt", b"x, the original")
    write(net.root(A_ID) / "keep/y.txt", b"y, the original" * 1000)
    net.change(A_ID)
    net.settle()
    assert tree(net.root(B_ID)) == tree(net.root(A_ID))
    return net


def test_a_peers_deletion_and_overwrite_are_kept_listed_and_restored(tmp_path: Path) -> None:
    net = _paired(tmp_path)
    (net.root(B_ID) / "keep/x.txt").unlink()
    write(net.root(B_ID) / "keep/y.txt", b"y, B's overwrite")
    net.change(B_ID)
    net.settle()
    a = net.engines[A_ID]
    assert not (net.root(A_ID) / "keep/x.txt").exists()
    assert (net.root(A_ID) / "keep/y.txt").read_bytes() == b"y, B's overwrite"

    listed = {k.name: k for k in a.list_versions()}
    assert set(listed) == {"keep/x.txt", "keep/y.txt"}
    assert (net.root(A_ID) / listed["keep/x.txt"].path).read_bytes() == b"x, the original"
    assert (net.root(A_ID) / listed["keep/y.txt"].path).read_bytes() == b"y, the original" * 1000
    assert {k.by for k in listed.values()} == {B_ID}
    assert listed["keep/y.txt"].size == len(b"y, the original" * 1000)
    assert [k.name for k in a.list_versions("keep/y.txt")] == ["keep/y.txt"]
    # kept versions are ours alone: never scanned, never sent
    assert not (net.root(B_ID) / VERSIONS_DIR).exists() or not any((net.root(B_ID) / VERSIONS_DIR).rglob("x.txt*"))

    # restore both: a normal local change that reaches B
    for name in ("keep/x.txt", "keep/y.txt"):
        net.advance(1)
        _, out = a.restore(name, None, net.now)
        net._send(A_ID, out)
    net.settle()
    for dev in (A_ID, B_ID):
        assert (net.root(dev) / "keep/x.txt").read_bytes() == b"x, the original"
        assert (net.root(dev) / "keep/y.txt").read_bytes() == b"y, the original" * 1000
    # what the restore replaced (B's overwrite) is itself kept
    assert any((net.root(A_ID) / k.path).read_bytes() == b"y, B's overwrite" for k in a.list_versions("keep/y.txt"))
    with pytest.raises(LookupError):
        a.restore("keep/never.txt", None, net.now)


def test_restore_at_a_time_picks_the_version_kept_then(tmp_path: Path) -> None:
    net = _paired(tmp_path)
    first_at = net.wall
    for text in (b"second", b"third"):
        net.advance(10)
        write(net.root(B_ID) / "keep/x.txt", text)
        net.change(B_ID, ["keep/x.txt"])
        net.settle()
    a = net.engines[A_ID]
    assert [(net.root(A_ID) / k.path).read_bytes() for k in a.list_versions("keep/x.txt")] == [
        b"second",
        b"x, the original",
    ]
    net.advance(1)
    kept, out = a.restore("keep/x.txt", first_at + 15, net.now)
    net._send(A_ID, out)
    net.settle()
    assert (net.root(B_ID) / "keep/x.txt").read_bytes() == b"x, the original"
    assert kept.name == "keep/x.txt"


def test_a_trusted_peer_deleting_the_whole_tree_loses_nothing(tmp_path: Path) -> None:
    net = Net(tmp_path, [A_ID, B_ID])
    net.connect(A_ID, B_ID)
    files = {
        f"d{i}/e{j}/f{k}.bin": os.urandom(100 + i * 7 + j * 3 + k) for i in range(3) for j in range(3) for k in range(4)
    }
    for name, data in files.items():
        write(net.root(A_ID) / name, data)
    net.change(A_ID)
    net.settle()
    for d in net.root(B_ID).iterdir():
        if not d.name.startswith(".tofu-"):
            shutil.rmtree(d)
    net.change(B_ID)
    net.settle()
    assert set(tree(net.root(A_ID))) == set()
    kept = {k.name: (net.root(A_ID) / k.path).read_bytes() for k in net.engines[A_ID].list_versions()}
    assert kept == files


def test_simple_keeps_n_and_trash_expires_after_keep_days(tmp_path: Path) -> None:
    net = _paired(tmp_path)
    a = net.engines[A_ID]
    a.versions.policy = Versioning(Kind.SIMPLE, keep=2)
    for i in range(5):
        net.advance(2)
        write(net.root(B_ID) / "keep/x.txt", f"edit {i}".encode())
        net.change(B_ID, ["keep/x.txt"])
        net.settle()
    # `simple` holds at once for what this run keeps (the clean-up pass handles older versions)
    assert [(net.root(A_ID) / k.path).read_bytes() for k in a.list_versions("keep/x.txt")] == [b"edit 3", b"edit 2"]
    assert len(a.index.version_notes(k.path for k in a.list_versions())) == 2
    a.versions._recent.clear()  # as after a restart: the pass applies the rule to what is on disk
    a.versions.policy = Versioning(Kind.SIMPLE, keep=1)
    net.advance(3601)
    net.settle()
    assert [(net.root(A_ID) / k.path).read_bytes() for k in a.list_versions("keep/x.txt")] == [b"edit 3"]

    a.versions.policy = Versioning(Kind.TRASH, keep_days=1)
    net.advance(DAY + 3601)
    net.settle()
    assert a.list_versions() == []
    assert not list((net.root(A_ID) / VERSIONS_DIR).rglob("*"))  # emptied directories go too


def test_versioning_off_keeps_nothing(tmp_path: Path) -> None:
    net = _paired(tmp_path)
    net.engines[A_ID].versions.policy = Versioning(Kind.OFF)
    (net.root(B_ID) / "keep/x.txt").unlink()
    net.change(B_ID)
    net.settle()
    assert net.engines[A_ID].list_versions() == []


def test_a_short_disk_removes_the_oldest_versions_first_and_status_says_so(tmp_path: Path) -> None:
    net = _paired(tmp_path)
    write(net.root(B_ID) / "keep/x.txt", b"a new x")
    net.change(B_ID)
    net.settle()
    a = net.engines[A_ID]
    assert len(a.list_versions()) == 1
    a.min_free_fraction = 1.0  # the disk is "full": no pull fits
    write(net.root(B_ID) / "keep/z.txt", b"z")
    net.change(B_ID)
    net.settle()
    assert a.list_versions() == []
    assert a.status().versions_evicted == 1


def test_a_peer_cannot_name_a_path_in_the_versions_directory(tmp_path: Path) -> None:
    with pytest.raises(RemoteProtocolError):
        validate_name(f"{VERSIONS_DIR}/keep/x.txt~20261207-010203")
    net = _paired(tmp_path)
    bad = FileInfo(
        f"{VERSIONS_DIR}/planted.txt", FileType.FILE, 0, 0, False, False, Vector().bump(B_ID, 1), 1, 0, b"", B_ID
    )
    with pytest.raises(RemoteProtocolError):  # refused where the message is decoded, before any engine
        wire(IndexUpdate("default", (bad,)))
    assert not (net.root(A_ID) / VERSIONS_DIR / "planted.txt").exists()
