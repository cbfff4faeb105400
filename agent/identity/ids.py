"""Device ids, fingerprints and display names: formats and checks (pure, cheap to import)."""

from __future__ import annotations

import base64
import re
import secrets

from agent.errors import IdentityError

DEVICE_ID_BYTES = 20  # 160 bits, 32 base32 characters
# Checked with fullmatch: `$` would also match before a trailing "\n", letting "<64 hex>\n" through.
_DEVICE_ID_RE = re.compile(r"[A-Z2-7]{32}")
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")
MAX_NAME_LEN = 64


class FormatError(IdentityError, ValueError):
    """A value does not have the form it claims."""


def new_device_id() -> str:
    """A fresh random device id: 160 bits as 32 upper-case base32 characters."""
    return base64.b32encode(secrets.token_bytes(DEVICE_ID_BYTES)).decode("ascii").rstrip("=")


def is_device_id(value: object) -> bool:
    """True if `value` has the form of a device id."""
    return isinstance(value, str) and _DEVICE_ID_RE.fullmatch(value) is not None


def is_fingerprint(value: object) -> bool:
    """True if `value` is 64 lower-case hex characters."""
    return isinstance(value, str) and _FINGERPRINT_RE.fullmatch(value) is not None


def clean_name(name: str) -> str:
    """A display name safe to show and advertise: printable, trimmed, at most 64 characters."""
    cleaned = "".join(ch for ch in name if ch.isprintable()).strip()[:MAX_NAME_LEN].rstrip()
    return cleaned or "unnamed"


def format_fingerprint(fingerprint: str) -> str:
    """The fingerprint for people: colon-separated groups of four hex digits."""
    return ":".join(fingerprint[i : i + 4] for i in range(0, len(fingerprint), 4))


def parse_fingerprint(text: str) -> str:
    """Accept a fingerprint with or without separators; FormatError if it is not one."""
    compact = re.sub(r"[\s:-]", "", text).lower()
    if not is_fingerprint(compact):
        raise FormatError(f"not a SHA-256 fingerprint: {text!r}")
    return compact
