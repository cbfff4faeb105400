"""Out-of-band verification: safety numbers, their spoken words, and identity URIs for QR codes (pure).

Theory of operation. A safety number is what two people compare to prove that each machine pinned the
other's real key. Like Signal's, it is two halves, one per device, each a slow hash of that device's
(device id, key fingerprint) only; the halves are put in a fixed order (sorted by device id) so both
machines print the same 60 digits. A man in the middle who showed one machine a key of its own would
have to find a key whose half matches the real one: 10^30 (about 2^99.7) scrypt evaluations on
average, and scrypt's salt holds the label and the device id, so no work carries over to another device.
The words are a second spelling of the same hashes for reading aloud (99 bits per half).

The identity URI (`tofu-agent://device/ID?fp=...&name=...&v=1`) is what `id --qr` shows and
`trust add` reads; parsing it is a user-facing boundary, so every problem is a one-line UserError.
"""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlsplit

from agent.errors import UserError
from agent.identity.ids import clean_name, is_device_id, is_fingerprint
from agent.pairing.words import BITS_PER_WORD, int_to_words

SAFETY_LABEL = b"tofu-agent/v1/safety-number"
# scrypt cost: N=2^14, r=8 is 16 MiB and about 50 ms per half on a laptop core, 100 ms in all; it is
# memory-hard, so grinding keys on GPUs costs far more than a plain iterated hash would.
SCRYPT_N = 1 << 14
SCRYPT_R = 8
SCRYPT_P = 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024

DIGITS_PER_HALF = 30
SAFETY_DIGITS = 2 * DIGITS_PER_HALF
GROUP_SIZE = 5
WORDS_PER_HALF = 9  # 9 x 11 = 99 bits, as strong as the 30 digits (99.7 bits) they stand beside
_WORD_BITS_PER_HALF = WORDS_PER_HALF * BITS_PER_WORD

URI_SCHEME = "tofu-agent"
URI_KIND = "device"
URI_VERSION = "1"
MAX_URI_LEN = 1024


# -- safety numbers -------------------------------------------------------------------------------


def _check_device(device_id: str, fingerprint: str) -> None:
    if not is_device_id(device_id):
        raise ValueError(f"not a device id: {device_id!r}")
    if not is_fingerprint(fingerprint):
        raise ValueError(f"not a fingerprint: {fingerprint!r}")


@functools.lru_cache(maxsize=64)
def _half_hash(device_id: str, fingerprint: str) -> bytes:
    # Cached because `verify` shows digits and words for the same pair; the inputs are public.
    salt = SAFETY_LABEL + b"\x00" + device_id.encode("ascii")
    return hashlib.scrypt(
        bytes.fromhex(fingerprint),
        salt=salt,
        n=SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        maxmem=_SCRYPT_MAXMEM,
        dklen=32,
    )


def _half_digits(digest: bytes) -> str:
    # Signal's encoding: six 5-byte chunks, each reduced mod 10^5 (the bias, 10^5 / 2^40, is negligible).
    return "".join(f"{int.from_bytes(digest[i : i + 5], 'big') % 100_000:05d}" for i in range(0, DIGITS_PER_HALF, 5))


def _half_words(digest: bytes) -> tuple[str, ...]:
    top = int.from_bytes(digest[:13], "big") >> (13 * 8 - _WORD_BITS_PER_HALF)
    return int_to_words(top, WORDS_PER_HALF)


def _ordered_halves(dev_a: str, fp_a: str, dev_b: str, fp_b: str) -> list[bytes]:
    _check_device(dev_a, fp_a)
    _check_device(dev_b, fp_b)
    # Sorting makes the result independent of which machine computes it.
    return [_half_hash(dev, fp) for dev, fp in sorted([(dev_a, fp_a), (dev_b, fp_b)])]


def safety_number(dev_a: str, fp_a: str, dev_b: str, fp_b: str) -> str:
    """The 60-digit safety number of two devices, the same whichever order they are given in.

    :raises ValueError: a device id or fingerprint is malformed.
    """
    return "".join(_half_digits(h) for h in _ordered_halves(dev_a, fp_a, dev_b, fp_b))


def safety_words(dev_a: str, fp_a: str, dev_b: str, fp_b: str) -> str:
    """The safety number as 18 space-separated words (9 per device) for reading aloud.

    :raises ValueError: a device id or fingerprint is malformed.
    """
    return " ".join(w for h in _ordered_halves(dev_a, fp_a, dev_b, fp_b) for w in _half_words(h))


def format_groups(number: str, per_line: int = 4) -> str:
    """Digits in groups of five separated by spaces, `per_line` groups per line.

    :raises ValueError: `number` is not digits in whole groups of five.
    """
    if not number.isascii() or not number.isdigit() or len(number) % GROUP_SIZE:
        raise ValueError("a safety number is digits in whole groups of five")
    groups = [number[i : i + GROUP_SIZE] for i in range(0, len(number), GROUP_SIZE)]
    return "\n".join(" ".join(groups[i : i + per_line]) for i in range(0, len(groups), per_line))


def format_words(words: str, per_line: int = 6) -> str:
    """Space-separated words laid out `per_line` to a line."""
    items = words.split()
    return "\n".join(" ".join(items[i : i + per_line]) for i in range(0, len(items), per_line))


# -- identity URIs and QR codes -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParsedIdentity:
    """A device identity read from a URI: checked device id, fingerprint and a clean name."""

    device_id: str
    name: str
    fingerprint: str


def _display_name(name: str) -> str:
    # identity.clean_name trims before it truncates, so one pass can leave a trailing space; a
    # second pass is a fixed point, which keeps URI round trips exact.
    return clean_name(clean_name(name))


def identity_uri(device_id: str, name: str, fingerprint: str) -> str:
    """The `tofu-agent://device/ID?fp=HEX&name=NAME&v=1` URI for a device.

    :raises ValueError: the device id or fingerprint is malformed.
    """
    _check_device(device_id, fingerprint)
    return (
        f"{URI_SCHEME}://{URI_KIND}/{device_id}"
        f"?fp={fingerprint}&name={quote(_display_name(name), safe='')}&v={URI_VERSION}"
    )


def _bad(reason: str) -> UserError:
    return UserError(f"not a usable tofu-agent identity link: {reason}")


def parse_identity_uri(text: str) -> ParsedIdentity:
    """Read a URI made by `identity_uri` (surrounding whitespace allowed).

    :raises UserError: anything about it is wrong; the message says what, on one line.
    """
    text = text.strip()
    if len(text) > MAX_URI_LEN:
        raise _bad(f"it is longer than {MAX_URI_LEN} characters")
    if not text.isprintable():
        raise _bad("it holds control characters")
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise _bad(str(exc)) from exc
    if parts.scheme.lower() != URI_SCHEME:
        raise _bad(f"it should start with {URI_SCHEME}://")
    if parts.netloc.lower() != URI_KIND:
        raise _bad(f"it should start with {URI_SCHEME}://{URI_KIND}/")
    if parts.fragment:
        raise _bad("it has a #fragment")
    # Scanners and chat apps sometimes change case; the id and fingerprint have one canonical case.
    device_id = parts.path.removeprefix("/").upper()
    if not is_device_id(device_id):
        raise _bad("the device id is missing or malformed")
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True, errors="strict", max_num_fields=16)
    except ValueError as exc:  # includes UnicodeDecodeError from a bad %-escape
        raise _bad("the part after '?' is malformed") from exc
    fields: dict[str, str] = {}
    for key, value in pairs:
        if key in fields:
            raise _bad(f"{key!r} appears twice")
        fields[key] = value
    version = fields.get("v")
    if version is None:
        raise _bad("the version (v=) is missing")
    if version != URI_VERSION:
        raise _bad(f"it is version {version!r}; this tofu-agent reads version {URI_VERSION}, so upgrade")
    fingerprint = fields.get("fp", "").lower()
    if not is_fingerprint(fingerprint):
        raise _bad("the fingerprint (fp=) is missing or is not 64 hex digits")
    # Unknown fields are ignored so a later version can add some without breaking this one.
    return ParsedIdentity(device_id=device_id, name=_display_name(fields.get("name", "")), fingerprint=fingerprint)


def qr_text(uri: str) -> str:
    """`uri` as a QR code drawn with Unicode half blocks, for printing to a terminal."""
    import segno  # only `id --qr` needs it: keep every other command quick to start

    qr = segno.make(uri, error="m", micro=False)
    out = io.StringIO()
    qr.terminal(out=out, compact=True)
    return out.getvalue()
