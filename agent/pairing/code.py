"""Code pairing: a one-time code, SPAKE2, and key confirmation bound to both devices (pure, sans-I/O).

Theory of operation. `tofu-agent pair` (the *waiting* side, SPAKE2 role A) prints a code such as
`7-guitar-orbit`: the number is a nameplate that only helps the other machine find the waiting one;
the two words (22 bits from a 2048-word list) are the secret. `tofu-agent pair CODE` (the *joining*
side, role B) connects, and over that connection each side:

1. `start(now)` -> its SPAKE2 message; the caller sends it.
2. `receive_pake(msg, peer_device_id, peer_fingerprint, now)` -> its key confirmation; the caller
   sends it. The peer's id and fingerprint are the ones this connection's handshake (TLS) showed.
3. `receive_confirm(mac, now)` -> PairingResult: the peer is who the code holder says it is.

The confirmations are HMACs, under keys derived from the SPAKE2 key with per-role labels, over a
transcript holding both device ids and both fingerprints in role order. So a wrong code gives
different keys and both confirmations fail; and a relay that terminates the connection with keys of
its own, even one that forwards the SPAKE2 messages untouched, makes the two sides hash different
fingerprints, so both fail too. SPAKE2 lets an attacker who does not know the code test one guess per
run, and a session is burnt on the first failure, so each attempt succeeds with probability 2^-22.

States are named after what they expect next; any error poisons the session into FAILED, and after
PAIRED or FAILED every call raises, so a code is good for one run only.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Literal

import spake2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.errors import ErrorCode, UserError
from agent.identity.ids import is_device_id, is_fingerprint
from agent.pairing.words import BITS_PER_WORD, WORDS, word_index

Role = Literal["waiting", "joining"]

CODE_WORDS = 2
CODE_SECRET_BITS = CODE_WORDS * BITS_PER_WORD  # 22: one guess per attempt wins with chance 2^-22
NAMEPLATE_MAX = 999
DEFAULT_TTL = 300.0
CONFIRM_LEN = 32
# SPAKE2 (Ed25519 group) messages are a side byte plus a 32-byte group element.
PAKE_MESSAGE_LEN = 33

_PASSWORD_LABEL = b"tofu-agent/v1/pair-password"
_SPAKE_ID_A = b"tofu-agent/v1/pair/waiting"
_SPAKE_ID_B = b"tofu-agent/v1/pair/joining"
_TRANSCRIPT_LABEL = b"tofu-agent/v1/pair-transcript"
_CONFIRM_LABEL_A = b"tofu-agent/v1/pair-confirm-A"
_CONFIRM_LABEL_B = b"tofu-agent/v1/pair-confirm-B"

_CODE_RE = re.compile(r"(\d{1,3})[-\s]+([a-z]+)[-\s]+([a-z]+)")  # used with fullmatch, never `$`


# -- errors ---------------------------------------------------------------------------------------


class PairingError(UserError):
    """Pairing failed; the session is burnt. `code` is the wire reason to send the peer."""

    code: ErrorCode = ErrorCode.AUTH_FAILED


class WrongCodeError(PairingError):
    """The confirmations did not match: a wrong code, or someone in the middle."""

    def __init__(self) -> None:
        super().__init__(
            "the pairing code was wrong (or someone tampered with the connection); ask for a new code and try again"
        )


class PairingExpired(PairingError):
    """The code's time ran out before pairing finished."""

    code = ErrorCode.TIMEOUT

    def __init__(self) -> None:
        super().__init__("the pairing code has expired; run `tofu-agent pair` again for a new one")


class BadPairingMessage(PairingError):
    """The peer sent something that is not a valid pairing message."""

    code = ErrorCode.MALFORMED


class PairingSessionOver(PairingError):
    """The session was used out of order or after it finished; codes work once."""

    code = ErrorCode.UNEXPECTED_MESSAGE


# -- codes ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PairingCode:
    """A parsed code: the public nameplate and the secret words."""

    nameplate: int
    words: tuple[str, ...]

    def __str__(self) -> str:
        return "-".join([str(self.nameplate), *self.words])

    @property
    def password(self) -> bytes:
        """The SPAKE2 password: the canonical code under a label (the nameplate is public but bound)."""
        return _PASSWORD_LABEL + b"\x00" + str(self).encode("ascii")


def new_code(randbelow: Callable[[int], int] = secrets.randbelow) -> str:
    """A fresh code like `7-guitar-orbit`: nameplate 1-999 and two secret words."""
    nameplate = 1 + randbelow(NAMEPLATE_MAX)
    return str(PairingCode(nameplate, tuple(WORDS[randbelow(len(WORDS))] for _ in range(CODE_WORDS))))


def parse_code(text: str) -> PairingCode:
    """Read a code as typed: case and `-` or spaces between the parts do not matter.

    :raises UserError: it is not a code; the message shows the expected form.
    """
    m = _CODE_RE.fullmatch(text.strip().lower())
    if m is None:
        raise UserError(f"{text.strip()!r} is not a pairing code; it looks like 7-guitar-orbit")
    nameplate = int(m.group(1))
    if not 1 <= nameplate <= NAMEPLATE_MAX:
        raise UserError(f"{text.strip()!r} is not a pairing code; the number is 1 to {NAMEPLATE_MAX}")
    words = (m.group(2), m.group(3))
    for word in words:
        if word_index(word) is None:
            raise UserError(f"{word!r} is not a pairing-code word; check the spelling")
    return PairingCode(nameplate, words)


# -- the typed edge of the untyped spake2 package -------------------------------------------------


class _Spake:
    """One side of SPAKE2 (Ed25519) with fixed role ids; bytes in, bytes out, our errors only."""

    def __init__(self, role: Role, password: bytes) -> None:
        cls = spake2.SPAKE2_A if role == "waiting" else spake2.SPAKE2_B
        self._inner = cls(password, idA=_SPAKE_ID_A, idB=_SPAKE_ID_B)

    def start(self) -> bytes:
        msg = self._inner.start()
        assert isinstance(msg, bytes) and len(msg) == PAKE_MESSAGE_LEN
        return msg

    def finish(self, msg: bytes) -> bytes:
        if len(msg) != PAKE_MESSAGE_LEN:
            raise BadPairingMessage("the other device sent a pairing message of the wrong size")
        try:
            key = self._inner.finish(msg)
        # spake2 raises its own errors, ValueError or AssertionError on a bad point; all of them
        # mean the peer's bytes were bad, which the caller must hear as one error.
        except Exception as exc:
            raise BadPairingMessage(
                "the other device sent an invalid pairing message (or is also waiting/joining)"
            ) from exc
        assert isinstance(key, bytes)
        return key


# -- the session ----------------------------------------------------------------------------------


class State(Enum):
    """Where a pairing session is, named after what it expects next."""

    EXPECT_START = "expect_start"
    EXPECT_PAKE = "expect_pake"
    EXPECT_CONFIRM = "expect_confirm"
    PAIRED = "paired"
    FAILED = "failed"


# The only transitions; everything else is a misuse that burns the session.
_TRANSITIONS: dict[tuple[State, str], State] = {
    (State.EXPECT_START, "start"): State.EXPECT_PAKE,
    (State.EXPECT_PAKE, "receive_pake"): State.EXPECT_CONFIRM,
    (State.EXPECT_CONFIRM, "receive_confirm"): State.PAIRED,
}


@dataclass(frozen=True, slots=True)
class PairingResult:
    """A finished pairing: the peer proved it knows the code over a connection with this key."""

    peer_device_id: str
    peer_fingerprint: str


def _frame(*parts: bytes) -> bytes:
    # Length prefixes make the transcript unambiguous: no two part lists encode to the same bytes.
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _confirm_mac(key: bytes, label: bytes, transcript: bytes) -> bytes:
    mac_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(key)
    return hmac.new(mac_key, transcript, hashlib.sha256).digest()


class PairingSession:
    """One side of one pairing run; use once."""

    def __init__(
        self,
        role: Role,
        code: str,
        our_device_id: str,
        our_fingerprint: str,
        created_at: float,
        ttl: float = DEFAULT_TTL,
    ) -> None:
        """Set up one side; nothing is computed until `start`.

        :raises UserError: `code` is not a pairing code.
        :raises ValueError: `role`, our device id or our fingerprint is malformed.
        """
        if role not in ("waiting", "joining"):
            raise ValueError(f"role must be 'waiting' or 'joining', not {role!r}")
        if not is_device_id(our_device_id) or not is_fingerprint(our_fingerprint):
            raise ValueError("our device id or fingerprint is malformed")
        self.role: Role = role
        self.code = parse_code(code)
        self.our_device_id = our_device_id
        self.our_fingerprint = our_fingerprint
        self.expires_at = created_at + ttl
        self.state = State.EXPECT_START
        self._spake = _Spake(role, self.code.password)
        self._our_msg = b""
        self._expected_confirm = b""
        self._peer: PairingResult | None = None

    @property
    def nameplate(self) -> int:
        """The public number that lets the joining side find the waiting one."""
        return self.code.nameplate

    def get_timer(self) -> float | None:
        """When the session expires, or None once it is over."""
        return None if self.state in (State.PAIRED, State.FAILED) else self.expires_at

    def _step(self, event: str, now: float | None) -> State:
        # Check that `event` may happen now; the caller moves to the returned state once it succeeds.
        nxt = _TRANSITIONS.get((self.state, event))
        if nxt is None:
            was = self.state
            self._fail()
            if was in (State.PAIRED, State.FAILED):
                raise PairingSessionOver("this pairing is over; codes work once, so start a new one")
            raise PairingSessionOver(f"pairing step {event} came out of order; start a new pairing")
        if now is not None and now >= self.expires_at:
            self._fail()
            raise PairingExpired()
        return nxt

    def _fail(self) -> None:
        if self.state is not State.PAIRED:
            self.state = State.FAILED
        # Forget the secrets: nothing may be derived from this run any more.
        self._expected_confirm = b""

    def abort(self) -> None:
        """Burn the session because the connection around it failed; later calls raise."""
        self._fail()

    def start(self, now: float | None = None) -> bytes:
        """Our SPAKE2 message, to send to the peer; `now`, if given, is checked against the expiry.

        :raises PairingExpired: `now` is past the expiry.
        :raises PairingSessionOver: called twice or after the session ended.
        """
        nxt = self._step("start", now)
        self._our_msg = self._spake.start()
        self.state = nxt
        return self._our_msg

    def receive_pake(self, msg: bytes, peer_device_id: str, peer_fingerprint: str, now: float) -> bytes:
        """Take the peer's SPAKE2 message and the id and fingerprint this connection showed for it;
        return our key confirmation, to send to the peer.

        :raises PairingError: expired, out of order, or a malformed message; the session is burnt.
        """
        nxt = self._step("receive_pake", now)
        try:
            if not is_device_id(peer_device_id) or not is_fingerprint(peer_fingerprint):
                raise BadPairingMessage("the other device's id or fingerprint is malformed")
            if peer_device_id == self.our_device_id:
                raise BadPairingMessage("the other device has this device's id; a device cannot pair with itself")
            key = self._spake.finish(msg)
        except PairingError:
            self._fail()
            raise
        ours = (self.our_device_id.encode("ascii"), bytes.fromhex(self.our_fingerprint))
        theirs = (peer_device_id.encode("ascii"), bytes.fromhex(peer_fingerprint))
        if self.role == "waiting":
            (a_id, a_fp), (b_id, b_fp), msg_a, msg_b = ours, theirs, self._our_msg, msg
        else:
            (a_id, a_fp), (b_id, b_fp), msg_a, msg_b = theirs, ours, msg, self._our_msg
        transcript = _frame(
            _TRANSCRIPT_LABEL, str(self.code.nameplate).encode("ascii"), a_id, a_fp, b_id, b_fp, msg_a, msg_b
        )
        mac_a = _confirm_mac(key, _CONFIRM_LABEL_A, transcript)
        mac_b = _confirm_mac(key, _CONFIRM_LABEL_B, transcript)
        # Distinct labels per role, so a confirmation reflected back at its sender never matches.
        ours_mac, self._expected_confirm = (mac_a, mac_b) if self.role == "waiting" else (mac_b, mac_a)
        self._peer = PairingResult(peer_device_id=peer_device_id, peer_fingerprint=peer_fingerprint)
        self.state = nxt
        return ours_mac

    def receive_confirm(self, mac: bytes, now: float) -> PairingResult:
        """Check the peer's key confirmation; on success the peer may be pinned as verified.

        :raises WrongCodeError: it does not match (wrong code or a relay); the session is burnt.
        :raises PairingError: expired or out of order; the session is burnt.
        """
        nxt = self._step("receive_confirm", now)
        ok = hmac.compare_digest(mac, self._expected_confirm)
        if not ok:
            self._fail()
            raise WrongCodeError()
        assert self._peer is not None  # set by receive_pake, which the transition table requires first
        self.state = nxt
        self._expected_confirm = b""
        return self._peer
