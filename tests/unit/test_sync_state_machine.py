"""A hypothesis state machine: three sync engines, a hostile-but-honest network, local edits, crashes.

Three `SyncEngine`s over temp folders are joined by the in-memory network `Net` of the test
support (every message goes through the real wire codec). The machine interleaves at random:

- delivery in random order *across* links: each rule delivers the head of a randomly chosen
  (sender, receiver) queue. Messages of one link stay in order, as on the ordered TLS stream a
  real link is; messages of different links (A->B, B->A, A->C, ...) overtake each other freely;
- delays: nothing forces delivery, so messages wait while edits, scans, crashes and timers run;
- dropped links (`peer_disconnected` on both ends, their queued messages lost) and reconnections;
- crashes (the engine dropped without flushing, as SIGKILL) and restarts;
- time passing (`handle_timer` on every engine: stalls, retries, rescans);
- local edits on a random folder: create, overwrite, delete and rename files, make, remove and
  rename directories, then tell the engine the names, or run a full scan, or tell it nothing
  (the final full scan finds it).

At quiescence (a mid-run rule and the end of every example: restart everything, reconnect every
pair, then full scans and settling until a round sends nothing) it checks:

- all three trees are equal (content, exec bit, directories, mtimes), temp files and marker aside;
- no temp file is left in any folder, and no engine still needs anything;
- every file's content was written at that name (or, for a conflict copy `NAME.sync-conflict-...`,
  at NAME) by this test, or moved there by one of its renames: nothing is invented, torn or
  misplaced;
- every write is still there, at its name or as a conflict copy of that name, unless a later
  local event replaced it on a device that had it: the writer itself, or a device whose index
  held that version (a scan then makes the change a newer version of it). Concurrent edits keep
  both versions and a deletion racing an edit loses, so a write can only be lost by a bug;
- a name whose last event was a write exists on every replica, and so does a directory that
  nobody ever deleted;
- nothing outside the three folders was touched: the temp directory holds only the folders, the
  index databases and a canary directory whose file is unchanged.

File names and directory names come from disjoint pools (`f0`, `f1`, `g.txt` / `d0`, `d1`,
`dX/e0`), so a name never changes kind; a directory rename keeps depth (`d0` <-> `d1`,
`d0/e0` <-> `d1/e0`), so every name stays in the pools. Every write gets a fresh mtime (one
second after the previous), so (name, size, mtime, inode) can never make a changed file look
unchanged to the scanner, and a version's mtime names the write it came from. A rename keeps the
mtime and inode (moved back, nothing happened as far as any scan can tell), so it counts as the
content of its new name but not as a new version.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from agent.sync.index import FolderIndex
from agent.sync.model import FileInfo, FileType
from testkit.engines import A_ID, B_ID, C_ID, Net, tree

IDS = (A_ID, B_ID, C_ID)
PAIRS = ((A_ID, B_ID), (A_ID, C_ID), (B_ID, C_ID))
FILE_NAMES = ("f0", "f1", "g.txt")
DIR_NAMES = ("d0", "d1", "d0/e0", "d1/e0")
PARENTS = ("", *DIR_NAMES)
SIZES = (0, 5, 40, 300_000)  # 300,000 bytes: three blocks of 128 KiB, partly shared with other big files
CONFLICT = re.compile(r"^(?P<stem>.*)\.sync-conflict-\d{8}-\d{6}-[A-Z2-7]{1,7}(?:-\d+)?(?P<ext>\.[^./]+)?$")
QUIESCE_ROUNDS = 6
# Two bugs this machine found need a directory renamed while a pull writes a temp file inside it;
# both are fixed (a stray temp is deleted by the next scan; a temp another pull holds is never
# resumed), so the machine renames such directories too. Their reproductions are below:
#   test_a_temp_file_moved_with_its_directory_is_deleted_by_the_next_scan
#   test_a_pull_whose_temp_file_was_moved_away_does_not_tear_another_file
KNOWN_BUGS_WITH_MOVED_TEMPS = False
CANARY = b"the canary next to the folders must never change"


def base_name(name: str) -> str:
    """The name a (possibly nested) conflict copy was made from; other names are their own base."""
    parent, _, leaf = name.rpartition("/")
    while (m := CONFLICT.match(leaf)) is not None:
        leaf = m["stem"] + (m["ext"] or "")
    return f"{parent}/{leaf}" if parent else leaf


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + "/")


def full_tree(root: Path) -> dict[str, tuple[bytes | None, bool, int]]:
    """`tree` plus each file's mtime (directories' mtimes are not synced)."""
    out: dict[str, tuple[bytes | None, bool, int]] = {}
    for name, (data, exe) in tree(root).items():
        out[name] = (data, exe, (root / name).stat().st_mtime_ns if data is not None else 0)
    return out


@dataclass
class Write:
    """One write the test made: `data` at `name` on `dev`, with a fresh mtime."""

    name: str
    data: bytes
    dev: str
    mtime_ns: int
    superseded: bool = False  # a later local event on a device that had it (or on `dev`) replaced it


def short(entry: tuple[bytes | None, bool, int]) -> str:
    data, exe, mtime = entry
    return "dir" if data is None else f"{data[:24]!r}{'...' if len(data) > 24 else ''} exe={exe} mtime={mtime}"


class ShuffledNet(Net):
    """`Net` with delivery in any order across links (FIFO within one), dropped links and timers."""

    def links_with_mail(self) -> list[tuple[str, str]]:
        seen: dict[tuple[str, str], None] = {}
        for src, dst, _ in self.queue:
            seen.setdefault((src, dst), None)
        return list(seen)

    def deliver_head(self, link: tuple[str, str]) -> None:
        """Deliver the oldest queued message of `link` (through `Net.step`, so the engine calls
        stay Net's)."""
        i = next(i for i, m in enumerate(self.queue) if m[:2] == link)
        self.queue.insert(0, self.queue.pop(i))
        self.step(limit=1)

    def drop_link(self, a: str, b: str) -> None:
        """Both ends see the session close; what was in flight on it is lost."""
        self.links.discard((a, b))
        self.links.discard((b, a))
        for x, y in ((a, b), (b, a)):
            if x in self.engines:
                self.engines[x].peer_disconnected(y)
        self.queue = [m for m in self.queue if {m[0], m[1]} != {a, b}]

    def run_timers(self, dt: float) -> None:
        """Let `dt` seconds pass, and let every engine act on its timers (as the shell would)."""
        self.advance(dt)
        for dev, eng in list(self.engines.items()):
            self._send(dev, eng.handle_timer(self.now))
            self.finish_scan(dev)


class SyncMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="ta-sm-"))
        (self.tmp / "canary").mkdir()
        (self.tmp / "canary" / "keep.txt").write_bytes(CANARY)
        self.canary_stat = (self.tmp / "canary" / "keep.txt").stat()
        self.net = ShuffledNet(self.tmp, list(IDS))
        self.t = 0  # the model's clock: one tick per local event
        self.contents: dict[str, set[bytes]] = {}  # base name -> every content ever written there
        self.last_write: dict[str, tuple[int, bytes]] = {}  # pool file name -> (t, content) of its last write
        self.last_delete: dict[str, int] = {}  # name -> t of its last deletion (or rename away)
        self.dir_made: dict[str, int] = {}  # directory -> t it was last made
        self.writes = 0  # unique content tags and mtimes
        self.busy = False  # a rule is running; still set in teardown if it raised
        self.write_log: list[Write] = []

    # -- helpers ---------------------------------------------------------------------------------

    def root(self, dev: str) -> Path:
        return self.net.root(dev)

    def tick(self) -> int:
        self.t += 1
        return self.t

    def next_mtime_ns(self) -> int:
        self.writes += 1
        return (1_700_000_000 + self.writes) * 1_000_000_000

    def on_disk(self, dev: str) -> tuple[list[str], list[str]]:
        """(files, directories) in `dev`'s folder, sorted, temp files and the marker left out."""
        files: list[str] = []
        dirs: list[str] = []
        for name, (data, _exe) in tree(self.root(dev)).items():
            (dirs if data is None else files).append(name)
        return sorted(files), sorted(dirs)

    def made_parents(self, dev: str, parent: str) -> list[str]:
        """Create `parent` (and what is above it) in `dev`'s folder; the directories that were new."""
        new: list[str] = []
        parts = parent.split("/") if parent else []
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if not (self.root(dev) / d).is_dir():
                (self.root(dev) / d).mkdir()
                self.dir_made[d] = self.tick()
                new.append(d)
        return new

    def record_of(self, dev: str, name: str) -> FileInfo | None:
        """What `dev`'s index says of `name` (read beside the engine, or from its database if it is down)."""
        eng = self.net.engines.get(dev)
        if eng is not None:
            return eng.index.local(name)
        index = FolderIndex(self.tmp / f"{dev[:1]}.db", read_only=True)
        try:
            return index.local(name)
        finally:
            index.close()

    def touch(self, dev: str, prefixes: list[str]) -> None:
        """A local event on `dev` is about to replace what is at (or below) `prefixes`: the writes
        there that `dev` had are superseded (its own, and those its index holds: a scan makes the
        change a newer version of them). So are the writes whose conflict copy there goes."""
        disk = tree(self.root(dev))
        for w in self.write_log:
            if w.superseded:
                continue
            if any(under(w.name, p) for p in prefixes):
                if w.dev == dev:
                    w.superseded = True
                    continue
                rec = self.record_of(dev, w.name)
                if rec is not None and not rec.deleted and rec.type is FileType.FILE:
                    # mtimes are unique per write; all empty writes have the same (empty) content
                    if rec.mtime_ns == w.mtime_ns or (not w.data and rec.size == 0):
                        w.superseded = True
                        continue
            for k, (data, _exe) in disk.items():
                if k != w.name and data == w.data and base_name(k) == w.name and any(under(k, p) for p in prefixes):
                    w.superseded = True

    def record_write(self, name: str, data: bytes) -> None:
        """A write with a fresh mtime: the engine that scans it sees a new version."""
        self.contents.setdefault(base_name(name), set()).add(data)
        self.last_write[name] = (self.tick(), data)

    def record_moved_in(self, name: str, data: bytes) -> None:
        """A file moved to `name` keeps its mtime and inode: moved back where it was, no scan can
        tell that anything happened (nor should it). So it counts as the content of `name` but not
        as a new version; it supersedes what was at `name` on this device, like a deletion."""
        self.contents.setdefault(base_name(name), set()).add(data)
        self.last_delete[name] = self.tick()

    def record_delete_under(self, prefix: str) -> None:
        """`prefix` and everything below it (known to anybody) is deleted now."""
        t = self.tick()
        names = {prefix, *self.last_write, *self.dir_made, *self.contents}
        for name in names:
            if under(name, prefix):
                self.last_delete[name] = t

    def tell(self, dev: str, how: str, names: list[str]) -> None:
        """Let `dev`'s engine see its disk: by names (as file-system events), a full scan, or not yet."""
        if dev not in self.net.engines or how == "later":
            return
        self.net.change(dev, sorted(set(names)) if how == "names" else None)

    # -- network ---------------------------------------------------------------------------------

    @initialize(
        seeds=st.lists(
            st.tuples(
                st.sampled_from(IDS), st.sampled_from(PARENTS), st.sampled_from(FILE_NAMES), st.sampled_from(SIZES)
            ),
            max_size=6,
        )
    )
    def start(self, seeds: list[tuple[str, str, str, int]]) -> None:
        """Files on the folders before the engines first meet (each finds its own in a full scan)."""
        self.busy = True
        for dev, parent, leaf, size in seeds:
            self.write_file(dev, parent, leaf, size, "full")
        for a, b in PAIRS:
            self.net.connect(a, b)
        self.busy = False

    @precondition(lambda self: bool(self.net.queue))
    @rule(picks=st.lists(st.integers(0, 1 << 16), min_size=1, max_size=12))
    def deliver(self, picks: list[int]) -> None:
        self.busy = True
        for p in picks:
            links = self.net.links_with_mail()
            if not links:
                break
            self.net.deliver_head(links[p % len(links)])
        self.busy = False

    @precondition(lambda self: bool(self.net.links))
    @rule(pair=st.sampled_from(PAIRS))
    def drop_link(self, pair: tuple[str, str]) -> None:
        self.busy = True
        if pair in self.net.links:
            self.net.drop_link(*pair)
        self.busy = False

    @rule(pair=st.sampled_from(PAIRS))
    def reconnect(self, pair: tuple[str, str]) -> None:
        self.busy = True
        a, b = pair
        if pair not in self.net.links and a in self.net.engines and b in self.net.engines:
            self.net.connect(a, b)
        self.busy = False

    @rule(dev=st.sampled_from(IDS))
    def crash(self, dev: str) -> None:
        self.busy = True
        if dev in self.net.engines:
            self.net.crash(dev)
        self.busy = False

    @rule(dev=st.sampled_from(IDS))
    def restart(self, dev: str) -> None:
        self.busy = True
        if dev not in self.net.engines:
            self.net.open(dev)
        self.busy = False

    @rule(dt=st.sampled_from([0.5, 2.0, 61.0, 130.0]))
    def time_passes(self, dt: float) -> None:
        self.busy = True
        self.net.run_timers(dt)
        self.busy = False

    # -- local edits -----------------------------------------------------------------------------

    @rule(
        dev=st.sampled_from(IDS),
        parent=st.sampled_from(PARENTS),
        leaf=st.sampled_from(FILE_NAMES),
        size=st.sampled_from(SIZES),
        how=st.sampled_from(["names", "full", "later"]),
    )
    def write_file_rule(self, dev: str, parent: str, leaf: str, size: int, how: str) -> None:
        self.busy = True
        self.write_file(dev, parent, leaf, size, how)
        self.busy = False

    def write_file(self, dev: str, parent: str, leaf: str, size: int, how: str) -> None:
        new_dirs = self.made_parents(dev, parent)
        name = f"{parent}/{leaf}" if parent else leaf
        tag = b"<%d %s %s>" % (self.writes, dev[:1].encode(), name.encode())
        data = (tag * (size // len(tag) + 1))[:size]
        path = self.root(dev) / name
        self.touch(dev, [name])
        path.write_bytes(data)
        mtime_ns = self.next_mtime_ns()
        os.utime(path, ns=(mtime_ns, mtime_ns))
        self.record_write(name, data)
        self.write_log.append(Write(name, data, dev, mtime_ns))
        self.tell(dev, how, [name, *new_dirs])

    @rule(dev=st.sampled_from(IDS), pick=st.integers(0, 1 << 16), how=st.sampled_from(["names", "full", "later"]))
    def delete_file(self, dev: str, pick: int, how: str) -> None:
        self.busy = True
        files, _ = self.on_disk(dev)
        if files:
            name = files[pick % len(files)]
            self.touch(dev, [name])
            (self.root(dev) / name).unlink()
            self.record_delete_under(name)
            self.tell(dev, how, [name])
        self.busy = False

    @rule(
        dev=st.sampled_from(IDS),
        pick=st.integers(0, 1 << 16),
        parent=st.sampled_from(PARENTS),
        leaf=st.sampled_from(FILE_NAMES),
        how=st.sampled_from(["names", "full", "later"]),
    )
    def rename_file(self, dev: str, pick: int, parent: str, leaf: str, how: str) -> None:
        """Move a file (perhaps a conflict copy) to a pool name, replacing what is there."""
        self.busy = True
        files, _ = self.on_disk(dev)
        target = f"{parent}/{leaf}" if parent else leaf
        if files and files[pick % len(files)] != target:
            src = files[pick % len(files)]
            new_dirs = self.made_parents(dev, parent)
            data = (self.root(dev) / src).read_bytes()
            self.touch(dev, [src, target])
            os.rename(self.root(dev) / src, self.root(dev) / target)
            self.record_delete_under(src)
            self.record_moved_in(target, data)
            self.tell(dev, how, [src, target, *new_dirs])
        self.busy = False

    @rule(dev=st.sampled_from(IDS), name=st.sampled_from(DIR_NAMES), how=st.sampled_from(["names", "full", "later"]))
    def make_dir(self, dev: str, name: str, how: str) -> None:
        self.busy = True
        new_dirs = self.made_parents(dev, name)
        if new_dirs:
            self.tell(dev, how, new_dirs)
        self.busy = False

    @rule(dev=st.sampled_from(IDS), pick=st.integers(0, 1 << 16), how=st.sampled_from(["names", "full", "later"]))
    def remove_dir(self, dev: str, pick: int, how: str) -> None:
        self.busy = True
        _, dirs = self.on_disk(dev)
        if dirs:
            name = dirs[pick % len(dirs)]
            self.touch(dev, [name])
            shutil.rmtree(self.root(dev) / name)
            self.record_delete_under(name)
            self.tell(dev, how, [name])
        self.busy = False

    @rule(dev=st.sampled_from(IDS), pick=st.integers(0, 1 << 16), how=st.sampled_from(["names", "full", "later"]))
    def rename_dir(self, dev: str, pick: int, how: str) -> None:
        """`d0` <-> `d1` or `d0/e0` <-> `d1/e0`, with everything in it, if the other name is free."""
        self.busy = True
        _, dirs = self.on_disk(dev)
        if dirs:
            src = dirs[pick % len(dirs)]
            dst = ("d1" if src.startswith("d0") else "d0") + src[2:]
            root = self.root(dev)
            if KNOWN_BUGS_WITH_MOVED_TEMPS and list((root / src).rglob(".tofu-tmp-*")):
                event("rename_dir skipped: a pull writes below (known bugs)")
            elif not (root / dst).exists() and (root / dst).parent.is_dir():
                moved = {name: data for name, (data, _exe) in tree(root / src).items()}
                self.touch(dev, [src, dst])
                os.rename(root / src, root / dst)
                self.record_delete_under(src)
                self.record_delete_under(dst)  # what was known below `dst` is superseded here
                self.dir_made[dst] = self.tick()
                for rel, data in sorted(moved.items()):
                    if data is None:
                        self.dir_made[f"{dst}/{rel}"] = self.tick()
                    else:
                        self.record_moved_in(f"{dst}/{rel}", data)
                self.tell(dev, how, [src, dst])
        self.busy = False

    # -- quiescence ------------------------------------------------------------------------------

    @rule()
    def quiesce_and_check(self) -> None:
        self.busy = True
        self.quiesce()
        self.check()
        self.busy = False

    def quiesce(self) -> None:
        """Everything up and connected; full scans and settling until a round sends nothing.

        More than one round can be needed: a directory an engine makes as the parent of a file
        it pulls is seen by its own scan only (the shell's file-system watcher would report it),
        and a scan's announcement can make others act again.
        """
        net = self.net
        for dev in IDS:
            if dev not in net.engines:
                net.open(dev)
        for a, b in PAIRS:
            if (a, b) not in net.links:
                net.connect(a, b)
        for _ in range(QUIESCE_ROUNDS):
            before = len(net.sent)
            for dev in IDS:
                net.change(dev)  # a full scan finds the edits nobody was told of
            net.settle()
            net.run_timers(61.0)  # retries of names that could not be written, rechecks
            net.settle()
            if len(net.sent) == before:
                return
        raise AssertionError(f"still not quiet after {QUIESCE_ROUNDS} rounds of full scans")

    def check(self) -> None:
        trees = {dev: full_tree(self.root(dev)) for dev in IDS}
        a = trees[A_ID]
        for dev in (B_ID, C_ID):
            only_a = {k: short(v) for k, v in a.items() if trees[dev].get(k) != v}
            only_d = {k: short(v) for k, v in trees[dev].items() if a.get(k) != v}
            assert trees[dev] == a, f"replicas differ: A has {only_a}, {dev[:1]} has {only_d}"
        for dev in IDS:
            status = self.net.engines[dev].status()
            assert (status.need_files, status.need_bytes) == (0, 0), f"{dev[:1]} still needs {status}"
        for name, (data, _exe, _mtime) in a.items():
            if data is None:
                assert name in DIR_NAMES, f"a directory nobody made: {name}"
            else:
                assert data in self.contents.get(base_name(name), set()), f"{name} holds content never written there"
        for name, (t, data) in self.last_write.items():
            if self.last_delete.get(name, -1) > t:
                continue  # deleted or renamed away afterwards: anything goes
            assert name in a and a[name][0] is not None, f"{name} was written last and never deleted, but is gone"
            kept = [k for k, v in a.items() if v[0] == data and base_name(k) == name]
            assert kept, f"the last write of {name} ({data[:40]!r}) is neither there nor kept as a conflict copy"
        for w in self.write_log:
            if not w.superseded:
                kept = [k for k, v in a.items() if v[0] == w.data and base_name(k) == w.name]
                assert kept, f"{w} was never superseded, but is neither at its name nor kept as a conflict copy"
        for name in self.dir_made:
            # A directory deleted and made again unseen looks unchanged to its engine (directories
            # have no mtime that syncs), so only a directory nobody ever deleted must be there.
            if name not in self.last_delete:
                assert name in a and a[name][0] is None, f"directory {name} was made and never deleted, but is gone"
        # nothing outside the folders: only the folders, their index databases and the canary
        allowed = {"canary", *(d[:1] for d in IDS)}
        for entry in os.listdir(self.tmp):
            assert entry in allowed or re.fullmatch(r"[ABC]\.db(-wal|-shm|-journal)?", entry), entry
        assert os.listdir(self.tmp / "canary") == ["keep.txt"]
        st_now = (self.tmp / "canary" / "keep.txt").stat()
        assert (self.tmp / "canary" / "keep.txt").read_bytes() == CANARY
        assert (st_now.st_mtime_ns, st_now.st_ino) == (self.canary_stat.st_mtime_ns, self.canary_stat.st_ino)
        for dev in IDS:
            temps = sorted(self.root(dev).rglob(".tofu-tmp-*"))
            assert not temps, f"temp files left in {dev[:1]}: {temps}"

    def teardown(self) -> None:
        try:
            if not self.busy:  # a rule that raised already failed the example: only clean up
                self.quiesce()
                self.check()
        finally:
            for eng in self.net.engines.values():
                eng.close()
                eng.index.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


# Reproducible: a fixed seed and no example database, so CI runs the same examples every time.
# (`derandomize=True` would too, but it draws mostly tiny examples: a seed gives the usual spread.)
SyncMachine.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
seed(20261207)(SyncMachine)
# 7-9 s on an idle 2-core machine, 20-25 s when others share it: slow
TestSyncStateMachine = pytest.mark.slow(SyncMachine.TestCase)


def test_a_temp_file_moved_with_its_directory_is_deleted_by_the_next_scan(tmp_path: Path) -> None:
    """Found by the machine above: B pulls d1/big; the user renames d1 to d0 meanwhile. The pull's
    temp file moves along to d0, where no pull will ever use it; it was left until the engine
    restarted. The scan the rename causes now deletes it."""
    net = Net(tmp_path, [A_ID, B_ID])
    net.connect(A_ID, B_ID)
    net.settle()
    a, b = net.root(A_ID), net.root(B_ID)
    (a / "d1").mkdir()
    (a / "d1" / "big").write_bytes(os.urandom(1_000_000))
    net.change(A_ID)
    net.engines[B_ID].max_inflight_bytes = 128 * 1024  # one block at a time: the pull takes a while
    while not list(b.rglob(".tofu-tmp-*")):
        assert net.step(limit=1) == 1
    os.rename(b / "d1", b / "d0")
    net.change(B_ID, ["d0", "d1"])
    net.settle()
    for dev in (A_ID, B_ID):
        net.change(dev)
    net.settle()
    assert tree(a) == tree(b)
    left = sorted(b.rglob(".tofu-tmp-*"))
    net.crash(B_ID)
    net.open(B_ID)
    assert not sorted(b.rglob(".tofu-tmp-*"))  # a restart does delete it
    assert not left, f"left until restart: {left}"


def test_a_pull_whose_temp_file_was_moved_away_does_not_tear_another_file(tmp_path: Path) -> None:
    """Found by the machine above (seed 22, 300 examples, before the guard): A pulls d0/f0 from
    B; the user on A renames d0 to d1 while the request is out, so the temp file moves to d1;
    B then writes its own d1/f0. A's pull of d1/f0 takes the moved temp file (same basename, so
    the same temp name) as a resume while the d0/f0 pull, still open on that inode, writes its
    answer into it. A commits a mix of both files as d1/f0, its next scan announces that as a
    newer version, and B's own d1/f0 was overwritten everywhere, with no conflict copy. A temp
    file whose inode another pull holds is now replaced, never resumed."""
    net = ShuffledNet(tmp_path, [A_ID, B_ID])
    net.connect(A_ID, B_ID)
    net.settle()
    a, b = net.root(A_ID), net.root(B_ID)
    (b / "d0").mkdir()
    (b / "d0" / "f0").write_bytes(b"from d0 on B")
    net.change(B_ID)
    while not any(type(m).__name__ == "Request" for _, _, m in net.queue):
        net.deliver_head(net.links_with_mail()[0])  # A learns of d0/f0 and asks for its block
    os.rename(a / "d0", a / "d1")
    net.change(A_ID, ["d0", "d1"])
    (b / "d1").mkdir()
    (b / "d1" / "f0").write_bytes(b"B own d1/f0")
    net.change(B_ID, ["d1", "d1/f0"])
    net.settle()
    for dev in (A_ID, B_ID):
        net.change(dev)
    net.settle()
    assert tree(a) == tree(b)
    assert tree(b)["d1/f0"][0] == b"B own d1/f0"  # today: b"B own d1/f0B"
