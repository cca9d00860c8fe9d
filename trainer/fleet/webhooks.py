"""Alert webhooks (``webhooks:`` in trainer.yaml): every alert of the chosen kinds is POSTed as JSON to
each configured URL, signed, retried with backoff, and kept in the store until delivered or given up.

A dispatcher thread of its own queues new alerts (from any process: the store's alerts table) and
delivers what is due, so a receiver that hangs or fails never delays the service. The body is the
alert (id, kind, severity, message, fleet, device, details, created_at); headers:

    X-EdgeFleet-Event: <alert kind>
    X-EdgeFleet-Delivery: <delivery id>          (the same on every retry: receivers dedupe on it)
    X-EdgeFleet-Signature: sha256=<hex HMAC-SHA256 of the body with the webhook's secret>

A 2xx answer is delivered; anything else (an error status, a refused connection, a timeout) is retried
after ``backoff_s * 2^attempt`` (capped at ``max_backoff_s``) until ``max_attempts``, then ``failed``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from pydantic import Field, field_validator

from edge_agent.config_files import StrictModel
from trainer.store import Store
from trainer.store import webhook_queue as queue
from trainer.store.schema import Alert

log = logging.getLogger(__name__)


class WebhookSettings(StrictModel):
    """One alert receiver."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
    url: str
    kinds: list[str] | None = None
    """Alert kinds to send (drift, canary_started, gate_failed, ...); all when absent."""
    secret: str | None = None
    """HMAC key of the signature header (use ${ENV} in trainer.yaml, not the secret itself)."""
    timeout_s: float = Field(default=5.0, gt=0)
    max_attempts: int = Field(default=8, ge=1)
    backoff_s: float = Field(default=2.0, gt=0)
    max_backoff_s: float = Field(default=600.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL (got {v!r})")
        return v


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


def post(settings: WebhookSettings, delivery_id: int, alert: Alert) -> str | None:
    """One attempt; None when the receiver answered 2xx, else what went wrong."""
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
    try:
        with urllib.request.urlopen(req, timeout=settings.timeout_s) as r:
            return None if 200 <= r.status < 300 else f"HTTP {r.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:  # refused, unreachable, timed out
        return f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"


class WebhookDispatcher:
    """Queues and delivers alerts for every configured webhook on its own thread."""

    def __init__(self, store: Store, webhooks: list[WebhookSettings], interval_s: float = 1.0) -> None:
        self.store, self.webhooks, self.interval_s = store, webhooks, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)

    def start(self) -> WebhookDispatcher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            for hook in self.webhooks:
                try:
                    self.step(hook, time.time())
                except Exception:  # noqa: BLE001 - a broken receiver or a database hiccup: try again later
                    log.exception("webhook %s: delivery step failed", hook.name)
            self._stop.wait(self.interval_s)

    def step(self, hook: WebhookSettings, now: float) -> dict[str, Any]:
        """Queue new alerts and attempt what is due for one webhook; returns what happened."""
        queued = queue.enqueue(self.store, hook.name, hook.kinds, now)
        sent = failed = 0
        for d in queue.due(self.store, hook.name, now):
            if self._stop.is_set():
                break
            problem = post(hook, d.delivery_id, d.alert)
            if problem is None:
                queue.delivered(self.store, d.delivery_id, time.time())
                sent += 1
                continue
            again = retry_at(hook, d.attempts + 1, time.time())
            queue.attempt_failed(self.store, d.delivery_id, problem, again)
            failed += 1
            if again is None:
                log.error(
                    "webhook %s: gave up on alert %d after %d attempts: %s",
                    hook.name,
                    d.alert.id,
                    d.attempts + 1,
                    problem,
                )
            else:
                log.warning(
                    "webhook %s: alert %d not delivered (%s); retrying in %.0f s",
                    hook.name,
                    d.alert.id,
                    problem,
                    again - time.time(),
                )
        return {"queued": queued, "sent": sent, "failed": failed}
