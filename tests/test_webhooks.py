"""Alert webhooks: a local receiver that fails, then times out, then accepts; signed bodies; retries
that never block the service; a receiver that never answers ends as ``failed`` in the store."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from trainer.fleet.service import TrainerService
from trainer.fleet.webhooks import (
    HookWorker,
    Settled,
    WebhookDispatcher,
    WebhookSettings,
    display_url,
    post,
    retry_at,
)
from trainer.ops.broker import MosquittoBroker, free_port
from trainer.sim.demo import Timeline
from trainer.store import Alert, Store
from trainer.store import webhook_queue as queue
from trainer.store.records import insert_alert
from trainer.store.schema import WebhookCursor

from .mqtt_helpers import wait_until
from .test_fleet_loop import _service_config


class Receiver:
    """An HTTP receiver following a script, one step per request: ``fail`` (500), ``slow`` (200 after
    2 s), ``hang`` (no answer until closed), ``redirect`` (302); then 200."""

    def __init__(self, script: list[str]) -> None:
        self.script, self.calls, self.times = list(script), [], []
        self.finished, self.released = 0, threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                outer.times.append(time.monotonic())
                what = outer.script.pop(0) if outer.script else "ok"
                if what == "slow":
                    time.sleep(2.0)
                if what == "hang":
                    outer.released.wait(60)
                status = {"fail": 500, "redirect": 302}.get(what, 200)
                self.send_response(status)
                if status == 302:
                    self.send_header("Location", outer.url)
                self.send_header("Content-Length", "0")
                self.end_headers()
                outer.finished += 1

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.released.set()
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


# -- independence, deadlines, commit order (the monitoring issue's audit) ---------------------------


def _hook(name: str, url: str, **kw: object) -> WebhookSettings:
    return WebhookSettings.model_validate({"name": name, "url": url, "backoff_s": 0.2, **kw})


def test_a_hanging_webhook_delays_neither_the_other_webhooks_nor_the_writers(tmp_path: Path) -> None:
    """Three alerts; one receiver hangs past its deadline, one answers 500 once, one is healthy. The
    healthy one has all three while the hanging one's first attempt is still open (one thread used to
    try every hook in turn: 3 x the deadline before the healthy hook's turn)."""
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    hang, flaky, ok = Receiver(["hang"] * 10), Receiver(["fail"]), Receiver([])
    hooks = [
        _hook("hang", hang.url, timeout_s=2.0, max_attempts=1),
        _hook("flaky", flaky.url, timeout_s=2.0),
        _hook("ok", ok.url, timeout_s=2.0),
    ]
    dispatcher = WebhookDispatcher(store, hooks, interval_s=0.1).start()
    try:
        assert wait_until(lambda: _cursors(store) == 3, 10)
        t_alert = time.monotonic()
        ids = [store.record_alert(kind="drift", message=f"cam-{i} drifts", fleet="f") for i in range(3)]
        assert wait_until(lambda: len(ok.calls) == 3, 10), ok.calls
        assert len(hang.calls) == 1 and hang.finished == 0  # its first attempt is still open
        assert ok.times[-1] - t_alert < hooks[2].timeout_s  # within one timeout of the alert
        assert [json.loads(b)["id"] for _, b in ok.calls] == ids
        writing = time.monotonic()
        store.record_alert(kind="gate_failed", message="written while a receiver hangs", fleet="f")
        assert time.monotonic() - writing < 2.0  # no attempt holds the store's write lock
        assert wait_until(lambda: _states(store, "flaky") == {"delivered": 4}, 10), queue.deliveries(store)
        assert _states(store, "hang").get("pending")  # the 500 was retried before the hang ended
        assert wait_until(lambda: _states(store, "hang") == {"failed": 4}, 30), queue.deliveries(store)
    finally:
        dispatcher.stop()
        for rx in (hang, flaky, ok):
            rx.close()
    hung = [d for d in queue.deliveries(store, "failed")]
    assert all("deadline" in (d.last_error or "") for d in hung), [d.last_error for d in hung]
    assert len(flaky.calls) == 5  # one 500, then all four delivered
    store.close()


def _cursors(store: Store) -> int:
    with store.read_session() as s:
        return len(list(s.scalars(select(WebhookCursor))))


def _states(store: Store, webhook: str) -> dict[str, int]:
    return dict(Counter(d.state for d in queue.deliveries(store) if d.webhook == webhook))


class Dripper:
    """A TCP server that reads the request, then sends ``first`` and one byte every 0.2 s for 30 s:
    every read finishes well within a per-operation timeout, the answer never does."""

    def __init__(self, first: bytes) -> None:
        self.first, self.done = first, threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.recv(65536)
            try:
                conn.sendall(self.first)
                for _ in range(150):
                    if self.done.wait(0.2):
                        break
                    conn.sendall(b"a")
            except OSError:  # the client cut it
                pass

    def close(self) -> None:
        self.done.set()
        self.sock.close()


@pytest.mark.parametrize(
    "scheme,first",
    [
        ("http", b"HTTP/1.1 200 OK\r\nX-Slow: "),  # a header line that never ends
        ("https", b"\x16\x03\x03\x40\x00"),  # a 16 KiB TLS handshake record, a byte at a time
    ],
)
def test_a_dripping_receiver_is_cut_at_the_attempts_deadline(scheme: str, first: bytes) -> None:
    drip = Dripper(first)
    hook = _hook("drip", f"{scheme}://127.0.0.1:{drip.port}/hook", timeout_s=1.0)
    alert = Alert(id=1, kind="drift", severity="warning", message="m", created_at=time.time())
    try:
        t0 = time.monotonic()
        problem = post(hook, 1, alert)
        took = time.monotonic() - t0
    finally:
        drip.close()
    assert problem is not None and "deadline" in problem, problem
    assert took < 4.0, took  # the drip lasts 30 s; the deadline is 1 s


def test_a_redirect_is_not_a_delivery_and_a_stopped_dispatcher_cuts_its_attempt(tmp_path: Path) -> None:
    rx = Receiver(["redirect"])
    alert = Alert(id=1, kind="drift", severity="warning", message="m", created_at=time.time())
    assert post(_hook("r", rx.url), 1, alert) == "HTTP 302"
    assert len(rx.calls) == 1  # not followed by a bodiless GET
    rx.close()
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    hang = Receiver(["hang"])
    dispatcher = WebhookDispatcher(store, [_hook("hang", hang.url, timeout_s=60.0)], interval_s=0.1).start()
    try:
        assert wait_until(lambda: _cursors(store) == 1, 10)
        store.record_alert(kind="drift", message="m", fleet="f")
        assert wait_until(lambda: len(hang.calls) == 1, 10)
        t0 = time.monotonic()
        dispatcher.stop()
        assert time.monotonic() - t0 < 5.0  # not the 60 s deadline (nor stop's 10 s)
    finally:
        hang.close()
    (d,) = queue.deliveries(store)
    assert (d.state, d.attempts) == ("pending", 0)  # cut by the stop: tried again on the next start
    store.close()


def test_an_alert_committed_after_a_newer_one_is_still_delivered(pg_url: str, tmp_path: Path) -> None:
    """PostgreSQL hands out ids before commit: alert N may commit after N+1 (two ingest workers). A
    cursor at the newest id skipped N for ever; the queue looks for alerts without a delivery."""
    service, worker, other = Store(pg_url), Store(pg_url), Store(pg_url)
    rx = Receiver([])
    hook = HookWorker(service, _hook("ops", rx.url), interval_s=0.1, settle_s=60.0)
    try:
        hook.step(time.time())  # a new webhook: starts at the newest alert
        with worker.write() as slow:  # an ingest worker's batch, still open
            first = insert_alert(slow, kind="drift", message="raised first, committed last", fleet="f")
            second = other.record_alert(kind="drift", message="raised second", fleet="f")
            assert first is not None and second is not None and first < second
            assert hook.step(time.time())["sent"] == 1  # sees only the second
        assert hook.step(time.time())["sent"] == 1  # the first, once it commits
        assert hook.step(time.time()) == {"queued": 0, "sent": 0, "failed": 0}  # once each
    finally:
        rx.close()
        for s in (service, worker, other):
            s.close()
    assert sorted(json.loads(b)["id"] for _, b in rx.calls) == [first, second]


def test_the_cursor_moves_only_to_an_id_that_was_the_newest_long_enough_ago() -> None:
    s = Settled(10.0)
    assert [s.observe(5, 0.0), s.observe(7, 4.0), s.observe(9, 10.0), s.observe(9, 14.5)] == [
        None,
        None,
        5,
        7,
    ]


def test_webhook_urls_are_checked_and_shown_without_secrets() -> None:
    with pytest.raises(ValidationError, match="(?i)port out of range"):
        WebhookSettings(name="x", url="https://hooks.example:99999/x")
    with pytest.raises(ValidationError, match="names no host"):
        WebhookSettings(name="x", url="http:///path")
    s = WebhookSettings(name="x", url="https://bot:pw@hooks.slack.example:8443/services/T0/B0/XyZ?token=t")
    assert s.shown_url == "https://hooks.slack.example:8443/…"
    assert display_url("http://[::1]/") == "http://[::1]/"


def test_the_service_ticks_and_stops_while_a_receiver_hangs(tmp_path: Path, broker: MosquittoBroker) -> None:
    """The real service: its alert reaches the healthy webhook, its ticks run, and stop() returns, all
    while the other receiver holds its first attempt open (stop used to wait for it, up to 10 s)."""
    hang, ok = Receiver(["hang"]), Receiver([])
    cfg = _service_config(tmp_path, broker.url, base_data="builtin:shapes")
    cfg.fleet = "hooks"  # its own topics on the session broker
    cfg.webhooks = [_hook("hang", hang.url, timeout_s=30.0), _hook("ok", ok.url)]
    service = TrainerService(cfg, timeline=Timeline(echo=False)).start()
    try:
        assert wait_until(lambda: _cursors(service.store) == 2, 10)
        service._alert("drift", "cam-1 drifts", device="cam-1")
        assert wait_until(lambda: len(ok.calls) == 1 and len(hang.calls) == 1, 10), (ok.calls, hang.calls)
        errors = service.errors
        for _ in range(3):
            service.tick(time.time())
        assert service.errors == errors and hang.finished == 0  # ticked while the attempt is open
        t0 = time.monotonic()
        service.stop()
        stopped = time.monotonic() - t0
        assert hang.finished == 0  # stop() did not wait for the receiver
        assert stopped < 8.0, stopped
    finally:
        hang.close()
        ok.close()
    assert json.loads(ok.calls[0][1])["message"] == "cam-1 drifts"


def test_the_cli_lists_deliveries_by_state_without_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_agent.cli import main as edgefleet

    db = tmp_path / "fleet.db"
    store = Store(f"sqlite:///{db}")
    queue.enqueue(store, "ops", None, 0.0)
    ids = [store.record_alert(kind="drift", message=f"alert {i}", fleet="f") for i in range(2)]
    queue.enqueue(store, "ops", None, 1.0)
    first, second = queue.deliveries(store)
    queue.attempt_failed(store, first.id, "HTTP 500", None)
    queue.attempt_failed(store, second.id, "HTTP 503", 99.0)
    store.close()
    config = tmp_path / "trainer.yaml"
    config.write_text(
        f"fleet: f\nmqtt: {{url: 'mqtt://127.0.0.1:1883'}}\ndb_url: 'sqlite:///{db}'\nrelease: {{repo: repo}}\n"
        "training: {base_data: 'builtin:shapes'}\n"
        "webhooks: [{name: ops, url: 'https://hooks.example/services/T0/tok3n', secret: s3cret}]\n"
    )
    assert edgefleet(["trainer", "webhooks", "--config", str(config), "--state", "failed"]) == 0
    out = capsys.readouterr().out
    [line] = [json.loads(x) for x in out.splitlines()]
    assert (line["alert_id"], line["state"], line["attempts"], line["last_error"]) == (
        ids[0],
        "failed",
        1,
        "HTTP 500",
    )
    assert line["url"] == "https://hooks.example/…" and "tok3n" not in out and "s3cret" not in out
    assert edgefleet(["trainer", "webhooks", "--config", str(config), "--limit", "1"]) == 0
    captured = capsys.readouterr()
    [newest] = [json.loads(x) for x in captured.out.splitlines()]
    assert (newest["alert_id"], newest["state"], newest["next_attempt_at"]) == (ids[1], "pending", 99.0)
    assert "1 of 2 deliveries shown" in captured.err
    assert edgefleet(["trainer", "webhooks", "--config", str(config), "--limit", "0"]) == 2
    assert "--limit" in capsys.readouterr().err
