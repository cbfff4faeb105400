"""Signed key rotation statements and chain following (pure crypto: no disk, no clock).

Theory of operation: when a device replaces its key it signs, with the OLD key, a statement
"device D moves from key OLD to key NEW at time T". A peer that pinned OLD and then sees D prove
NEW in a handshake asks `follow_chain` for a path of such statements from its pin to the proven key,
each link signed by the key before it. The statements are public and replayable on purpose: they
can only move a pin to a key the connecting party has just proven it holds. The wire format and the
security argument are in docs/PROTOCOL.md and docs/SECURITY.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from agent.identity.crypto import length_prefixed, sign, verify_signature
from agent.identity.ids import is_device_id, is_fingerprint

LABEL = b"tofu-agent/v1/rotate"
FORMAT_VERSION = 1
MAX_ENCODED = 512  # a P-256 statement encodes to about 440 bytes
MAX_SPKI = 128  # a P-256 SubjectPublicKeyInfo is 91 bytes
MAX_SIGNATURE = 80  # a DER ECDSA P-256 signature is at most 72 bytes
MAX_TIME = 2**63 - 1
MAX_CHAIN = 16  # links from the pin to the proven key
MAX_STATEMENTS = 12  # statements a peer may offer in one go (the HELLO field has the same cap)


@dataclass(frozen=True, slots=True)
class RotationStatement:
    """Device `device_id` moves from the old key to the new one; `signature` is by the old key.

    Construction checks only the shape; `check` does the cryptography.

    :raises LocalProtocolError: a field has the wrong type, format or size.
    """

    device_id: str
    old_fingerprint: str
    new_fingerprint: str
    old_public_key: bytes  # DER SubjectPublicKeyInfo; verifies `signature`
    new_public_key: bytes  # DER SubjectPublicKeyInfo; verifies the next link
    time: int  # Unix seconds by the signer's clock: orders links, proves nothing
    signature: bytes  # ECDSA-SHA256 (DER) over `signed_bytes` by the old key

    def __post_init__(self) -> None:
        problem = _shape_problem(self)
        if problem:
            raise LocalProtocolError(f"rotation statement: {problem}", ErrorCode.MALFORMED)

    def signed_bytes(self) -> bytes:
        """The exact bytes the old key signs."""
        return signed_bytes(self.device_id, self.old_fingerprint, self.new_fingerprint, self.new_public_key, self.time)


@dataclass(frozen=True, slots=True)
class ChainResult:
    """The outcome of `follow_chain`: on success, `path` runs from the pin to the proven key."""

    ok: bool
    path: tuple[str, ...] = ()
    links: tuple[RotationStatement, ...] = ()
    reason: str = ""
    ignored: tuple[str, ...] = ()  # why each unusable statement was skipped, for the log


def _shape_problem(s: RotationStatement) -> str | None:
    # `type(...) is` rather than isinstance: bool is an int, and str/bytes subclasses may misbehave.
    if type(s.device_id) is not str or not is_device_id(s.device_id):
        return "device id is not a device id"
    if not is_fingerprint(s.old_fingerprint) or not is_fingerprint(s.new_fingerprint):
        return "fingerprint is not 64 lower-case hex characters"
    if s.old_fingerprint == s.new_fingerprint:
        return "old and new key are the same"
    for key in (s.old_public_key, s.new_public_key):
        if type(key) is not bytes or not 0 < len(key) <= MAX_SPKI:
            return "public key is not 1-128 bytes"
    if type(s.time) is not int or not 0 <= s.time <= MAX_TIME:
        return "time is not a non-negative 64-bit integer"
    if type(s.signature) is not bytes or not 0 < len(s.signature) <= MAX_SIGNATURE:
        return "signature is not 1-80 bytes"
    return None


def signed_bytes(device_id: str, old_fingerprint: str, new_fingerprint: str, new_spki: bytes, time: int) -> bytes:
    """Label and fields, each prefixed by its 2-byte big-endian length, so no two inputs share bytes."""
    return length_prefixed(
        LABEL,
        device_id.encode("ascii"),
        old_fingerprint.encode("ascii"),
        new_fingerprint.encode("ascii"),
        new_spki,
        time.to_bytes(8, "big"),
    )


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _load_spki(spki: bytes) -> ec.EllipticCurvePublicKey | None:
    """The P-256 key in a canonical DER SPKI, or None."""
    try:
        key = serialization.load_der_public_key(spki)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        return None
    # Only the canonical encoding, so the fingerprint here equals the one the handshake computes.
    return key if _spki(key) == spki else None


def make_statement(
    old_key: ec.EllipticCurvePrivateKey, new_public_key: ec.EllipticCurvePublicKey, device_id: str, time: int
) -> RotationStatement:
    """A statement, signed by `old_key`, that `device_id` now uses `new_public_key`.

    :raises LocalProtocolError: the device id, keys or time cannot form a statement.
    """
    old_spki, new_spki = _spki(old_key.public_key()), _spki(new_public_key)
    if _load_spki(old_spki) is None or _load_spki(new_spki) is None:
        raise LocalProtocolError("rotation statement: keys must be ECDSA P-256", ErrorCode.MALFORMED)
    old_fp, new_fp = hashlib.sha256(old_spki).hexdigest(), hashlib.sha256(new_spki).hexdigest()
    # Build unsigned first so the shape is checked before anything is signed.
    draft = RotationStatement(device_id, old_fp, new_fp, old_spki, new_spki, time, b"\x00")
    signature = sign(old_key, draft.signed_bytes())
    return RotationStatement(device_id, old_fp, new_fp, old_spki, new_spki, time, signature)


def check(stmt: RotationStatement) -> str | None:
    """None if the statement is self-consistent and signed by its old key; otherwise why not."""
    old_key = _load_spki(stmt.old_public_key)
    if old_key is None or _load_spki(stmt.new_public_key) is None:
        return "a public key is not a canonical P-256 SubjectPublicKeyInfo"
    if hashlib.sha256(stmt.old_public_key).hexdigest() != stmt.old_fingerprint:
        return "the old public key does not match the old fingerprint"
    if hashlib.sha256(stmt.new_public_key).hexdigest() != stmt.new_fingerprint:
        return "the new public key does not match the new fingerprint"
    if not verify_signature(old_key, stmt.signature, stmt.signed_bytes()):
        return "the signature does not verify with the old key"
    return None


def encode(stmt: RotationStatement) -> bytes:
    """The msgpack wire form: an 8-element array led by the format version (<= MAX_ENCODED bytes)."""
    data: bytes = msgpack.packb(
        [
            FORMAT_VERSION,
            stmt.device_id,
            stmt.old_fingerprint,
            stmt.new_fingerprint,
            stmt.old_public_key,
            stmt.new_public_key,
            stmt.time,
            stmt.signature,
        ],
        use_bin_type=True,
    )
    return data


def decode(data: bytes) -> RotationStatement:
    """Parse and check a statement from a peer: well-formed, self-consistent, signed by its old key.

    :raises RemoteProtocolError: with code MALFORMED, for anything else; nothing else escapes.
    """

    def bad(why: str) -> RemoteProtocolError:
        return RemoteProtocolError(f"rotation statement: {why}", ErrorCode.MALFORMED)

    if not isinstance(data, bytes | bytearray | memoryview):
        raise bad("not bytes")
    if len(data) > MAX_ENCODED:
        raise bad(f"{len(data)} bytes is over the {MAX_ENCODED}-byte limit")
    data = bytes(data)
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack's C and Python unpackers raise many unrelated types on garbage
        raise bad("not valid msgpack") from exc
    if type(obj) is not list or len(obj) != 8:
        raise bad("not an array of 8 fields")
    version, device_id, old_fp, new_fp, old_spki, new_spki, time, signature = obj
    if type(version) is not int or version != FORMAT_VERSION:
        raise bad(f"unsupported format version {version!r}")
    try:
        stmt = RotationStatement(device_id, old_fp, new_fp, old_spki, new_spki, time, signature)
    except LocalProtocolError as exc:
        raise bad(str(exc).removeprefix("rotation statement: ")) from exc
    problem = check(stmt)
    if problem:
        raise bad(problem)
    return stmt


def follow_chain(
    pinned_fingerprint: str,
    device_id: str,
    proven_fingerprint: str,
    statements: Sequence[RotationStatement | bytes],
) -> ChainResult:
    """Find valid links from the pinned key to the key proven in the handshake; never raises on input."""
    if pinned_fingerprint == proven_fingerprint:
        return ChainResult(ok=True, path=(pinned_fingerprint,))
    if len(statements) > MAX_STATEMENTS:
        return ChainResult(ok=False, reason=f"{len(statements)} statements is over the limit of {MAX_STATEMENTS}")
    links: list[RotationStatement] = []
    ignored: list[str] = []
    for i, item in enumerate(statements):
        if isinstance(item, RotationStatement):
            stmt, problem = item, check(item)
        else:
            try:
                stmt, problem = decode(item), None
            except RemoteProtocolError as exc:
                ignored.append(f"#{i}: {exc}")
                continue
        if problem is None and stmt.device_id != device_id:
            problem = f"it is for another device ({stmt.device_id})"
        if problem is not None:
            ignored.append(f"#{i}: {problem}")
        else:
            links.append(stmt)

    # Label-correcting search for the earliest (then shortest) arrival at each key with link times
    # non-decreasing: arriving earlier never rules out a continuation that arriving later allows.
    # Strict improvement keeps every stored path free of cycles, so A->B->A is harmless.
    best: dict[str, tuple[int, tuple[RotationStatement, ...]]] = {pinned_fingerprint: (-1, ())}
    for _ in range(MAX_CHAIN):
        changed = False
        for s in links:
            at = best.get(s.old_fingerprint)
            if at is None or s.time < at[0] or len(at[1]) >= MAX_CHAIN:
                continue
            cand = (s.time, (*at[1], s))
            cur = best.get(s.new_fingerprint)
            if cur is None or (cand[0], len(cand[1])) < (cur[0], len(cur[1])):
                best[s.new_fingerprint] = cand
                changed = True
        if not changed:
            break

    found = best.get(proven_fingerprint)
    if found is None:
        if not any(s.old_fingerprint == pinned_fingerprint for s in links):
            reason = "no valid statement is signed by the pinned key"
        else:
            reason = "the statements do not lead from the pinned key to the key proven in the handshake"
        return ChainResult(ok=False, reason=reason, ignored=tuple(ignored))
    chain = found[1]
    path = (pinned_fingerprint, *(s.new_fingerprint for s in chain))
    return ChainResult(ok=True, path=path, links=chain, ignored=tuple(ignored))
