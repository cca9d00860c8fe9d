"""Alert webhooks: a local receiver that fails, then times out, then accepts; signed bodies; retries
that never block the service; a receiver that never answers ends as ``failed`` in the store."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
import time
from pathlib import Path

from trainer.fleet.webhooks import WebhookDispatcher, WebhookSettings, retry_at
from trainer.ops.broker import free_port
from trainer.store import Store
from trainer.store import webhook_queue as queue

from .mqtt_helpers import wait_until


class Receiver:
    """An HTTP receiver answering 500, then sleeping past the sender's timeout, then 200."""

    def __init__(self, script: list[str]) -> None:
        self.script, self.calls = list(script), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                what = outer.script.pop(0) if outer.script else "ok"
                if what == "slow":
                    time.sleep(2.0)
                self.send_response(500 if what == "fail" else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()


def test_a_failing_then_slow_receiver_gets_the_alert_once_signed_and_a_dead_one_is_given_up(
    tmp_path: Path,
) -> None:
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    rx = Receiver(["fail", "slow"])
    hooks = [
        WebhookSettings(
            name="ops",
            url=rx.url,
            kinds=["drift"],
            secret="s3cret",
            timeout_s=0.5,
            backoff_s=0.2,
            max_attempts=5,
        ),
        WebhookSettings(name="dead", url=f"http://127.0.0.1:{free_port()}/x", backoff_s=0.1, max_attempts=2),
    ]
    store.record_alert(kind="drift", message="before the webhooks existed", fleet="f")  # history: not sent
    dispatcher = WebhookDispatcher(store, hooks, interval_s=0.1).start()
    try:
        time.sleep(0.5)  # both webhooks have their cursor
        store.record_alert(kind="gate_failed", message="not a kind ops wants", fleet="f")
        store.record_alert(
            kind="drift", message="cam-1 drifts", fleet="f", device="cam-1", details={"js": 0.4}
        )
        t0 = time.monotonic()
        assert wait_until(lambda: len(queue.deliveries(store, "delivered")) == 1, 20), queue.deliveries(store)
        assert wait_until(lambda: len(queue.deliveries(store, "failed")) == 2, 20), queue.deliveries(store)
        assert time.monotonic() - t0 < 15
    finally:
        dispatcher.stop()
        rx.close()
    assert len(rx.calls) == 3  # 500, timeout, 200: the same delivery each time
    ids = {h["x-edgefleet-delivery"] for h, _ in rx.calls}
    assert len(ids) == 1
    headers, body = rx.calls[-1]
    assert (
        headers["x-edgefleet-signature"] == "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    )
    sent = json.loads(body)
    assert (sent["kind"], sent["device"], sent["details"]) == ("drift", "cam-1", {"js": 0.4})
    (ok,) = queue.deliveries(store, "delivered")
    assert ok.webhook == "ops" and ok.attempts == 3
    dead = queue.deliveries(store, "failed")
    assert {d.webhook for d in dead} == {"dead"} and all(
        d.attempts == 2 and "Error" in (d.last_error or "") for d in dead
    )
    store.close()


def test_retries_back_off_until_the_attempts_are_used() -> None:
    s = WebhookSettings(name="x", url="http://h/", backoff_s=2, max_backoff_s=10, max_attempts=4)
    assert [retry_at(s, n, 100.0) for n in (1, 2, 3, 4)] == [102.0, 104.0, 108.0, None]
