"""Judge a soak run's end state against its history.

The rules, and why each is sound with every machine writing at once:

1. **Converged**: within the deadline after the quiet phase began, every folder holds the same tree
   (names, bytes, exec bits; symlinks and the `.tofu-folder` marker aside), every agent says each
   folder is `idle` with nothing needed or failed and no error, and every agent is connected to
   every other.
2. **Own areas are exact.** Only machine NAME writes `own-NAME/`, so its state is known: the model
   replayed from NAME's own operations. Every machine must hold exactly that (NAME also its
   symlinks, the others none of them). A missing file is a lost write (or a deletion nobody made),
   an extra one a file nobody wrote, a conflict copy there a conflict with nobody.
3. **The shared pool** is written by everyone at once, so its end state is open; what must hold:
   - every name is a pool name or a conflict copy of one (`NAME.sync-conflict-...`): no file
     appears that nobody wrote;
   - every file's bytes are a prefix of some content someone wrote to a pool name (a plain write
     can be scanned half-done, and such a version may survive as a conflict copy);
   - a write that no later operation on its name (by anyone), and no operation on its name by
     another machine around the same time (1 s), could have replaced is present on every machine,
     under some name (the name itself or a conflict copy);
   - a pool name that someone wrote and nobody ever deleted or renamed away (nor removed its
     directory) exists on every machine.
4. No `.tofu-tmp-*` file is left; symlinks are never synced.
5. Trust stores changed only as the schedule says: every other machine pinned `tofu`/`verified` at
   its current key (rotations followed), no pending key, no unknown device; the trust log holds
   only `first_use`, `match` and `rotated` events; no anomalies.
6. No `Traceback` in any log; the peak RSS of each agent under the bound; no agent exited by itself.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.soak.history import DIR, FILE, LINK, SHARED, SHARED_DIRS, SHARED_NAMES, Entry, History, Op, OwnModel

CONFLICT = re.compile(r"\.sync-conflict-\d{8}-\d{6}-[A-Z0-9]{7}(?:-\d+)?")  # -2, -3 ...: same device and second
CONCURRENT_S = 1.0
ALLOWED_EVENTS = {"first_use", "match", "rotated"}
MAX_LINES = 12  # of one kind of failure


@dataclass
class MachineEnd:
    """One machine at the end of the quiet phase."""

    name: str
    device_id: str
    model: OwnModel
    tree: dict[str, Entry]
    temps: list[str]
    status: dict[str, Any] | None
    peers: list[dict[str, Any]] | None
    trust_log: list[dict[str, Any]] | None
    fingerprints: dict[str, str]  # device id -> current fingerprint of every machine
    rotations: int = 0
    folder: Path | None = None
    log: str = ""
    rss_max_mb: float = 0.0


@dataclass
class EndState:
    t0: float
    converged_s: float | None
    converge_timeout: float
    max_rss_mb: float
    problems: list[str] = field(default_factory=list)
    machines: dict[str, MachineEnd] = field(default_factory=dict)


@dataclass
class Report:
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def fail(self, kind: str, lines: list[str]) -> None:
        if not lines:
            return
        more = f"\n    ... and {len(lines) - MAX_LINES} more" if len(lines) > MAX_LINES else ""
        self.failures.append(f"{kind} ({len(lines)}):\n    " + "\n    ".join(lines[:MAX_LINES]) + more)


def base_name(name: str) -> str:
    """`a1.sync-conflict-20240501-101500-ABCDEFG.txt` -> `a1.txt` (nested conflict copies too)."""
    return CONFLICT.sub("", name)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + "/")


def _strip_links(tree: dict[str, Entry]) -> dict[str, tuple[str, str, bool]]:
    return {k: (e.kind, e.sha, e.exec) for k, e in tree.items() if e.kind != LINK}


def check(history: History, end: EndState) -> Report:
    rep = Report()
    ops_by_seq = {op.seq: op for op in history.ops}
    t0 = history.t0
    machines = list(end.machines.values())
    rep.stats["converged_s"] = end.converged_s

    # 1. converged
    if end.converged_s is None:
        lines = []
        for m in machines:
            st = m.status
            if st is None:
                lines.append(f"{m.name}: no answer to `status`")
                continue
            for f in st.get("folders", []):
                lines.append(
                    f"{m.name}: folder {f.get('id')} {f.get('state')}, need_files {f.get('need_files')}, "
                    f"failed_files {f.get('failed_files')}, error {f.get('error')!r}, files {f.get('files')}"
                )
            others = {o.device_id: o.name for o in machines if o is not m}
            connected = {p["device_id"] for p in st.get("peers", []) if p.get("connected")}
            down = sorted(others[d] for d in others if d not in connected)
            if down:
                lines.append(f"{m.name}: not connected to {', '.join(down)}")
        rep.fail(f"not converged within {end.converge_timeout:g} s of the quiet phase", lines)

    # 2. own areas are exact
    own_lines: list[str] = []
    for owner in machines:
        root = owner.model.root
        for m in machines:
            expected = owner.model.entries if m is owner else owner.model.synced()
            actual = {p: e for p, e in m.tree.items() if _under(p, root)}
            for p in sorted(set(expected) | set(actual)):
                exp, act = expected.get(p), actual.get(p)
                if exp is not None and act is not None and exp.same(act):
                    continue
                made = _made_by(exp, ops_by_seq, t0)
                if act is None:
                    own_lines.append(f"{p} missing on {m.name}; {made}")
                elif exp is None:
                    gone = _last_touch(history, owner.name, p)
                    if act.kind == LINK:
                        own_lines.append(f"{p} on {m.name} is a synced symlink")
                    elif CONFLICT.search(p):
                        own_lines.append(f"{p} on {m.name} is a conflict copy in an area with one writer")
                    elif gone is not None:
                        own_lines.append(f"{p} on {m.name} is stale ({_desc(act)}): gone since {gone.describe(t0)}")
                    else:
                        own_lines.append(f"{p} on {m.name} is {_desc(act)} that nobody wrote")
                else:
                    older = _op_with_sha(history, owner.name, act.sha) if act.kind == FILE else None
                    was = f" (the version of {older.describe(t0)})" if older is not None else ""
                    own_lines.append(f"{p} on {m.name} is {_desc(act)}{was}, expected {_desc(exp)}; {made}")
    rep.fail("own areas differ from what their only writer did", _group(own_lines))

    # 3. the shared pool
    _check_shared(history, end, rep)

    # 4. identical trees, temp files, symlinks elsewhere
    trees = {m.name: _strip_links(m.tree) for m in machines}
    ref_name = machines[0].name
    diff_lines: list[str] = []
    for m in machines[1:]:
        a, b = trees[ref_name], trees[m.name]
        for p in sorted(set(a) | set(b)):
            if a.get(p) != b.get(p):
                diff_lines.append(f"{p}: {ref_name} {_short(a.get(p))} vs {m.name} {_short(b.get(p))}")
    rep.fail("folders not identical", diff_lines)
    rep.fail("temp files left", [_temp_origin(m.name, t, history) for m in machines for t in m.temps])
    rep.fail(
        "symlinks synced",
        [
            f"{m.name}: {p}"
            for m in machines
            for p, e in m.tree.items()
            if e.kind == LINK and not _under(p, m.model.root)
        ],
    )

    # 5. status and trust
    status_lines: list[str] = []
    trust_lines: list[str] = []
    ids = {m.device_id: m.name for m in machines}
    for m in machines:
        st = m.status
        if st is None:
            status_lines.append(f"{m.name}: no status")
        else:
            for f in st.get("folders", []):
                if f.get("state") != "idle" or f.get("need_files") or f.get("failed_files") or f.get("error"):
                    status_lines.append(
                        f"{m.name}: {f.get('state')}, need_files {f.get('need_files')}, "
                        f"failed_files {f.get('failed_files')}, error {f.get('error')!r}"
                    )
            for p in st.get("peers", []):
                if p.get("anomalies"):
                    trust_lines.append(
                        f"{m.name}: anomalies for {ids.get(p['device_id'], p['device_id'])}: {p['anomalies']}"
                    )
        if m.peers is None:
            trust_lines.append(f"{m.name}: `peers --json` failed")
        else:
            seen = {pe["device_id"]: pe for pe in m.peers}
            for dev, pe in seen.items():
                if dev not in ids:
                    trust_lines.append(f"{m.name}: knows a device nobody started: {dev} ({pe.get('name')})")
            for o in machines:
                if o is m:
                    continue
                pin = seen.get(o.device_id)
                if pin is None:
                    trust_lines.append(f"{m.name}: has no pin for {o.name}")
                    continue
                if pin.get("trust") not in ("tofu", "verified"):
                    trust_lines.append(f"{m.name}: {o.name} is {pin.get('trust')}")
                if pin.get("fingerprint") != m.fingerprints[o.device_id]:
                    trust_lines.append(f"{m.name}: pins {o.name} at an old key ({o.rotations} rotations)")
                if pin.get("pending_fingerprint"):
                    trust_lines.append(f"{m.name}: a pending key for {o.name}")
        for ev in m.trust_log or []:
            if ev.get("kind") not in ALLOWED_EVENTS:
                who = ids.get(ev.get("device_id", ""), ev.get("device_id"))
                trust_lines.append(
                    f"{m.name}: trust event {ev.get('kind')} for {who} at {ev.get('time')}: {ev.get('detail')}"
                )
    rep.fail("agent status not idle at the end", status_lines)
    rep.fail("trust stores changed beyond the schedule", trust_lines)

    # 6. logs, memory, crashes and whatever the runner saw
    tb_lines: list[str] = []
    for m in machines:
        lines = m.log.splitlines()
        for i, line in enumerate(lines):
            if "Traceback" in line:
                tb_lines.append(f"{m.name}: " + " | ".join(x.strip() for x in lines[max(0, i - 1) : i + 8]))
        warnings = [x for x in lines if " WARNING " in x or " ERROR " in x or " CRITICAL " in x]
        if warnings:
            uniq: dict[str, str] = {}
            for w in warnings:
                uniq.setdefault(re.sub(r"[0-9a-f]{8,}|\d+", "#", w.split(" ", 1)[-1]), w)
            rep.notes.append(
                f"{m.name}: {len(warnings)} warning/error lines, e.g.:\n      "
                + "\n      ".join(list(uniq.values())[-6:])
            )
    rep.fail("tracebacks in agent logs", tb_lines)
    rep.fail(
        f"RSS above {end.max_rss_mb:g} MB",
        [f"{m.name}: {m.rss_max_mb:.0f} MB" for m in machines if m.rss_max_mb > end.max_rss_mb],
    )
    rep.fail("problems seen while running", end.problems)
    rep.stats["rss_max_mb"] = {m.name: round(m.rss_max_mb, 1) for m in machines}
    return rep


def _last_touch(history: History, machine: str, path: str) -> Op | None:
    """The last op of `machine` that removed or renamed away `path` or one of its parents."""
    found = None
    for op in history.ops:
        if op.machine == machine and op.kind in ("delete", "rmtree", "rename") and _under(path, op.path):
            found = op
    return found


def _op_with_sha(history: History, machine: str, digest: str) -> Op | None:
    for op in reversed(history.ops):
        if op.machine == machine and op.sha == digest:
            return op
    return None


def _desc(e: Entry) -> str:
    if e.kind == FILE:
        return f"file {e.sha[:10]}{' +x' if e.exec else ''}"
    return "a directory" if e.kind == DIR else f"a symlink to {e.sha}"


def _short(v: tuple[str, str, bool] | None) -> str:
    if v is None:
        return "absent"
    kind, digest, exec_bit = v
    return f"file {digest[:10]}{' +x' if exec_bit else ''}" if kind == FILE else "dir"


def _made_by(e: Entry | None, ops: dict[int, Op], t0: float) -> str:
    if e is None or e.op not in ops:
        return "made before the schedule" if e is not None else ""
    return "made by " + ops[e.op].describe(t0)


def _group(lines: list[str]) -> list[str]:
    """Merge 'X missing on m1; made by ...' and 'X missing on m2; made by ...' into one line."""
    merged: dict[tuple[str, str], list[str]] = defaultdict(list)
    order: list[tuple[str, str]] = []
    for line in lines:
        m = re.match(r"(\S+) missing on (\S+); (.*)", line)
        key = (m.group(1), m.group(3)) if m else (line, "")
        if key not in merged:
            order.append(key)
        if m:
            merged[key].append(m.group(2))
    out = []
    for key in order:
        if key[1] or merged[key]:
            out.append(f"{key[0]} missing on {', '.join(merged[key])}; {key[1]}")
        else:
            out.append(key[0])
    return out


def _affects(op: Op, name: str) -> bool:
    """Could `op` have replaced or removed what was at `name`?"""
    if op.kind == "rmtree":
        return _under(name, op.path)
    if op.kind == "write":
        return op.path == name
    if op.kind in ("delete", "rename"):
        return op.ok and name in (op.path, op.path2)
    return False


def _check_shared(history: History, end: EndState, rep: Report) -> None:
    shared_ops = [op for op in history.ops if _under(op.path, SHARED)]
    t0 = history.t0
    allowed_dirs = {SHARED} | {f"{SHARED}/{d}" for d in SHARED_DIRS}
    pool = set(SHARED_NAMES)
    contents = history.shared_contents
    name_lines: list[str] = []
    content_lines: list[str] = []
    present: dict[str, set[str]] = {}
    for m in end.machines.values():
        shas: set[str] = set()
        for p, e in m.tree.items():
            if not _under(p, SHARED):
                continue
            if e.kind == DIR:
                if p not in allowed_dirs:
                    name_lines.append(f"{m.name}: directory {p} that nobody made")
                continue
            if base_name(p) not in pool:
                name_lines.append(f"{m.name}: {p} is no pool name nor a conflict copy of one")
            if e.kind == FILE:
                shas.add(e.sha)
                if e.sha not in contents and not _prefix_of_written(m, p, contents):
                    content_lines.append(f"{m.name}: {p} holds bytes nobody wrote (sha {e.sha[:10]})")
        present[m.name] = shas
    rep.fail("shared pool: names nobody made", name_lines)
    rep.fail("shared pool: contents nobody wrote", content_lines)

    lost: list[str] = []
    required = 0
    for w in shared_ops:
        if w.kind != "write" or not w.ok:
            continue
        superseding = [
            o
            for o in shared_ops
            if o is not w
            and _affects(o, w.path)
            and (o.t_start >= w.t_start or (o.machine != w.machine and o.t_end >= w.t_start - CONCURRENT_S))
        ]
        if superseding:
            continue
        required += 1
        missing = [name for name, shas in present.items() if w.sha not in shas]
        if missing:
            before = [o for o in shared_ops if _affects(o, w.path) and o.t_start < w.t_start][-3:]
            ctx = "; earlier: " + ", ".join(o.describe(t0) for o in before) if before else ""
            lost.append(f"{w.describe(t0)} (sha {w.sha[:10]}) is on no name on {', '.join(missing)}{ctx}")
    rep.stats["shared_writes_required"] = required
    rep.fail("shared pool: writes lost", lost)

    gone: list[str] = []
    for name in SHARED_NAMES:
        writes = [o for o in shared_ops if o.kind == "write" and o.ok and o.path == name]
        removals = [
            o
            for o in shared_ops
            if (o.kind == "rmtree" and _under(name, o.path))
            or (o.kind in ("delete", "rename") and o.ok and o.path == name)
        ]
        if not writes or removals:
            continue
        for m in end.machines.values():
            got = m.tree.get(name)
            if got is None or got.kind != FILE:
                gone.append(f"{name} missing on {m.name}: written {len(writes)} times, never deleted or renamed away")
    rep.fail("shared pool: deletions nobody made", gone)


def _prefix_of_written(m: MachineEnd, path: str, contents: dict[str, bytes]) -> bool:
    """The file's bytes are the start of some content written to the pool (a half-done write)."""
    if m.folder is None:
        return False
    try:
        data = (m.folder / path).read_bytes()
    except OSError:
        return False
    return any(len(c) >= len(data) and c.startswith(data) for c in contents.values())


def _temp_origin(machine: str, temp: str, history: History) -> str:
    """`m0: D/.tofu-tmp-XXXX`, with the name it was for (the agent names a temp after a hash of it) and its ops."""
    parent, _, base = temp.rpartition("/")
    wanted = base.removeprefix(".tofu-tmp-")
    names = {p for op in history.ops for p in (op.path, op.path2) if p}
    for name in sorted(names):
        dirname, _, leaf = name.rpartition("/")
        if hashlib.sha256(leaf.encode()).hexdigest()[:24] == wanted and (dirname == parent or not parent):
            ops = [op for op in history.ops if name in (op.path, op.path2)]
            story = "; ".join(op.describe(history.t0) for op in ops[-4:])
            return f"{machine}: {temp} (the temp of {name}: {story})"
    return f"{machine}: {temp}"
