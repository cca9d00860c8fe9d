"""Serving the console: from a trainer.yaml (its store, repository, broker and ``console:`` section),
with uvicorn, in the foreground (``edgefleet console``) or on a thread beside the service."""

from __future__ import annotations

import logging
import ssl
import threading
import time
import urllib.request
from typing import Any

import uvicorn

from edge_agent.sd_notify import Notifier
from trainer.console.app import create_app
from trainer.console.auth import LoginLimiter
from trainer.console.deps import ConsoleContext
from trainer.fleet.config import ConsoleSettings, TrainerServiceConfig
from trainer.store import Store

log = logging.getLogger(__name__)


def context_for(
    cfg: TrainerServiceConfig, store: Store, settings: ConsoleSettings, metrics: Any = None
) -> ConsoleContext:
    """The console of one trainer service's fleet; ``metrics``, the service's Prometheus registry when
    the console runs in its process, is served at ``/metrics`` (``metrics.console_auth`` says to whom)."""
    return ConsoleContext(
        store=store,
        fleet=cfg.fleet,
        model=cfg.training.model,
        repo_path=cfg.release.repo,
        mqtt=cfg.mqtt,
        webhooks={h.name: h.shown_url for h in cfg.webhooks},
        secure_cookies=settings.tls_cert is not None,
        session_ttl_s=settings.session_hours * 3600,
        refresh_s=settings.refresh_s,
        limiter=LoginLimiter(settings.login_attempts),
        metrics=metrics if cfg.metrics is not None else None,
        metrics_auth=cfg.metrics.console_auth if cfg.metrics is not None else "token",
    )


class ConsoleServer:
    """uvicorn on a thread of its own: ``start()`` returns once it listens, ``stop()`` ends it."""

    def __init__(self, ctx: ConsoleContext, settings: ConsoleSettings) -> None:
        self.settings = settings
        self.app = create_app(ctx)
        config = uvicorn.Config(
            self.app,
            host=settings.host,
            port=settings.port,
            log_level="warning",
            access_log=False,
            ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
            ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        )
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.tls_cert else "http"
        port = self.settings.port
        if self.server.started and self.server.servers:
            port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"{scheme}://{self.settings.host}:{port}"

    def start(self, timeout: float = 20.0) -> ConsoleServer:
        self._thread = threading.Thread(target=self.server.run, name="console", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the console did not start on {self.settings.host}:{self.settings.port}")
            time.sleep(0.05)
        log.info("console at %s", self.url)
        return self

    def serve_until(self, done: threading.Event, notifier: Notifier | None = None) -> None:
        """Wait for ``done`` (``edgefleet console`` in the foreground), telling systemd the console is ready
        and, each time its own ``/healthz`` answers, alive (deploy/systemd/edgefleet-console.service)."""
        notifier = notifier or Notifier()
        notifier.ready(f"console at {self.url}")
        # check every quarter interval: a ping is due every half, and a check may take a while
        step = notifier.watchdog_s / 4 if notifier.watchdog_s else None
        while not done.wait(step):
            if self.answers(timeout=min(5.0, step or 5.0)):
                notifier.ping(f"console at {self.url}: /healthz answers")
            else:
                notifier.status(f"console at {self.url}: /healthz does not answer")
        notifier.stopping(f"console at {self.url}: stopping")

    def answers(self, timeout: float = 5.0) -> bool:
        """The app answers ``GET /healthz`` over the listening socket (uvicorn's loop and the app run)."""
        scheme, _, rest = self.url.partition("://")
        host, _, port = rest.rpartition(":")
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        host = f"[{host}]" if ":" in host else host
        context = None
        if scheme == "https":  # its own certificate, over loopback: a liveness check, not a trust decision
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        # no proxy: an http_proxy in the service's environment must not stand in for this server
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        try:
            with opener.open(f"{scheme}://{host}:{port}/healthz", timeout=timeout) as resp:
                return bool(resp.status == 200)
        except OSError as exc:
            log.warning("console /healthz did not answer: %s", exc)
            return False

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
