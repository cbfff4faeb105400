"""The soak checker on hand-made histories: it passes what is allowed and names what is not."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.soak.checker import EndState, MachineEnd, Report, base_name, check
from tests.soak.history import DIR, FILE, LINK, Entry, History, Op, OwnModel, sha

A, B = "m0", "m1"
IDS = {A: "A" * 32, B: "B" * 32}
FPS = {IDS[A]: "a" * 64, IDS[B]: "b" * 64}


def idle_status(me: str) -> dict[str, object]:
    other = B if me == A else A
    return {
        "folders": [{"id": "default", "state": "idle", "need_files": 0, "failed_files": 0, "error": ""}],
        "peers": [{"device_id": IDS[other], "connected": True, "anomalies": []}],
    }


def pins(me: str) -> list[dict[str, object]]:
    other = B if me == A else A
    return [{"device_id": IDS[other], "trust": "tofu", "fingerprint": FPS[IDS[other]], "pending_fingerprint": None}]


class World:
    """Two machines whose own areas hold one file each, plus whatever a test adds."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.h = History(t0=0.0)
        self.models = {A: OwnModel(A), B: OwnModel(B)}
        self.trees: dict[str, dict[str, Entry]] = {A: {}, B: {}}
        for m in (A, B):
            self.own_write(m, f"own-{m}/f1.bin", b"one", t=1.0)

    def op(self, machine: str, kind: str, path: str, t: float, *, data: bytes = b"", path2: str = "") -> Op:
        op = Op(self.h.next_seq(), machine, kind, path, path2, size=len(data), t_start=t, t_end=t + 0.01)
        if kind == "write":
            op.sha = self.h.remember_shared(data) if path.startswith("shared/") else sha(data)
        self.h.add(op)
        return op

    def own_write(self, m: str, path: str, data: bytes, t: float) -> None:
        op = self.op(m, "write", path, t, data=data)
        self.models[m].set(path, Entry(FILE, op.sha, False, op.seq))
        for tree in self.trees.values():  # synced everywhere
            tree.update({f"own-{m}": Entry(DIR), path: Entry(FILE, op.sha)})

    def put(self, path: str, data: bytes, *on: str) -> None:
        for m in on or (A, B):
            self.trees[m][path] = Entry(FILE, sha(data))
            (self.tmp / m / path).parent.mkdir(parents=True, exist_ok=True)
            (self.tmp / m / path).write_bytes(data)
            self.trees[m].setdefault("shared", Entry(DIR))

    def check(self, *, temps: list[str] | None = None, log: str = "", events: tuple[str, ...] = ()) -> Report:
        end = EndState(t0=0.0, converged_s=1.0, converge_timeout=60, max_rss_mb=400)
        for m in (A, B):
            end.machines[m] = MachineEnd(
                name=m,
                device_id=IDS[m],
                model=self.models[m],
                tree=self.trees[m],
                temps=list(temps or []) if m == A else [],
                status=idle_status(m),
                peers=pins(m),
                trust_log=[{"kind": k, "device_id": IDS[B]} for k in ("first_use", "match", *events)],
                fingerprints=FPS,
                log=log,
                folder=self.tmp / m,
            )
        return check(self.h, end)


def failure_kinds(rep: Report) -> list[str]:
    return [f.split(" (")[0] for f in rep.failures]


def test_a_clean_run_passes(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.op(A, "write", "shared/a0.txt", 2.0, data=b"SOAK m0 7\nxyz")
    w.put("shared/a0.txt", b"SOAK m0 7\nxyz")
    assert w.check().failures == []


def test_a_write_missing_on_a_peer_is_a_lost_write(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.own_write(A, "own-m0/f2.bin", b"two", t=3.0)
    del w.trees[B]["own-m0/f2.bin"]
    rep = w.check()
    assert "own areas differ from what their only writer did" in failure_kinds(rep)
    assert "own-m0/f2.bin missing on m1" in rep.failures[0]


def test_a_symlink_stays_local_and_a_synced_one_fails(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.models[A].set("own-m0/l1", Entry(LINK, "nowhere"))
    w.trees[A]["own-m0/l1"] = Entry(LINK, "nowhere")
    assert w.check().failures == []
    w.trees[B]["own-m0/l1"] = Entry(LINK, "nowhere")
    assert "synced symlink" in "".join(w.check().failures)


def test_concurrent_writes_may_end_as_a_conflict_copy(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.op(A, "write", "shared/a1.txt", 2.0, data=b"from a")
    w.op(B, "write", "shared/a1.txt", 2.1, data=b"from b")
    w.put("shared/a1.txt", b"from b")
    w.put("shared/a1.sync-conflict-20240501-101500-AAAAAAA.txt", b"from a")
    assert w.check().failures == []


def test_a_half_written_version_is_allowed_but_foreign_bytes_are_not(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.op(A, "write", "shared/a2.txt", 2.0, data=b"SOAK m0 9\n0123456789")
    w.op(A, "delete", "shared/a2.txt", 3.0)
    w.put("shared/a2.sync-conflict-20240501-101500-AAAAAAA.txt", b"SOAK m0 9\n01234")  # a prefix
    assert w.check().failures == []
    w.put("shared/a3.txt", b"nobody wrote this")
    assert failure_kinds(w.check()) == ["shared pool: contents nobody wrote"]


def test_an_unsuperseded_shared_write_must_survive_somewhere(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.op(A, "write", "shared/a4.txt", 2.0, data=b"keep me")
    w.op(B, "write", "shared/a4.txt", 9.0, data=b"later")  # a later write may replace it...
    w.put("shared/a4.txt", b"later")
    assert w.check().failures == []
    w2 = World(tmp_path / "2")
    w2.op(A, "write", "shared/a4.txt", 2.0, data=b"keep me")
    w2.op(B, "write", "shared/a4.txt", 0.5, data=b"earlier")  # ...an earlier one may not
    w2.put("shared/a4.txt", b"earlier")
    assert "shared pool: writes lost" in failure_kinds(w2.check())


def test_a_name_nobody_removed_must_exist(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.op(A, "write", "shared/d0/b0.txt", 2.0, data=b"x")
    rep = w.check()
    assert "shared pool: deletions nobody made" in failure_kinds(rep)
    w.op(B, "rmtree", "shared/d0", 3.0)
    assert "shared pool: deletions nobody made" not in failure_kinds(w.check())


@pytest.mark.parametrize(
    ("kwargs", "kind"),
    [
        ({"temps": ["own-m0/.tofu-tmp-0123"]}, "temp files left"),
        ({"log": "x\nTraceback (most recent call last):\n  boom"}, "tracebacks in agent logs"),
        ({"events": ("key_changed",)}, "trust stores changed beyond the schedule"),
    ],
)
def test_leftovers_tracebacks_and_key_changes_fail(tmp_path: Path, kwargs: dict[str, object], kind: str) -> None:
    rep = World(tmp_path).check(**kwargs)  # type: ignore[arg-type]
    assert failure_kinds(rep) == [kind]


def test_conflict_names_map_back_to_their_base() -> None:
    assert base_name("shared/a1.sync-conflict-20240501-101500-ABCDEFG.txt") == "shared/a1.txt"
    assert base_name("a.sync-conflict-20240501-101500-ABCDEFG.sync-conflict-20240502-101500-ZZZZZZZ.txt") == "a.txt"
