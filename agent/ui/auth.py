"""Login tokens, sessions, CSRF tokens and the login rate limit (pure: the time is passed in).

The agent hands a one-time token to `tofu-agent ui` over its 0600 control socket; the page trades
it once, within `TOKEN_TTL`, for a session cookie. Only SHA-256 hashes of tokens and session ids
are kept, so a memory dump or a log line of this store reveals nothing usable.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import deque
from dataclasses import dataclass, field

TOKEN_TTL = 120.0  # seconds a login link stays valid
SESSION_IDLE = 8 * 3600.0  # a session unused this long ends
MAX_TOKENS = 16
MAX_SESSIONS = 32
LOGIN_WINDOW = 60.0
LOGIN_ATTEMPTS = 10  # login attempts (good or bad) per LOGIN_WINDOW


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()


class RateLimited(Exception):
    """Too many login attempts in the last minute."""


@dataclass(slots=True)
class Session:
    """One logged-in browser."""

    csrf: str
    last_used: float
    flash: list[tuple[str, str]] = field(default_factory=list)  # (kind, message), shown once


@dataclass(slots=True)
class Login:
    """What a redeemed token gives: the cookie value and the session behind it."""

    session_id: str
    session: Session


class Auth:
    """Tokens and sessions in memory; they end with the agent."""

    def __init__(self) -> None:
        self._tokens: dict[str, float] = {}  # sha256(token) -> expiry
        self._sessions: dict[str, Session] = {}  # sha256(session id) -> session
        self._attempts: deque[float] = deque()

    def issue_token(self, now: float) -> str:
        """A fresh one-time login token (the oldest unused one is dropped beyond MAX_TOKENS)."""
        self._tokens = {h: exp for h, exp in self._tokens.items() if exp > now}
        while len(self._tokens) >= MAX_TOKENS:
            del self._tokens[min(self._tokens, key=self._tokens.__getitem__)]
        token = secrets.token_urlsafe(32)
        self._tokens[_digest(token)] = now + TOKEN_TTL
        return token

    def redeem(self, token: str, now: float) -> Login | None:
        """Trade a token for a new session; None if it is unknown, used or expired.

        :raises RateLimited: more than LOGIN_ATTEMPTS attempts in LOGIN_WINDOW seconds.
        """
        while self._attempts and self._attempts[0] <= now - LOGIN_WINDOW:
            self._attempts.popleft()
        if len(self._attempts) >= LOGIN_ATTEMPTS:
            raise RateLimited
        self._attempts.append(now)
        expiry = self._tokens.pop(_digest(token), None)
        if expiry is None or expiry <= now:
            return None
        self._sessions = {h: s for h, s in self._sessions.items() if s.last_used > now - SESSION_IDLE}
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[min(self._sessions, key=lambda h: self._sessions[h].last_used)]
        session_id = secrets.token_urlsafe(32)
        session = Session(csrf=secrets.token_urlsafe(32), last_used=now)
        self._sessions[_digest(session_id)] = session
        return Login(session_id, session)

    def session(self, session_id: str | None, now: float) -> Session | None:
        """The live session behind a cookie value (and mark it used), or None."""
        if not session_id:
            return None
        key = _digest(session_id)
        s = self._sessions.get(key)
        if s is None:
            return None
        if s.last_used <= now - SESSION_IDLE:
            del self._sessions[key]
            return None
        s.last_used = now
        return s

    def end(self, session_id: str) -> None:
        """Log a session out."""
        self._sessions.pop(_digest(session_id), None)

    @staticmethod
    def csrf_ok(session: Session, sent: str | None) -> bool:
        """True if `sent` is the session's CSRF token (compared in constant time)."""
        return sent is not None and hmac.compare_digest(session.csrf.encode(), sent.encode("utf-8", "replace"))
