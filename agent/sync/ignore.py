"""`.tofuignore`: gitignore-style patterns, plus names that are never synced (pure).

Theory: the rules are git's (globs, `**`, `!` negation, a trailing `/` for directories, `#`
comments), implemented by the well-tested `pathspec` library. On top, the agent's temp files
(`.tofu-tmp-*`) and any other reserved `.tofu-*` name are always ignored, whatever the file says.
The `.tofuignore` file itself is synced, so every device applies the same patterns.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from agent.sync.names import RESERVED_PREFIX

if TYPE_CHECKING:
    import pathspec


class Ignore:
    """A compiled set of ignore patterns; `matches(name, is_dir)` answers for one name."""

    def __init__(self, lines: Iterable[str] = ()) -> None:
        self.lines = [line.rstrip("\r\n") for line in lines]
        self._empty = not any(line.strip() and not line.lstrip().startswith("#") for line in self.lines)
        self._spec: pathspec.GitIgnoreSpec | None = None
        if not self._empty:
            import pathspec  # only folders with patterns pay for it (~0.8 MB resident)

            self._spec = pathspec.GitIgnoreSpec.from_lines(self.lines)

    @classmethod
    def from_text(cls, text: str) -> Ignore:
        """Patterns from the contents of a `.tofuignore` file."""
        return cls(text.splitlines())

    def matches(self, name: str, is_dir: bool = False) -> bool:
        """True if `name` (relative POSIX path) must not be synced."""
        if any(part.startswith(RESERVED_PREFIX) for part in name.split("/")):
            return True
        if self._spec is None:
            return False
        # pathspec tells directories by a trailing slash; a name under an ignored directory is
        # ignored too, which GitIgnoreSpec handles when we test each ancestor as a directory.
        parts = name.split("/")
        for i in range(1, len(parts)):
            if self._spec.match_file("/".join(parts[:i]) + "/"):
                return True
        return self._spec.match_file(name + "/" if is_dir else name)
