"""Ingest end to end: real mosquitto, real SQLite and PostgreSQL, real worker processes; no mocks.

Each test uses its own fleet name (so its own topics and shared-subscription sessions) on the session
broker, or a private broker when it needs one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy.engine import make_url

from edge_agent.config import MqttSettings
from edge_agent.protocol import (
    MAX_MESSAGE_BYTES,
    Status,
    TelemetryWindow,
    UpdateEvent,
    status_topic,
    tele_topic,
)
from edge_agent.protocol import Sample as SampleMessage
from trainer.ingest.batching import WriterLimits
from trainer.ingest.routing import Accepted, classify, subscription
from trainer.ingest.worker import IngestConfig, IngestWorker
from trainer.ops.broker import MosquittoBroker
from trainer.sim.windows import model_ref, tiny_window, windows
from trainer.store import Store
from trainer.store.engine import WriteLock

from .conftest import require
from .mqtt_helpers import wait_until
from .pg_helpers import PrivatePostgres, find_pg_bin
from .test_store import manifest


class Publisher:
    """A plain paho QoS 1 publisher that can wait for every PUBACK."""

    def __init__(self, url: str) -> None:
        port = int(url.rsplit(":", 1)[1])
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(200)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.infos: list[mqtt.MQTTMessageInfo] = []

    def send(self, topic: str, payload: bytes) -> None:
        self.infos.append(self.client.publish(topic, payload, qos=1))

    def send_all(self, messages: Sequence[tuple[str, bytes]], rate: float | None = None) -> None:
        t0 = time.monotonic()
        for i, (topic, payload) in enumerate(messages):
            if rate:
                ahead = t0 + i / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            self.send(topic, payload)

    def wait(self, timeout: float = 30) -> None:
        for info in self.infos:
            info.wait_for_publish(timeout)
            assert info.is_published()

    def close(self) -> None:
        self.wait()
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(broker: MosquittoBroker) -> Iterator[Publisher]:
    pub = Publisher(broker.url)
    yield pub
    pub.close()


@pytest.fixture
def start_worker() -> Iterator[Callable[..., IngestWorker]]:
    """Start in-process workers; every one still running is stopped at teardown."""
    started: list[IngestWorker] = []

    def start(**kwargs: object) -> IngestWorker:
        w = IngestWorker(IngestConfig(**kwargs)).start()  # type: ignore[arg-type]
        started.append(w)
        assert w.wait_connected(10), "worker did not subscribe"
        return w

    yield start
    for w in started:
        if w.client.is_connected() or w._writer and w._writer.is_alive():
            w.stop(timeout=5)


def tele(fleet: str, w: TelemetryWindow) -> tuple[str, bytes]:
    return tele_topic(fleet, w.device), w.to_bytes()


def handled(w: IngestWorker) -> int:
    s = w.stats()
    return s["stored"] + s["duplicates"] + s["dead_lettered"]


def test_classify_names_every_problem() -> None:
    w = tiny_window("cam1", 0, fleet="f")
    topic = tele_topic("f", "cam1")
    status = Status(fleet="f", device="cam1", state="online", session=1, ts=1.0).to_bytes()
    bad_seq = json.loads(w.to_bytes())
    bad_seq["seq"] = -1
    cases = {
        "not_json": (topic, b"\x00\xffnot json"),
        "oversized": (topic, b" " * (MAX_MESSAGE_BYTES + 1)),
        "invalid": (topic, json.dumps(bad_seq).encode()),
        "wrong_kind": (topic, status),
        "topic_mismatch": (tele_topic("f", "cam2"), w.to_bytes()),
        "unknown_topic": ("ef/v1/f/dev/cam1/pred", b"{}"),
    }
    for reason, (t, payload) in cases.items():
        r = classify(t, payload, 0.0)
        assert not isinstance(r, Accepted) and r.reason == reason, (reason, r)
    ok = classify(topic, w.to_bytes(), 5.0)
    assert (
        isinstance(ok, Accepted) and ok.kind == "tele" and ok.item.message == w and ok.item.received_at == 5.0
    )
    assert subscription("g", "f", "tele") == "$share/g/ef/v1/f/dev/+/tele"


def test_validates_dedupes_dead_letters_and_flags_unknown_models(
    db_url: str,
    broker: MosquittoBroker,
    publisher: Publisher,
    start_worker,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fleet = f"val{abs(hash(db_url)) % 10**6}"
    v1 = model_ref(version="1.0.0")
    with Store(db_url) as store:
        store.register_model(manifest("1.0.0"), v1.sha256)
    worker = start_worker(mqtt=MqttSettings(url=broker.url), db_url=db_url, fleet=fleet, group="val")
    good = windows("cam1", 20, fleet=fleet, model=v1)
    unknown = windows("cam2", 3, fleet=fleet, model=model_ref(version="6.6.6"), seed=1)
    online = Status(fleet=fleet, device="cam1", state="online", session=1, ts=1.0, model=v1)
    bad_seq = json.loads(good[0].to_bytes())
    bad_seq["seq"] = -1
    msgs = [tele(fleet, w) for w in good[10:][::-1]]  # out of order
    msgs += [(status_topic(fleet, "cam1"), online.to_bytes())]
    msgs += [tele(fleet, w) for w in good[:10] + good[5:8]]  # three duplicates
    msgs += [tele(fleet, w) for w in unknown]
    t = tele_topic(fleet, "cam1")
    msgs += [
        (t, b"\x00\xffnot json"),
        (t, b"{" + b" " * MAX_MESSAGE_BYTES + b"}"),
        (t, json.dumps(bad_seq).encode()),
        (t, online.to_bytes()),  # a status on the tele topic
        (tele_topic(fleet, "cam9"), good[0].to_bytes()),  # cam1's window on cam9's topic
    ]
    publisher.send_all(msgs)
    publisher.wait()
    assert wait_until(lambda: handled(worker) == len(msgs), 20), worker.stats()
    s = worker.stats()
    assert (s["stored"], s["duplicates"], s["dead_lettered"]) == (20 + 1 + 3, 3, 5)
    assert s["dead_letter_reasons"] == {
        "not_json": 1,
        "oversized": 1,
        "invalid": 1,
        "wrong_kind": 1,
        "topic_mismatch": 1,
    }
    assert s["unknown_model"] == 3 and s["alerts"] == 1
    assert s["acked"] == s["received"] == len(msgs)
    with Store(db_url, create=False) as store:
        assert store.window_keys() == [("cam1", 1, i) for i in range(20)] + [("cam2", 1, i) for i in range(3)]
        assert store.windows(device="cam1")[7] == good[7]
        assert {d.reason: d.payload_size for d in store.dead_letters()}["oversized"] == MAX_MESSAGE_BYTES + 2
        assert {d.reason for d in store.dead_letters()} == set(s["dead_letter_reasons"])
        (alert,) = store.alerts()
        assert (alert.kind, alert.device) == ("unknown_model", "cam2")
        assert store.latest_status()["cam1"] == online
        dev = store.device("cam1")
        assert dev is not None and dev.last_window_end == good[-1].end and dev.state == "online"
    worker.stop()
    # Everything was acknowledged: the same persistent session, resumed, gets nothing again.
    again = start_worker(mqtt=MqttSettings(url=broker.url), db_url=db_url, fleet=fleet, group="val")
    time.sleep(1.0)
    assert again.stats()["received"] == 0
    from edge_agent.cli import main

    assert main(["ingest", "dead-letters", "--db", db_url]) == 0
    out = capsys.readouterr().out
    assert "wrong_kind" in out and "topic_mismatch" in out


def sample_message(fleet: str, device: str, image: bytes, **kw: object) -> SampleMessage:
    fields = {
        "fleet": fleet,
        "device": device,
        "session": 1,
        "frame": 7,
        "ts": 1_700_000_100.0,
        "model": model_ref(),
        "reason": "low_confidence",
        "top": [(3, 0.31), (9, 0.2)],
        "consent": "shop-cctv-v2",
        "faces_blurred": 1,
        "width": 64,
        "height": 48,
        "sha256": hashlib.sha256(image).hexdigest(),
        "jpeg_b64": base64.b64encode(image).decode(),
        **kw,
    }
    return SampleMessage(**fields)  # type: ignore[arg-type]


def test_samples_and_update_events_are_stored_once(
    db_url: str, broker: MosquittoBroker, publisher: Publisher, start_worker
) -> None:
    fleet = f"smp{abs(hash(db_url)) % 10**6}"
    worker = start_worker(mqtt=MqttSettings(url=broker.url), db_url=db_url, fleet=fleet, group="smp")
    ok, buf = cv2.imencode(".jpg", np.full((48, 64, 3), 90, np.uint8))  # 64x48, as the message says
    image = buf.tobytes()
    good = sample_message(fleet, "cam1", image)
    forged = sample_message(fleet, "cam1", image, sha256="0" * 64)
    staged = UpdateEvent(
        fleet=fleet, device="cam1", session=2, seq=0, ts=1_700_000_200.0, state="staged", release=4
    )
    rolled = UpdateEvent(
        fleet=fleet,
        device="cam1",
        session=2,
        seq=1,
        ts=1_700_000_260.0,
        state="rolled_back",
        reason="health_failed",
        release=4,
        serving=model_ref(),
    )
    topic = f"ef/v1/{fleet}/dev/cam1/"
    msgs = [
        (topic + "sample", good.to_bytes()),
        (topic + "sample", good.to_bytes()),
        (topic + "sample", forged.to_bytes()),
        (topic + "update", staged.to_bytes()),
        (topic + "update", rolled.to_bytes()),
        (topic + "update", rolled.to_bytes()),
    ]
    publisher.send_all(msgs)
    publisher.wait()
    assert wait_until(lambda: handled(worker) == len(msgs), 20), worker.stats()
    s = worker.stats()
    assert (s["stored"], s["duplicates"], s["dead_letter_reasons"]) == (3, 2, {"invalid": 1})
    assert s["by_kind"] == {"sample": 2, "update": 3}
    with Store(db_url, create=False) as store:
        (sample,) = store.samples(device="cam1")
        assert (
            sample.image == image and sample.sha256 == good.sha256 and sample.consent_policy == "shop-cctv-v2"
        )
        provenance = json.loads(sample.provenance or "{}")
        assert (
            provenance["reason"] == "low_confidence"
            and provenance["frame"] == 7
            and provenance["faces_blurred"] == 1
        )
        assert [x.id for x in store.unlabelled_samples()] == [sample.id]
        assert [e.state for e in store.update_events(device="cam1")] == ["staged", "rolled_back"]
        assert store.update_events(state="rolled_back", since=1_700_000_250.0) == [rolled]
        assert "does not match" in store.dead_letters("invalid")[0].detail


def test_redelivery_after_a_crash_between_commit_and_ack_is_stored_once(
    tmp_path: Path, broker: MosquittoBroker, publisher: Publisher, start_worker
) -> None:
    """A consumer stores windows and dies before acknowledging; the worker resuming its session gets
    them again (DUP) and stores nothing twice."""
    fleet, db = "redeliver", f"sqlite:///{tmp_path / 'r.db'}"
    cfg = IngestConfig(mqtt=MqttSettings(url=broker.url), db_url=db, fleet=fleet, group="red")
    ws = windows("cam1", 40, fleet=fleet)
    got: list[mqtt.MQTTMessage] = []
    crashed = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=cfg.effective_client_id,
        clean_session=False,
        manual_ack=True,
        protocol=mqtt.MQTTv311,
    )
    subscribed = threading.Event()
    crashed.on_subscribe = lambda *a: subscribed.set()
    crashed.on_message = lambda c, u, m: got.append(m)
    crashed.connect("127.0.0.1", broker.port)
    crashed.subscribe(subscription("red", fleet, "tele"), qos=1)
    crashed.loop_start()
    assert subscribed.wait(10)
    publisher.send_all([tele(fleet, w) for w in ws])
    publisher.wait()
    assert wait_until(lambda: len(got) == len(ws), 10)
    with Store(db) as store:
        assert store.add_windows(TelemetryWindow.model_validate_json(m.payload) for m in got).stored == len(
            ws
        )
    crashed.disconnect()  # no PUBACK was ever sent
    crashed.loop_stop()

    worker = start_worker(**cfg.__dict__)
    assert wait_until(lambda: handled(worker) == len(ws), 10), worker.stats()
    s = worker.stats()
    assert (s["redelivered"], s["duplicates"], s["stored"], s["acked"]) == (len(ws), len(ws), 0, len(ws))
    with Store(db, create=False) as store:
        assert store.count_windows() == len(ws)


def test_a_message_the_database_refuses_is_dead_lettered_alone(
    db_url: str, broker: MosquittoBroker, publisher: Publisher, start_worker
) -> None:
    """A valid window whose seq does not fit a 64-bit column fails its batch; the worker retries the
    batch message by message, stores the others and dead-letters that one (ingest never stalls)."""
    fleet = f"ref{abs(hash(db_url)) % 10**6}"
    worker = start_worker(
        mqtt=MqttSettings(url=broker.url),
        db_url=db_url,
        fleet=fleet,
        group="ref",
        limits=WriterLimits(batch_linger_s=0.2),
    )
    ws = windows("cam1", 6, fleet=fleet)
    poison = ws[3].model_copy(update={"seq": 2**63})
    publisher.send_all(
        [tele(fleet, w) for w in ws[:3]] + [tele(fleet, poison)] + [tele(fleet, w) for w in ws[4:]]
    )
    publisher.wait()
    assert wait_until(lambda: handled(worker) == 6, 20), worker.stats()
    s = worker.stats()
    assert (s["stored"], s["dead_letter_reasons"], s["acked"]) == (5, {"db_rejected": 1}, 6)
    assert s["db_errors"] >= 1  # the whole batch was refused first
    with Store(db_url, create=False) as store:
        assert [k[2] for k in store.window_keys()] == [0, 1, 2, 4, 5]
        (dead,) = store.dead_letters()
        assert dead.reason == "db_rejected" and TelemetryWindow.model_validate_json(dead.payload).seq == 2**63


def test_a_device_cannot_move_itself_into_another_fleet(
    db_url: str, broker: MosquittoBroker, publisher: Publisher, start_worker
) -> None:
    """The ACL lets a device write its own topics under any fleet's tree; ingest holds it to the fleet it
    is registered in: the foreign windows are dead-lettered, alerted once, and the device stays put."""
    home, other = (f"{n}{abs(hash(db_url)) % 10**6}" for n in ("home", "othr"))
    for fleet in (home, other):
        start_worker(mqtt=MqttSettings(url=broker.url), db_url=db_url, fleet=fleet, group="mv")
    own = windows("cam1", 3, fleet=home)
    publisher.send_all([tele(home, w) for w in own])
    publisher.wait()
    with Store(db_url, create=False) as store:
        assert wait_until(lambda: store.count_windows() == 3, 20)
    foreign = windows("cam1", 4, fleet=other, first_seq=3, start=own[-1].end)
    publisher.send_all([tele(other, w) for w in foreign])
    publisher.wait()
    with Store(db_url, create=False) as store:
        assert wait_until(lambda: len(store.dead_letters()) == 4, 20), store.dead_letters()
        assert {d.reason for d in store.dead_letters()} == {"fleet_mismatch"}
        assert store.count_windows() == 3
        dev = store.device("cam1")
        assert dev is not None and dev.fleet == home and dev.last_window_end == own[-1].end
        (alert,) = [a for a in store.alerts() if a.kind == "fleet_mismatch"]
        assert (alert.device, alert.fleet, alert.severity) == ("cam1", home, "critical")


def test_a_window_with_other_histogram_bins_costs_only_itself(
    db_url: str, broker: MosquittoBroker, publisher: Publisher, start_worker
) -> None:
    """Windows whose bins differ from their registered model's are refused at ingest (drift could not
    compare them: one such window used to stop drift for every device of the model)."""
    fleet = f"bins{abs(hash(db_url)) % 10**6}"
    v1 = model_ref(version="1.0.0")
    with Store(db_url) as store:
        store.register_model(manifest("1.0.0"), v1.sha256)
    worker = start_worker(mqtt=MqttSettings(url=broker.url), db_url=db_url, fleet=fleet, group="bins")
    good = windows("cam1", 3, fleet=fleet, model=v1)
    odd = json.loads(windows("cam2", 1, fleet=fleet, model=v1)[0].to_bytes())
    odd["histograms"]["confidence"] = {"edges": [0.0, 0.5, 1.0], "counts": [1, 29]}
    publisher.send_all(
        [tele(fleet, w) for w in good] + [(tele_topic(fleet, "cam2"), json.dumps(odd).encode())]
    )
    publisher.wait()
    assert wait_until(lambda: handled(worker) == 4, 20), worker.stats()
    s = worker.stats()
    assert (s["stored"], s["dead_letter_reasons"]) == (3, {"histogram_edges": 1}), s
    with Store(db_url, create=False) as store:
        (dead,) = store.dead_letters()
        assert dead.reason == "histogram_edges" and "confidence" in dead.detail


def test_ingest_taken_over_mid_stream_reconnects_and_loses_nothing(
    broker: MosquittoBroker, publisher: Publisher, tmp_path: Path, start_worker
) -> None:
    """A client that connects with the worker's client id (the deployed broker forbids it; a plain one
    does not) takes its session and the messages in flight, never acknowledging them. The worker is
    thrown off, reconnects, takes the session back and gets those messages again: each stored once."""
    fleet = "takeover"
    db_url = f"sqlite:///{tmp_path / 'store.db'}"
    worker = start_worker(mqtt=MqttSettings(url=broker.url), db_url=db_url, fleet=fleet, group="tko")
    ws = [tiny_window(f"cam{d}", i, fleet=fleet) for i in range(15) for d in range(2)]
    publisher.send_all([tele(fleet, w) for w in ws[:10]])
    publisher.wait()
    impostor = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=worker.client_id,
        clean_session=False,
        protocol=mqtt.MQTTv311,
        manual_ack=True,  # takes messages and never acknowledges them
    )
    got: list[bytes] = []
    impostor.on_message = lambda _c, _u, m: got.append(m.payload)
    impostor.connect("127.0.0.1", broker.port)
    impostor.loop_start()
    try:
        publisher.send_all([tele(fleet, w) for w in ws[10:25]])
        publisher.wait()
        assert wait_until(lambda: len(got) > 0, 10), "the impostor received nothing"
    finally:
        impostor.disconnect()
        impostor.loop_stop()
    publisher.send_all([tele(fleet, w) for w in ws[25:]])
    publisher.wait()
    with Store(db_url, create=False) as store:
        assert wait_until(lambda: store.count_windows() == len(ws), 30), store.count_windows()
        assert store.window_keys() == sorted((w.device, w.session, w.seq) for w in ws)
    s = worker.stats()
    assert s["connects"] >= 2 and s["stored"] == len(ws), s


def test_ingest_over_tls(tls_broker: MosquittoBroker, pki: Path, tmp_path: Path, start_worker) -> None:
    """mqtts:// with the fleet CA, as deployed (the broker authenticates itself)."""
    fleet, db = "tls", f"sqlite:///{tmp_path / 'tls.db'}"
    worker = start_worker(mqtt=MqttSettings(url=tls_broker.url, ca=pki / "ca.crt"), db_url=db, fleet=fleet)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    pub.tls_set(ca_certs=str(pki / "ca.crt"))
    pub.connect("127.0.0.1", tls_broker.port)
    pub.loop_start()
    try:
        for w in windows("cam1", 5, fleet=fleet):
            pub.publish(tele_topic(fleet, "cam1"), w.to_bytes(), qos=1).wait_for_publish(10)
    finally:
        pub.disconnect()
        pub.loop_stop()
    assert wait_until(lambda: worker.stats()["stored"] == 5, 10), worker.stats()


@pytest.fixture(scope="module")
def fleet_windows() -> list[TelemetryWindow]:
    return [w for d in range(10) for w in windows(f"cam{d}", 100, fleet="shared", seed=d)]


def test_shared_subscription_splits_the_load_between_two_workers(
    db_url: str,
    broker: MosquittoBroker,
    publisher: Publisher,
    start_worker,
    fleet_windows: list[TelemetryWindow],
) -> None:
    group = f"sh{abs(hash(db_url)) % 10**6}"
    workers = [
        start_worker(mqtt=MqttSettings(url=broker.url), db_url=db_url, fleet="shared", group=group, index=i)
        for i in (0, 1)
    ]
    publisher.send_all([tele("shared", w) for w in fleet_windows])
    publisher.wait()
    n = len(fleet_windows)
    assert wait_until(lambda: sum(handled(w) for w in workers) == n, 30), [w.stats() for w in workers]
    stats = [w.stats() for w in workers]
    assert all(s["received"] >= n // 4 for s in stats), [s["received"] for s in stats]  # both took a share
    assert sum(s["received"] for s in stats) == n  # each message went to exactly one worker
    assert sum(s["stored"] for s in stats) == n and sum(s["duplicates"] for s in stats) == 0
    with Store(db_url, create=False) as store:
        assert store.window_keys() == sorted((w.device, w.session, w.seq) for w in fleet_windows)


def _stats(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _pending(path: Path) -> int:
    """Messages a worker process has received but not yet committed (per its last stats report)."""
    s = _stats(path)
    return s.get("received", 0) - s.get("stored", 0) - s.get("duplicates", 0) - s.get("dead_lettered", 0)


@contextmanager
def writes_blocked(db_url: str) -> Iterator[None]:
    """Hold the database so that no worker can commit: a table lock (PostgreSQL), the write lock (SQLite)."""
    u = make_url(db_url)
    if u.get_backend_name() == "postgresql":
        with psycopg.connect(
            host=u.host, port=u.port, user=u.username, dbname=u.database, options=u.query["options"]
        ) as conn:
            conn.execute("LOCK TABLE windows IN ACCESS EXCLUSIVE MODE")
            yield
    else:
        with WriteLock(db_url):
            yield


def test_worker_killed_mid_stream_loses_nothing(
    db_url: str, broker: MosquittoBroker, publisher: Publisher, tmp_path: Path
) -> None:
    """Two worker processes under the CLI supervisor; one is SIGKILLed while it holds uncommitted
    messages (writes are blocked); the supervisor restarts it and nothing is lost or doubled."""
    fleet = f"kill{abs(hash(db_url)) % 10**6}"
    Store(db_url).close()
    stats = [tmp_path / "stats-0.json", tmp_path / "stats-1.json"]
    cmd = [
        sys.executable,
        "-m",
        "edge_agent.cli",
        "ingest",
        "run",
        "--broker",
        broker.url,
        "--db",
        db_url,
        "--fleet",
        fleet,
        "--workers",
        "2",
        "--stats-file",
        str(tmp_path / "stats-{index}.json"),
    ]
    # cwd: a stale edgefleet.egg-info in the checkout would shadow the installed entry points
    sup = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=tmp_path,
    )
    try:
        assert wait_until(lambda: all(_stats(p).get("connects", 0) >= 1 for p in stats), 30), sup.stderr
        time.sleep(0.5)  # subscriptions acknowledged
        ws = [tiny_window(f"cam{d}", i, fleet=fleet) for i in range(150) for d in range(8)]
        third = len(ws) // 3
        publisher.send_all([tele(fleet, w) for w in ws[:third]], rate=400)
        with writes_blocked(db_url):
            publisher.send_all([tele(fleet, w) for w in ws[third : 2 * third]], rate=400)
            victim = _stats(stats[1])
            assert wait_until(lambda: _pending(stats[1]) > 20, 10), _stats(stats[1])
            os.kill(victim["pid"], signal.SIGKILL)
            time.sleep(0.5)
        publisher.send_all([tele(fleet, w) for w in ws[2 * third :]], rate=400)
        publisher.wait()
        with Store(db_url, create=False) as store:
            assert wait_until(lambda: store.count_windows() == len(ws), 60), store.count_windows()
            assert store.window_keys() == sorted((w.device, w.session, w.seq) for w in ws)
        # the restarted worker (a new process, same client id) got the killed one's in-flight messages
        assert wait_until(lambda: _stats(stats[1]).get("pid") not in (None, victim["pid"]), 10)
        assert wait_until(lambda: _stats(stats[1]).get("redelivered", 0) > 0, 5), _stats(stats[1])
    finally:
        sup.send_signal(signal.SIGTERM)
        try:
            _, err = sup.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(sup.pid, signal.SIGKILL)
            raise
    assert sup.returncode == 0, err[-3000:]
    assert "restarting" in err


def test_database_outage_buffers_and_resumes_nothing_lost(
    broker: MosquittoBroker, publisher: Publisher, start_worker
) -> None:
    """A private PostgreSQL stops for ~12 s while windows keep arriving; every one is stored once."""
    pg_bin = find_pg_bin()
    require(pg_bin is not None, "PostgreSQL server binaries (initdb, pg_ctl)")
    assert pg_bin is not None
    pg = PrivatePostgres(pg_bin).init()
    try:
        pg.start()
        Store(pg.url).close()
        fleet = "outage"
        worker = start_worker(
            mqtt=MqttSettings(url=broker.url),
            db_url=pg.url,
            fleet=fleet,
            group="out",
            limits=WriterLimits(max_buffered=50, retry_max_s=1.0),
        )
        ws = [tiny_window(f"cam{d}", i, fleet=fleet) for i in range(360) for d in range(5)]  # 18 s at 100/s
        sender = threading.Thread(
            target=publisher.send_all, args=([tele(fleet, w) for w in ws],), kwargs={"rate": 100}
        )
        sender.start()
        assert wait_until(lambda: worker.stats()["stored"] >= 200, 10)
        pg.stop()
        down_at = worker.stats()
        time.sleep(12)
        during = worker.stats()
        pg.start()
        sender.join(60)
        publisher.wait()
        assert wait_until(lambda: worker.stats()["stored"] == len(ws), 60), worker.stats()
        after = worker.stats()
        with Store(pg.url, create=False) as store:
            assert store.window_keys() == sorted((w.device, w.session, w.seq) for w in ws)

        # Stopped while the database is down: what it holds stays unacknowledged, and the next start
        # of the same worker (same client id, persistent session) gets it again.
        pg.stop()
        late = [tiny_window("late", i, fleet=fleet) for i in range(30)]
        publisher.send_all([tele(fleet, w) for w in late])
        publisher.wait()
        assert wait_until(lambda: worker.stats()["received"] == len(ws) + len(late), 10)
        stopped = worker.stop(timeout=1)
        assert stopped["stored"] == len(ws) and stopped["acked"] == len(ws)
        pg.start()
        again = start_worker(mqtt=MqttSettings(url=broker.url), db_url=pg.url, fleet=fleet, group="out")
        assert wait_until(lambda: again.stats()["stored"] == len(late), 20), again.stats()
        with Store(pg.url, create=False) as store:
            assert store.count_windows(device="late") == len(late)
    finally:
        pg.destroy()
    assert during["stored"] - down_at["stored"] <= 200  # at most a batch in flight when it went down
    assert during["received"] - down_at["received"] < 200  # the broker held the rest (in-flight window)
    assert during["db_errors"] > down_at["db_errors"]
    assert after["buffer_high_water"] <= 50
    assert after["duplicates"] == 0 and after["stale_acks"] == 0 and after["disconnects"] == 0
    assert after["acked"] == after["received"] == len(ws)
