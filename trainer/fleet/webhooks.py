"""Alert webhooks (``webhooks:`` in trainer.yaml): every alert of the chosen kinds is POSTed as JSON to
each configured URL, signed, retried with backoff, and kept in the store until delivered or given up.

Each webhook has a thread of its own that queues new alerts (from any process: the store's alerts
table) and attempts what is due, one delivery at a time, so a receiver that hangs or fails delays
neither the other webhooks nor the service. An attempt has a total deadline (``timeout_s``): urllib's
timeout bounds each socket operation only, so a receiver dripping a byte at a time would otherwise
hold it open for ever. The body is the alert (id, kind, severity, message, fleet, device, details,
created_at); headers:

    X-EdgeFleet-Event: <alert kind>
    X-EdgeFleet-Delivery: <delivery id>          (the same on every retry: receivers dedupe on it)
    X-EdgeFleet-Signature: sha256=<hex HMAC-SHA256 of the body with the webhook's secret>

A 2xx answer is delivered; anything else (an error status, a redirect, a refused connection, the
deadline) is retried after ``backoff_s * 2^attempt`` (capped at ``max_backoff_s``) until
``max_attempts``, then ``failed``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from typing import Any

from pydantic import Field, field_validator

from edge_agent.config_files import StrictModel
from edge_agent.socket_deadline import SocketDeadline
from trainer.store import Store
from trainer.store import webhook_queue as queue
from trainer.store.schema import Alert

log = logging.getLogger(__name__)

SETTLE_S = 600.0
"""How long an alert may stay uncommitted below a newer one and still be delivered (webhook_queue)."""


class WebhookSettings(StrictModel):
    """One alert receiver."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
    url: str
    kinds: list[str] | None = None
    """Alert kinds to send (drift, canary_started, gate_failed, ...); all when absent."""
    secret: str | None = None
    """HMAC key of the signature header (use ${ENV} in trainer.yaml, not the secret itself)."""
    timeout_s: float = Field(default=5.0, gt=0)
    """The whole attempt (connect, send, the answer's status and headers) must finish within this."""
    max_attempts: int = Field(default=8, ge=1)
    backoff_s: float = Field(default=2.0, gt=0)
    max_backoff_s: float = Field(default=600.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL (got {v!r})")
        try:
            parts = urllib.parse.urlsplit(v)
            _ = parts.port  # a port that is not a number raises here
        except ValueError as exc:
            raise ValueError(f"{exc} (in {display_url(v)})") from None
        if not parts.hostname:
            raise ValueError(f"names no host (got {display_url(v)})")
        return v

    @property
    def shown_url(self) -> str:
        """The URL as the console and the CLI show it (nothing that may be secret)."""
        return display_url(self.url)


def display_url(url: str) -> str:
    """``url`` without what may carry a secret (user and password, path, query; a Slack-style URL keeps
    its token in the path): ``scheme://host:port/…``."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ":?"
    more = parts.path not in ("", "/") or bool(parts.query)
    return f"{parts.scheme}://{host}{port}/{'…' if more else ''}"


def signature(secret: str, body: bytes) -> str:
    """The ``X-EdgeFleet-Signature`` value of ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def retry_at(settings: WebhookSettings, attempts_done: int, now: float) -> float | None:
    """When to try again after ``attempts_done`` failed attempts; None once they are used up."""
    if attempts_done >= settings.max_attempts:
        return None
    return now + min(settings.max_backoff_s, settings.backoff_s * 2 ** (attempts_done - 1))


def alert_body(alert: Alert) -> bytes:
    """The JSON document POSTed for an alert."""
    return json.dumps(
        {
            "id": alert.id,
            "kind": alert.kind,
            "severity": alert.severity,
            "message": alert.message,
            "fleet": alert.fleet,
            "device": alert.device,
            "details": json.loads(alert.details) if alert.details else {},
            "created_at": alert.created_at,
        },
        separators=(",", ":"),
    ).encode()


def _watched(cls: type[http.client.HTTPConnection], deadline: SocketDeadline) -> Any:
    """A connection factory for urllib whose sockets ``deadline`` cuts (the proxy's, too)."""

    @functools.wraps(cls)
    def make(*args: Any, **kwargs: Any) -> http.client.HTTPConnection:
        conn = cls(*args, **kwargs)
        create = conn._create_connection  # type: ignore[attr-defined]
        conn._create_connection = lambda *a, **k: deadline.watch(create(*a, **k))  # type: ignore[attr-defined]
        return conn

    return make


class _HTTP(urllib.request.HTTPHandler):
    def __init__(self, deadline: SocketDeadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_watched(http.client.HTTPConnection, self.deadline), req)


class _HTTPS(urllib.request.HTTPSHandler):
    def __init__(self, deadline: SocketDeadline) -> None:
        super().__init__()
        self.deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_watched(http.client.HTTPSConnection, self.deadline), req)  # default TLS context


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not a delivery: urllib would follow a POST's 302 with a bodiless GET."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def post(
    settings: WebhookSettings, delivery_id: int, alert: Alert, deadline: SocketDeadline | None = None
) -> str | None:
    """One attempt within ``settings.timeout_s`` in all; None when the receiver answered 2xx, else what
    went wrong."""
    body = alert_body(alert)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "edgefleet-trainer",
        "X-EdgeFleet-Event": alert.kind,
        "X-EdgeFleet-Delivery": str(delivery_id),
    }
    if settings.secret:
        headers["X-EdgeFleet-Signature"] = signature(settings.secret, body)
    req = urllib.request.Request(settings.url, data=body, headers=headers, method="POST")
    limit = deadline or SocketDeadline(settings.timeout_s)
    opener = urllib.request.build_opener(_HTTP(limit), _HTTPS(limit), _NoRedirect())
    late = f"no complete answer within {settings.timeout_s:g} s (the attempt's deadline)"
    with limit:
        try:
            with opener.open(req, timeout=settings.timeout_s) as r:
                status = r.status
        except urllib.error.HTTPError as exc:
            exc.close()
            return late if limit.expired else f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            if limit.expired or isinstance(reason, TimeoutError):  # the deadline, or one silent read as long
                return late
            return f"{type(exc).__name__}: {reason}"
    if limit.expired:  # a cut mid-headers reads as their end: the status alone proves nothing
        return late
    return None if 200 <= status < 300 else f"HTTP {status}"


class Settled:
    """The newest alert id seen at least ``settle_s`` ago: an alert below it that is not committed yet
    has been in its transaction that long, so the queue's cursor may move up to it."""

    def __init__(self, settle_s: float) -> None:
        self.settle_s = settle_s
        self.value: int | None = None
        self._seen: deque[tuple[float, int]] = deque()

    def observe(self, newest: int, at: float) -> int | None:
        """Note ``newest`` as seen at monotonic time ``at``; returns the settled id."""
        self._seen.append((at, newest))
        while self._seen and self._seen[0][0] <= at - self.settle_s:
            self.value = self._seen.popleft()[1]
        return self.value


class HookWorker:
    """One webhook's thread: queue its alerts, attempt what is due one at a time, sleep, repeat."""

    def __init__(self, store: Store, hook: WebhookSettings, interval_s: float, settle_s: float) -> None:
        self.store, self.hook, self.interval_s = store, hook, interval_s
        self.settled = Settled(settle_s)
        self._stop = threading.Event()
        self._attempt: SocketDeadline | None = None
        self._thread = threading.Thread(target=self._run, name=f"webhook-{hook.name}", daemon=True)

    def start(self) -> HookWorker:
        self._thread.start()
        return self

    def stop_soon(self) -> None:
        """Stop after the attempt in flight, which is cut now (it is retried on the next start)."""
        self._stop.set()
        if (attempt := self._attempt) is not None:
            attempt.expire()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step(time.time())
            except Exception:  # noqa: BLE001 - a broken receiver or a database hiccup: try again later
                log.exception("webhook %s: delivery step failed", self.hook.name)
            self._stop.wait(self.interval_s)

    def step(self, now: float) -> dict[str, int]:
        """Queue new alerts and attempt what is due; returns what happened."""
        got = queue.enqueue(self.store, self.hook.name, self.hook.kinds, now, self.settled.value)
        self.settled.observe(got.newest, time.monotonic())
        sent = failed = 0
        for d in queue.due(self.store, self.hook.name, now):
            if self._stop.is_set():
                break
            self._attempt = SocketDeadline(self.hook.timeout_s)
            problem = post(self.hook, d.delivery_id, d.alert, self._attempt)
            self._attempt = None
            if problem is None:
                queue.delivered(self.store, d.delivery_id, time.time())
                sent += 1
            elif self._stop.is_set():
                break  # cut by stop(): not the receiver's failure
            else:
                self._failed(d, problem)
                failed += 1
        return {"queued": got.queued, "sent": sent, "failed": failed}

    def _failed(self, d: queue.Due, problem: str) -> None:
        """Record a failed attempt: retry later, or give up after the last."""
        again = retry_at(self.hook, d.attempts + 1, time.time())
        queue.attempt_failed(self.store, d.delivery_id, problem, again)
        name, attempts = self.hook.name, d.attempts + 1
        if again is None:
            log.error(
                "webhook %s: gave up on alert %d after %d attempts: %s", name, d.alert.id, attempts, problem
            )
        else:
            log.warning(
                "webhook %s: alert %d not delivered (%s); retrying in %.0f s",
                name,
                d.alert.id,
                problem,
                again - time.time(),
            )


class WebhookDispatcher:
    """Every configured webhook's :class:`HookWorker`, started and stopped together."""

    def __init__(
        self,
        store: Store,
        webhooks: list[WebhookSettings],
        interval_s: float = 1.0,
        settle_s: float = SETTLE_S,
    ) -> None:
        self.store, self.webhooks = store, webhooks
        self.workers = [HookWorker(store, h, interval_s, settle_s) for h in webhooks]

    def start(self) -> WebhookDispatcher:
        for w in self.workers:
            w.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every worker, cutting attempts in flight, and wait up to ``timeout`` for them all."""
        for w in self.workers:
            w.stop_soon()
        end = time.monotonic() + timeout
        for w in self.workers:
            w.join(max(0.0, end - time.monotonic()))
