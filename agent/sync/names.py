"""Validation of file names that come from peers or from the disk (pure).

Theory: a name is a relative POSIX path in NFC. Everything a peer says is hostile until this
module accepted it: no absolute paths, no `.`/`..`/empty components, no NUL, control characters or
backslashes, at most 255 UTF-8 bytes a component and 4096 a path, and nothing in our reserved
namespace (`.tofu-*`: temp files, the folder marker `.tofu-folder`; `.tofuignore` is an ordinary synced
file). Accepted names never leave the folder by themselves; `agent.sync.fs` also refuses to walk
through symlinks, so a symlink planted in the folder cannot redirect a write either.
"""

from __future__ import annotations

import re
import unicodedata

from agent.errors import ErrorCode, RemoteProtocolError

MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096
MAX_DEPTH = 256
RESERVED_PREFIX = ".tofu-"
TEMP_PREFIX = ".tofu-tmp-"
IGNORE_FILE = ".tofuignore"
# A directory at the folder root that says "this is the folder, present and mounted", as
# Syncthing's `.stfolder`: without it a missing or unmounted root would scan as "everything
# deleted" and the deletions would reach every peer.
MARKER = ".tofu-folder"
CONFLICT_MARKER = ".sync-conflict-"
_BAD_CHAR = re.compile(r"[\x00-\x1f\x7f\\]")  # control characters, DEL, backslash


class BadPath(RemoteProtocolError):
    """A name that must not be used as a path inside the folder."""

    code = ErrorCode.BAD_PATH


def _bad(name: str, why: str) -> BadPath:
    return BadPath(f"refused file name {name[:200]!r}: {why}", ErrorCode.BAD_PATH)


def validate_name(name: object) -> str:
    """Return `name` if it is a safe relative path for a folder.

    :raises BadPath: (a RemoteProtocolError with code BAD_PATH) otherwise.
    """
    if not isinstance(name, str):
        raise BadPath("file name is not a string", ErrorCode.BAD_PATH)
    if not name:
        raise _bad(name, "empty")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _bad(name, "not valid UTF-8") from exc
    if len(encoded) > MAX_PATH_BYTES:
        raise _bad(name, f"longer than {MAX_PATH_BYTES} bytes")
    if name.startswith("/"):
        raise _bad(name, "absolute path")
    if _BAD_CHAR.search(name):
        raise _bad(name, "control character or backslash")
    ascii_only = name.isascii()  # then NFC already, and one byte per character
    if not ascii_only and not unicodedata.is_normalized("NFC", name):
        raise _bad(name, "not in Unicode NFC form")
    parts = name.split("/")
    if len(parts) > MAX_DEPTH:
        raise _bad(name, "too deeply nested")
    for part in parts:
        if part in ("", ".", ".."):
            raise _bad(name, "empty, '.' or '..' component")
        if (len(part) if ascii_only else len(part.encode("utf-8"))) > MAX_COMPONENT_BYTES:
            raise _bad(name, f"a component is longer than {MAX_COMPONENT_BYTES} bytes")
        if part.startswith(RESERVED_PREFIX):
            raise _bad(name, f"{RESERVED_PREFIX}* names are reserved for the agent")
    return name


def is_valid_name(name: object) -> bool:
    """True if `validate_name` would accept `name`."""
    try:
        validate_name(name)
    except BadPath:
        return False
    return True


def is_temp_name(basename: str) -> bool:
    """True for the agent's own temporary files, which are never synced."""
    return basename.startswith(TEMP_PREFIX)


def split_name(name: str) -> tuple[str, str]:
    """(parent, basename); parent is '' at the folder root."""
    parent, _, base = name.rpartition("/")
    return parent, base


def parent_names(name: str) -> list[str]:
    """Every ancestor directory of `name`, shallowest first ('a/b/c' -> ['a', 'a/b'])."""
    parts = name.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]
