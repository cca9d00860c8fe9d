"""Who may use the console: argon2 password checks, session cookies with a CSRF token, API tokens,
roles (viewer < labeller < operator < admin) and a login rate limit.

A session cookie is a random 256-bit token; the store keeps only its sha256, so a stolen database
does not log anyone in. Browsers send the cookie by themselves, so every state-changing call made
with one must also carry the session's CSRF token (form field ``csrf`` or header ``X-CSRF-Token``);
API tokens (``Authorization: Bearer ...``) are never sent by a browser on its own and need none.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import defaultdict, deque

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from trainer.store import Store
from trainer.store.console_users import Principal, set_password_hash, user

SESSION_COOKIE = "ef_session"
SESSION_TTL_S = 12 * 3600.0
_HASHER = PasswordHasher()  # argon2id, RFC 9106 low-memory profile
_DUMMY_HASH = _HASHER.hash("not a password")


def hash_password(password: str) -> str:
    """The argon2id hash of a password, with its salt and parameters."""
    if len(password) < 8:
        raise ValueError("a console password needs at least 8 characters")
    return _HASHER.hash(password)


def new_token() -> str:
    """A random 256-bit token, URL-safe (session cookies, CSRF tokens, API tokens)."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_password(store: Store, username: str, password: str) -> Principal | None:
    """The user if the password is right (re-hashed when argon2's parameters were raised), else None.
    Takes as long for an unknown user as for a wrong password, so names cannot be probed by timing."""
    u = user(store, username)
    try:
        _HASHER.verify(u.password_hash if u else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    if u is None:
        return None
    if _HASHER.check_needs_rehash(u.password_hash):
        set_password_hash(store, username, _HASHER.hash(password))
    return Principal(u.username, u.role)


def csrf_ok(principal: Principal, sent: str | None) -> bool:
    """API tokens need no CSRF token; a session must send its own."""
    if principal.csrf is None:
        return True
    return sent is not None and hmac.compare_digest(sent, principal.csrf)


class LoginLimiter:
    """At most ``attempts`` failed logins per client address and per user name in ``window_s``: a
    password guesser is slowed to a crawl, and a legitimate user is locked out only briefly."""

    def __init__(self, attempts: int = 5, window_s: float = 300.0) -> None:
        self.attempts, self.window_s = attempts, window_s
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._failures[key]
        while q and q[0] <= now - self.window_s:
            q.popleft()
        return q

    def retry_after(self, keys: list[str], now: float | None = None) -> float:
        """Seconds until another attempt is allowed for every key (0: allowed now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            waits = [
                q[0] + self.window_s - now for k in keys if len(q := self._recent(k, now)) >= self.attempts
            ]
        return max(waits, default=0.0)

    def failed(self, keys: list[str], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            for k in keys:
                self._recent(k, now).append(now)

    def succeeded(self, keys: list[str]) -> None:
        with self._lock:
            for k in keys:
                self._failures.pop(k, None)
