"""What to do about a file a peer announced: nothing, pull, delete, mkdir, or resolve a conflict (pure).

Theory: compare the peer's version vector with ours. Older or equal: nothing. Newer: apply it.
Concurrent: both devices changed the file without seeing each other, and every device must reach
the same outcome from the same two records:
  - same content (type, bytes, exec bit, deletion): adopt the merged vector, no copy;
  - a deletion against an edit: the edit wins;
  - otherwise the newer mtime wins, ties broken by the larger `modified_by` device id, then by
    the content itself (type, exec bit, size, hashes), so that exactly one of two records wins.
Only the device that holds the loser on disk acts: it renames its file to the conflict name
(`NAME.sync-conflict-YYYYMMDD-HHMMSS-DEVICE.EXT`, time = loser's mtime in UTC, DEVICE = first 7
characters of the loser's device id), which then syncs as a new file, and takes the winner under
the merged vector, which dominates both. The winner's holder does nothing: the merged vector
arrives from the loser's holder later and is a metadata-only update. A winner that claimed the
merged vector itself would let a third device overwrite the loser before anyone saved a copy.
Block planning: each needed block is copied from a local file that has its hash, or requested.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from agent.sync.model import FileInfo, FileType
from agent.sync.names import CONFLICT_MARKER, MAX_COMPONENT_BYTES, split_name
from agent.sync.vectors import Ordering


class Action(Enum):
    """What the puller must do for one name."""

    NONE = "none"  # we are up to date, or we win a conflict
    RECORD = "record"  # only adopt the remote record (e.g. a deletion of a file we never had)
    METADATA = "metadata"  # same content: adopt version, mtime and exec bit without moving data
    PULL = "pull"  # fetch the remote file's content
    MKDIR = "mkdir"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Decision:
    """The planner's answer for one name: the action, the record to store, and a conflict rename."""

    action: Action
    target: FileInfo | None = None  # what our index holds once the action is done
    conflict_name: str | None = None  # rename our current file here first (we hold the loser)


def wins(a: FileInfo, b: FileInfo) -> bool:
    """True if `a` beats concurrent `b` by the deterministic conflict rule (a total order: of two
    records that differ, exactly one wins, whichever device compares them)."""
    if a.deleted != b.deleted:
        return not a.deleted  # an edit beats a deletion
    if a.mtime_ns != b.mtime_ns:
        return a.mtime_ns > b.mtime_ns
    if a.modified_by != b.modified_by:
        return a.modified_by > b.modified_by
    # One device's two versions with one mtime, each merged elsewhere (a chmod keeps the mtime):
    # any fixed order of what differs will do, as long as every device picks the same winner.
    # Without it both sides kept their own and the folders never agreed (soak, seed 7).
    return _content_key(a) > _content_key(b)


def _content_key(f: FileInfo) -> tuple[int, bool, int, bytes]:
    return (f.type.value, f.executable, f.size, f.hashes)


MAX_CONFLICT_ATTEMPT = 9  # conflict copies of one name, device and second before we give the name up


def conflict_name(loser: FileInfo, attempt: int = 0) -> str:
    """The name the losing version of a conflict is kept under.

    Every device derives the same name from the same version. Two losing versions made by one
    device within one second would share it, so a caller that finds the name taken by other
    content asks again with `attempt` 1, 2, ... (`NAME.sync-conflict-DATE-TIME-DEVICE-2.EXT`).
    """
    parent, base = split_name(loser.name)
    stamp = dt.datetime.fromtimestamp(loser.mtime_ns / 1e9, dt.UTC).strftime("%Y%m%d-%H%M%S")
    marker = f"{CONFLICT_MARKER}{stamp}-{loser.modified_by[:7]}" + (f"-{attempt + 1}" if attempt else "")
    stem, dot, ext = base.rpartition(".")
    if not (dot and stem):
        stem, ext = base, ""  # a leading dot (".bashrc") is not an extension
    suffix = f".{ext}" if ext else ""
    # The copy must still be a valid name: shorten the stem (then the extension) to fit the
    # component limit, at a character boundary, the same way on every device.
    room = MAX_COMPONENT_BYTES - len(marker.encode())
    if len(suffix.encode()) > room // 2:
        suffix = _truncate(suffix, room // 2)
    stem = _truncate(stem, room - len(suffix.encode()))
    new_base = f"{stem}{marker}{suffix}"
    return f"{parent}/{new_base}" if parent else new_base


def _truncate(text: str, max_bytes: int) -> str:
    """The longest prefix of `text` that is at most `max_bytes` bytes of UTF-8."""
    return text.encode()[:max_bytes].decode("utf-8", "ignore")


def _apply(local: FileInfo | None, remote: FileInfo) -> Decision:
    """The action that makes our copy equal to `remote` (which dominates ours)."""
    if local is not None and not local.deleted and local.same_content(remote):
        if local.type is FileType.DIR or (local.mtime_ns == remote.mtime_ns):
            return Decision(Action.RECORD, remote)
        return Decision(Action.METADATA, remote)
    if remote.deleted:
        if local is None or local.deleted:
            return Decision(Action.RECORD, remote)
        return Decision(Action.DELETE, remote)
    if remote.type is FileType.DIR:
        return Decision(Action.MKDIR, remote)
    if local is not None and not local.deleted and local.type is FileType.FILE and local.same_content(remote):
        return Decision(Action.METADATA, remote)
    return Decision(Action.PULL, remote)


def decide(local: FileInfo | None, remote: FileInfo) -> Decision:
    """What to do about `remote`, given our record `local` of the same name."""
    if local is None:
        return _apply(None, remote)
    order = remote.version.compare(local.version)
    if order in (Ordering.EQUAL, Ordering.LESSER):
        return Decision(Action.NONE)
    if order is Ordering.GREATER:
        return _apply(local, remote)
    merged = local.version.merge(remote.version)
    if local.same_content(remote):
        winner = remote if wins(remote, local) else local
        return _apply(local, winner.replace(version=merged))
    if not wins(remote, local):
        return Decision(Action.NONE)
    target = remote.replace(version=merged)
    if local.deleted or local.type is FileType.DIR:
        # nothing of ours to keep: a deletion loses nothing, a directory's files sync on their own
        return _apply(local, target)
    decision = _apply(None, target)
    return Decision(decision.action, decision.target, conflict_name(local))


@dataclass(frozen=True, slots=True)
class BlockPlan:
    """For each block of the target: copy it from (name, block index) or request it."""

    copy: tuple[tuple[int, str, int], ...]  # (target block index, source name, source block index)
    fetch: tuple[int, ...]  # target block indexes to request from a peer


def plan_blocks(target: FileInfo, have: set[int], lookup: Callable[[bytes], list[tuple[str, int]]]) -> BlockPlan:
    """Split the blocks of `target` not in `have` into local copies and requests."""
    copy: list[tuple[int, str, int]] = []
    fetch: list[int] = []
    for i in range(target.n_blocks):
        if i in have:
            continue
        sources = lookup(target.block_hash(i))
        if sources:
            copy.append((i, *sources[0]))
        else:
            fetch.append(i)
    return BlockPlan(tuple(copy), tuple(fetch))
