"""Console accounts in the store: users and roles, browser sessions, API tokens.

Only hashes are kept: argon2id for passwords (made by :mod:`trainer.console.auth`), sha256 for session
cookies and API tokens (random 256-bit values, so a fast hash is enough). Every change is audited.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import delete, select, update

from trainer.errors import StoreError
from trainer.store.engine import insert
from trainer.store.records import insert_audit
from trainer.store.schema import ApiToken, ConsoleSession, ConsoleUser
from trainer.store.store import Store

ROLES = ("viewer", "labeller", "operator", "admin")
"""Each role may do what the roles before it may."""


@dataclass(frozen=True)
class Principal:
    """Who is asking: a user and role, from a session cookie (with its CSRF token) or an API token."""

    username: str
    role: str
    csrf: str | None = None
    """The session's CSRF token; None for API tokens (not sent by browsers, so not forgeable by a page)."""

    def may(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def add_user(store: Store, username: str, password_hash: str, role: str, *, actor: str) -> None:
    """Create a user (StoreError if the name is taken or the role unknown)."""
    if role not in ROLES:
        raise StoreError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    with store.write() as conn:
        if conn.scalar(select(ConsoleUser.username).where(ConsoleUser.username == username)):
            raise StoreError(f"console user {username!r} exists already")
        conn.execute(
            insert(conn, ConsoleUser.__table__),
            {"username": username, "password_hash": password_hash, "role": role, "created_at": time.time()},
        )
        insert_audit(conn, actor, "user.add", f"user/{username}", {"role": role})


def remove_user(store: Store, username: str, *, actor: str) -> bool:
    """Delete a user with their sessions and tokens; False if there was none."""
    with store.write() as conn:
        conn.execute(delete(ConsoleSession).where(ConsoleSession.username == username))
        conn.execute(delete(ApiToken).where(ApiToken.username == username))
        gone = conn.execute(delete(ConsoleUser).where(ConsoleUser.username == username)).rowcount
        if gone:
            insert_audit(conn, actor, "user.remove", f"user/{username}", None)
        return bool(gone)


def users(store: Store) -> list[ConsoleUser]:
    with store.read_session() as s:
        return list(s.scalars(select(ConsoleUser).order_by(ConsoleUser.username)))


def user(store: Store, username: str) -> ConsoleUser | None:
    with store.read_session() as s:
        return s.get(ConsoleUser, username)


def set_password_hash(store: Store, username: str, password_hash: str) -> None:
    """Store a re-hashed password (argon2 parameters raised since it was set)."""
    with store.write() as conn:
        conn.execute(
            update(ConsoleUser).where(ConsoleUser.username == username).values(password_hash=password_hash)
        )


def open_session(store: Store, username: str, token_sha256: str, csrf: str, ttl_s: float) -> None:
    now = time.time()
    with store.write() as conn:
        conn.execute(delete(ConsoleSession).where(ConsoleSession.expires_at < now))
        conn.execute(
            insert(conn, ConsoleSession.__table__),
            {
                "token_sha256": token_sha256,
                "username": username,
                "csrf": csrf,
                "created_at": now,
                "expires_at": now + ttl_s,
            },
        )
        insert_audit(conn, username, "session.open", f"user/{username}", None)


def close_session(store: Store, token_sha256: str) -> None:
    with store.write() as conn:
        conn.execute(delete(ConsoleSession).where(ConsoleSession.token_sha256 == token_sha256))


def session_principal(store: Store, token_sha256: str, now: float) -> Principal | None:
    """The user of a live session, or None (unknown or expired)."""
    q = (
        select(ConsoleUser.username, ConsoleUser.role, ConsoleSession.csrf)
        .join(ConsoleSession, ConsoleSession.username == ConsoleUser.username)
        .where(ConsoleSession.token_sha256 == token_sha256, ConsoleSession.expires_at > now)
    )
    with store.engine.connect() as conn:
        row = conn.execute(q).first()
    return None if row is None else Principal(row[0], row[1], row[2])


def add_token(store: Store, username: str, name: str, token_sha256: str, *, actor: str) -> int:
    with store.write() as conn:
        if not conn.scalar(select(ConsoleUser.username).where(ConsoleUser.username == username)):
            raise StoreError(f"no console user {username!r}")
        tid = conn.execute(
            insert(conn, ApiToken.__table__).returning(ApiToken.id),
            {"name": name, "username": username, "token_sha256": token_sha256, "created_at": time.time()},
        ).scalar_one()
        insert_audit(conn, actor, "token.add", f"user/{username}", {"token": name, "id": tid})
        return int(tid)


def token_principal(store: Store, token_sha256: str) -> Principal | None:
    """The user an API token acts as (its last use is recorded, at most once a minute)."""
    q = (
        select(ConsoleUser.username, ConsoleUser.role, ApiToken.id, ApiToken.last_used_at)
        .join(ApiToken, ApiToken.username == ConsoleUser.username)
        .where(ApiToken.token_sha256 == token_sha256)
    )
    with store.engine.connect() as conn:
        row = conn.execute(q).first()
    if row is None:
        return None
    now = time.time()
    if row[3] is None or now - row[3] > 60:
        with store.write() as conn:
            conn.execute(update(ApiToken).where(ApiToken.id == row[2]).values(last_used_at=now))
    return Principal(row[0], row[1], None)


def tokens(store: Store) -> list[ApiToken]:
    with store.read_session() as s:
        return list(s.scalars(select(ApiToken).order_by(ApiToken.id)))


def remove_token(store: Store, token_id: int, *, actor: str) -> bool:
    with store.write() as conn:
        gone = conn.execute(delete(ApiToken).where(ApiToken.id == token_id)).rowcount
        if gone:
            insert_audit(conn, actor, "token.remove", f"token/{token_id}", None)
        return bool(gone)
