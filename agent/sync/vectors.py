"""Version vectors: one counter per device that changed a file; compare, merge, bump (pure).

Theory: a file's version is a map {device_id: counter}. A device that changes the file bumps its
own counter. Version A dominates B when every counter of A is >= B's; if neither dominates, the
two changes were made without seeing each other (concurrent) and the planner resolves a conflict.
Vectors are immutable and kept sorted, so equal vectors encode to equal bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

MAX_COUNTER = 2**63 - 1


class Ordering(Enum):
    """How two version vectors relate."""

    EQUAL = "equal"
    GREATER = "greater"  # self dominates other: self saw every change other saw, and more
    LESSER = "lesser"
    CONCURRENT = "concurrent"


@dataclass(frozen=True, slots=True)
class Vector:
    """An immutable version vector; `counters` is sorted by device id and holds no zero counters."""

    counters: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, counters: Mapping[str, int] | Iterable[tuple[str, int]]) -> Vector:
        """Build a vector from a mapping or pairs, dropping zero counters."""
        items = counters.items() if isinstance(counters, Mapping) else counters
        return cls(tuple(sorted((d, c) for d, c in dict(items).items() if c > 0)))

    def get(self, device: str) -> int:
        """The counter of `device`, 0 if it never changed the file."""
        for d, c in self.counters:
            if d == device:
                return c
        return 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a fresh dict."""
        return dict(self.counters)

    def bump(self, device: str, floor: int = 0) -> Vector:
        """A vector that dominates self: `device`'s counter becomes max(counter + 1, floor).

        Passing the current Unix time as `floor` keeps counters rising even if a device lost its
        index and starts again from an empty vector (as Syncthing does).
        """
        mine = self.as_dict()
        mine[device] = max(mine.get(device, 0) + 1, floor)
        return Vector.of(mine)

    def merge(self, other: Vector) -> Vector:
        """The least vector that dominates both (element-wise max)."""
        merged = self.as_dict()
        for d, c in other.counters:
            if c > merged.get(d, 0):
                merged[d] = c
        return Vector.of(merged)

    def compare(self, other: Vector) -> Ordering:
        """How self relates to other."""
        mine, theirs = dict(self.counters), dict(other.counters)
        greater = lesser = False
        for d in mine.keys() | theirs.keys():
            a, b = mine.get(d, 0), theirs.get(d, 0)
            if a > b:
                greater = True
            elif a < b:
                lesser = True
        if greater and lesser:
            return Ordering.CONCURRENT
        if greater:
            return Ordering.GREATER
        if lesser:
            return Ordering.LESSER
        return Ordering.EQUAL

    def __str__(self) -> str:
        return "{" + ", ".join(f"{d[:7]}:{c}" for d, c in self.counters) + "}"
