"""File versions: where a replaced or deleted file is kept, and which kept versions expire (pure).

Theory: when a change pulled from a peer deletes or replaces a file, the old content is kept under
`.tofu-versions/<name>~<UTC stamp>` inside the folder (a reserved `.tofu-*` name: never scanned,
never synced, and no peer can name it). This module only computes names and decisions; the disk
work is `agent.sync.versions`. The clean-up rules, for the versions of one file and the wall time
`now` passed in:
  - `trash` (the default): a version older than `keep_days` goes;
  - `simple`: the newest `keep` versions stay, older ones go;
  - `staggered`: one version an hour for the first day, one a day for the first 30 days, one a
    week for the first year, none after; within each span the newest version of a slot stays;
  - `off`: nothing is kept when a peer replaces a file, and nothing is cleaned up.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from agent.sync.names import MAX_COMPONENT_BYTES, split_name

VERSIONS_DIR = ".tofu-versions"
_STAMP = "%Y%m%d-%H%M%S"
_SUFFIX = re.compile(r"~(\d{8}-\d{6})(?:-(\d+))?$")
HOUR, DAY, WEEK = 3600.0, 86400.0, 7 * 86400.0
# (age below which, one version per this span) for `staggered`; older than the last: removed
STAGGER: tuple[tuple[float, float], ...] = ((DAY, HOUR), (30 * DAY, DAY), (365 * DAY, WEEK))


class Kind(Enum):
    """How a folder keeps what peers replace or delete."""

    TRASH = "trash"
    SIMPLE = "simple"
    STAGGERED = "staggered"
    OFF = "off"


@dataclass(frozen=True, slots=True)
class Versioning:
    """A folder's versioning settings (`versioning`, `keep_days`, `keep` in its `[[folder]]`)."""

    kind: Kind = Kind.TRASH
    keep_days: float = 30.0  # trash: how long a version is kept
    keep: int = 5  # simple: how many versions of each file are kept

    @property
    def enabled(self) -> bool:
        """True if replaced and deleted files are kept at all."""
        return self.kind is not Kind.OFF


DEFAULT_VERSIONING = Versioning()


def version_path(name: str, wall: float, attempt: int = 0) -> str:
    """Where the version of `name` replaced at wall time `wall` is kept (`attempt` > 0: `-N`,
    for a second version of one name within one second)."""
    parent, base = split_name(name)
    stamp = dt.datetime.fromtimestamp(wall, dt.UTC).strftime(_STAMP)
    suffix = f"~{stamp}" + (f"-{attempt + 1}" if attempt else "")
    room = MAX_COMPONENT_BYTES - len(suffix)
    base = base.encode()[:room].decode("utf-8", "ignore")  # a name near the limit is shortened
    return "/".join(p for p in (VERSIONS_DIR, parent, base + suffix) if p)


def parse_version_path(path: str) -> tuple[str, float] | None:
    """(the file's name in the folder, wall time it was kept) of a path inside `VERSIONS_DIR`,
    or None if `path` is not one `version_path` makes."""
    head, _, rest = path.partition("/")
    m = _SUFFIX.search(rest)
    if head != VERSIONS_DIR or m is None or not rest[: m.start()] or rest[: m.start()].endswith("/"):
        return None
    try:
        when = dt.datetime.strptime(m.group(1), _STAMP).replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None
    return rest[: m.start()], when


def expired(stamps: Sequence[float], policy: Versioning, now: float) -> set[int]:
    """Indexes into `stamps` (wall times the versions of ONE file were kept) that the policy
    removes at wall time `now`."""
    if policy.kind is Kind.OFF:
        return set()
    newest_first = sorted(range(len(stamps)), key=lambda i: (-stamps[i], i))
    if policy.kind is Kind.TRASH:
        return {i for i in newest_first if now - stamps[i] > policy.keep_days * DAY}
    if policy.kind is Kind.SIMPLE:
        return set(newest_first[max(policy.keep, 0) :])
    gone: set[int] = set()
    last_kept: float | None = None
    for i in newest_first:
        age = now - stamps[i]
        span = next((s for limit, s in STAGGER if age < limit), None)
        if span is None or (last_kept is not None and last_kept - stamps[i] < span):
            gone.add(i)
        else:
            last_kept = stamps[i]
    return gone
