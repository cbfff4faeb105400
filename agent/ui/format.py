"""Everything the page shows that needs care: cleaning peer-chosen text, fingerprints, safety numbers,
the visual fingerprint grid, the identity URI and its QR code (pure).

This is the only module of `agent.ui` that imports `agent.ids` and `agent.verification`, so moving
those modules is one edit here.

The visual fingerprint. Both machines draw the same 8 x 8 grid for a pair of keys: the SHA-256 of
`b"tofu-agent/v1/visual-fingerprint\\0"` followed by the two 32-byte fingerprints in sorted order
(so the order the machines are named in does not matter) gives 64 nibbles; cell i (row-major) takes
nibble i (high nibble of byte i // 2 first) as one of 16 colours, each with its own symbol so the
grid can be compared without telling colours apart. It is a quick look, not a substitute for the
safety number: 256 bits are shown, but people compare only a few cells, so a full comparison is the
60 digits.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
from typing import Any

from agent.identity import ids as _ids
from agent.pairing import safety as _verification

# C0 and DEL, C1, bidi embeddings/overrides/isolates and marks (incl. the Arabic letter mark), zero-width
# characters and the BOM: a peer's name must not reorder or hide what stands next to it.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")
MAX_SHOWN = 64

VISUAL_LABEL = b"tofu-agent/v1/visual-fingerprint\x00"
GRID = 8
SYMBOLS = ("●", "▲", "■", "◆", "★", "✚", "♥", "♠", "♣", "☀", "☂", "✿", "☾", "⚑", "✈", "⌂")
COLOURS = (
    "red",
    "orange",
    "yellow",
    "lime",
    "green",
    "teal",
    "cyan",
    "sky",
    "blue",
    "indigo",
    "violet",
    "pink",
    "brown",
    "grey",
    "black",
    "olive",
)


def clean(text: str) -> str:
    """`text` without control, bidi and invisible characters (escaping is the template's job)."""
    return _UNSAFE.sub("", text)


def short(text: str, limit: int = MAX_SHOWN) -> str:
    """Cleaned `text` cut to `limit` characters, with an ellipsis if it was longer."""
    text = clean(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clean_tree(value: Any) -> Any:
    """A copy of a JSON-like value with every string (keys too) cleaned: applied to all agent data
    at the page's boundary, so no template can forget a peer-chosen string."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {clean(str(k)): clean_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_tree(v) for v in value]
    return value


def utc(wall: object) -> str:
    """A unix wall time as `2026-12-07 10:30:05 UTC` (as `tofu-agent versions` prints it), or a dash."""
    if not isinstance(wall, int | float) or isinstance(wall, bool) or not math.isfinite(wall):
        return "—"
    try:
        return dt.datetime.fromtimestamp(wall, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return "—"


def fingerprint(fp: str | None) -> str:
    """A fingerprint for people (colon-separated groups of four), or a dash."""
    return _ids.format_fingerprint(fp) if fp else "—"


def short_fingerprint(fp: str | None) -> str:
    """The first four groups of a fingerprint, to stand next to a name."""
    return _ids.format_fingerprint(fp)[:19] if fp else "no key"


def is_device_id(value: object) -> bool:
    """True if `value` has the form of a device id."""
    return _ids.is_device_id(value)


def is_fingerprint(value: object) -> bool:
    """True if `value` is a fingerprint (64 lower-case hex digits)."""
    return _ids.is_fingerprint(value)


def safety(own_id: str, own_fp: str, dev_id: str, dev_fp: str) -> tuple[list[str], list[str]] | None:
    """The safety number as `tofu-agent verify` prints it: lines of digit groups, lines of words.

    Slow (scrypt, about 100 ms): call it in a worker thread. None if an id or key is malformed.
    """
    try:
        number = _verification.safety_number(own_id, own_fp, dev_id, dev_fp)
        words = _verification.safety_words(own_id, own_fp, dev_id, dev_fp)
    except ValueError:
        return None
    return (
        _verification.format_groups(number).splitlines(),
        _verification.format_words(words).splitlines(),
    )


def visual_grid(fp_a: str, fp_b: str) -> list[list[int]]:
    """The 8 x 8 grid of colour indexes (0-15) both machines draw for this pair of keys."""
    pair = sorted([bytes.fromhex(fp_a), bytes.fromhex(fp_b)])
    digest = hashlib.sha256(VISUAL_LABEL + pair[0] + pair[1]).digest()
    nibbles = [n for byte in digest for n in (byte >> 4, byte & 0x0F)]
    return [nibbles[r * GRID : (r + 1) * GRID] for r in range(GRID)]


def identity_uri(device_id: str, name: str, fp: str) -> str:
    """This machine's `tofu-agent://device/...` URI (what `tofu-agent id --qr` shows)."""
    return _verification.identity_uri(device_id, name, fp)


def qr_svg(uri: str) -> bytes:
    """`uri` as a QR code in SVG (a standalone document, served as an image)."""
    import io

    import segno

    out = io.BytesIO()
    segno.make(uri, error="m", micro=False).save(out, kind="svg", scale=4, border=2, dark="#000", light="#fff")
    return out.getvalue()
