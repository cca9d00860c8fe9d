"""Request dependencies of the console: the context it serves from, who is asking, and what they may do."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request

from edge_agent.config import MqttSettings
from trainer.console.auth import SESSION_COOKIE, LoginLimiter, csrf_ok, token_hash
from trainer.release.repository import ReleaseRepository
from trainer.store import Store
from trainer.store.console_users import Principal, session_principal, token_principal


class NotLoggedIn(Exception):
    """No valid session or token: the API answers 401, pages redirect to the login form."""


@dataclass
class ConsoleContext:
    """What the console serves from: the trainer's store, its release repository, the fleet's broker."""

    store: Store
    fleet: str | None = None
    """The fleet of the trainer.yaml it was started with (pages default to it)."""
    model: str | None = None
    repo_path: Path | None = None
    mqtt: MqttSettings | None = None
    """Where promote/abort announce the new release (hint) to devices."""
    webhooks: dict[str, str] = field(default_factory=dict)
    """Alert webhooks of its trainer.yaml: name -> URL as shown (``WebhookSettings.shown_url``)."""
    secure_cookies: bool = False
    session_ttl_s: float = 12 * 3600.0
    refresh_s: float = 5.0
    limiter: LoginLimiter = field(default_factory=LoginLimiter)
    metrics: Any = None
    """The trainer service's Prometheus registry when the console runs in its process (``/metrics``)."""
    metrics_auth: str = "token"
    """``token``: /metrics needs an API token as bearer token; ``none``: anyone may scrape."""
    scrape_tokens: dict[str, float] = field(default_factory=dict)
    """API token hashes that scraped /metrics, and when they were last checked against the store."""
    _broker_seen: tuple[float, bool] = (0.0, True)

    def repo(self) -> ReleaseRepository | None:
        if self.repo_path is None or not (self.repo_path / "repository.json").exists():
            return None
        return ReleaseRepository(self.repo_path)

    def broker_up(self) -> bool | None:
        """Whether the fleet's broker accepts TCP connections (checked at most every 15 s); None if unknown."""
        if self.mqtt is None:
            return None
        at, up = self._broker_seen
        if time.monotonic() - at > 15.0:
            try:
                with socket.create_connection((self.mqtt.host, self.mqtt.port), timeout=0.5):
                    up = True
            except OSError:
                up = False
            self._broker_seen = (time.monotonic(), up)
        return up


def context(request: Request) -> ConsoleContext:
    ctx: ConsoleContext = request.app.state.ctx
    return ctx


Ctx = Annotated[ConsoleContext, Depends(context)]


def principal(request: Request, ctx: Ctx) -> Principal:
    """The caller, from ``Authorization: Bearer <token>`` or the session cookie (NotLoggedIn otherwise)."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        who = token_principal(ctx.store, token_hash(auth[7:].strip()))
    elif cookie := request.cookies.get(SESSION_COOKIE):
        who = session_principal(ctx.store, token_hash(cookie), time.time())
    else:
        who = None
    if who is None:
        raise NotLoggedIn()
    return who


Who = Annotated[Principal, Depends(principal)]


def require(role: str) -> Any:
    """A dependency: the caller, if their role is at least ``role`` (403 otherwise)."""

    def dep(who: Who) -> Principal:
        if not who.may(role):
            raise HTTPException(403, f"{who.username} is a {who.role}; this needs the {role} role")
        return who

    return Depends(dep)


def writer(role: str) -> Any:
    """Like :func:`require`, for state-changing calls: a session must also send its CSRF token
    (header ``X-CSRF-Token`` or form field ``csrf``), else 403 and nothing changes."""

    async def dep(request: Request, who: Who) -> Principal:
        if not who.may(role):
            raise HTTPException(403, f"{who.username} is a {who.role}; this needs the {role} role")
        sent = request.headers.get("x-csrf-token")
        if sent is None and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")
        ):
            value = (await request.form()).get("csrf")
            sent = value if isinstance(value, str) else None
        if not csrf_ok(who, sent):
            raise HTTPException(403, "missing or stale CSRF token: reload the page and try again")
        return who

    return Depends(dep)
