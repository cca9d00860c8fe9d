"""The MQTT link against a real mosquitto: spooled delivery, broker crash and restart, birth/offline/last
will, TLS, hostile inbound handlers, and reconnect backoff with jitter."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.backoff import Backoff
from edge_agent.config import MqttSettings
from edge_agent.errors import ConfigError
from edge_agent.events import EventCounter
from edge_agent.mqtt_link import MqttLink
from edge_agent.protocol import (
    Command,
    Status,
    cmd_topic,
    parse_message,
    status_order,
    status_topic,
    tele_topic,
)
from edge_agent.spool import Spool
from trainer.ops import pki as pki_mod
from trainer.ops.broker import BrokerTLS, MosquittoBroker, free_port

from .conftest import require
from .mqtt_helpers import Subscriber, TcpProxy, retained, wait_until

FLEET = "test"


def status(device: str, state: str, connection: int | None = None) -> bytes:
    return Status(
        fleet=FLEET,
        device=device,
        state=state,
        session=7,
        ts=time.time(),
        connection=connection,  # type: ignore[arg-type]
    ).to_bytes()


class Harness:
    """A link with its spool and counters, for one device."""

    def __init__(self, tmp: Path, url: str, *, device: str | None = None, **settings: object) -> None:
        self.device = device or f"dev-{uuid.uuid4().hex[:8]}"
        self.events = EventCounter()
        self.spool = Spool(tmp / f"{self.device}.sqlite", 10_000, 1 << 24, events=self.events)
        opts: dict[str, object] = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.5, "keepalive": 5}
        opts.update(settings)
        self.settings = MqttSettings(url=url, **opts)  # type: ignore[arg-type]
        self.status_topic = status_topic(FLEET, self.device)
        self.tele = tele_topic(FLEET, self.device)
        self.link_kwargs: dict[str, object] = {}

    def link(self, **kwargs: object) -> MqttLink:
        self.link_obj = MqttLink(
            self.settings,
            client_id=f"{FLEET}-{self.device}",
            status_topic=self.status_topic,
            birth=lambda n: status(self.device, "online", n),
            will=lambda n: status(self.device, "offline", n),
            spool=self.spool,
            events=self.events,
            **kwargs,  # type: ignore[arg-type]
        )
        return self.link_obj


@pytest.fixture
def harness_factory(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(url: str, **kw: object) -> Harness:
        h = Harness(tmp_path, url, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        link = getattr(h, "link_obj", None)
        if link is not None:
            link.stop(flush_timeout=0)
        h.spool.close()


# ----- Backoff (pure) ---------------------------------------------------------------------------------


def test_backoff_grows_caps_jitters_and_resets() -> None:
    b = Backoff(0.5, 4.0, rng=random.Random(1))
    bases = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    for base in bases:
        d = b.next()
        assert base / 2 <= d <= base, (base, d)
    capped = [b.next() for _ in range(200)]
    assert all(2.0 <= d <= 4.0 for d in capped)
    assert len(set(capped)) > 150  # jittered, not lockstep
    assert min(capped) < 2.4 and max(capped) > 3.6  # spread over the whole [max/2, max] range
    b.reset()
    assert 0.25 <= b.next() <= 0.5
    # Two devices with different random streams do not retry in lockstep.
    a, c = Backoff(1, 8, rng=random.Random(2)), Backoff(1, 8, rng=random.Random(3))
    assert [a.next() for _ in range(5)] != [c.next() for _ in range(5)]
    for bad in ((0, 1), (2, 1), (-1, 5)):
        with pytest.raises(ValueError):
            Backoff(*bad)


# ----- the link ---------------------------------------------------------------------------------------


def test_spooled_messages_arrive_in_order_and_stop_flushes(broker: MosquittoBroker, harness_factory) -> None:
    h = harness_factory(broker.url)
    sub = Subscriber(broker.url, h.tele)
    link = h.link()
    link.start()
    assert link.wait_connected(10)
    sent = [b'{"seq": %d}' % i for i in range(300)]
    for p in sent[:150]:
        link.publish_spooled(h.tele, p)
    assert wait_until(lambda: len(sub.payloads()) >= 150, 10)
    for p in sent[150:]:
        link.publish_spooled(h.tele, p)
    assert link.stop(flush_timeout=10) is True  # everything acknowledged before returning
    assert len(h.spool) == 0
    assert wait_until(lambda: len(sub.payloads()) >= 300, 10)
    assert sub.payloads() == sent  # one publisher, no outage: in order, exactly once
    totals = h.events.totals()
    assert totals["mqtt_connects"] == 1 and "mqtt_disconnects" not in totals
    sub.close()


def test_birth_retained_online_then_offline_after_stop(broker: MosquittoBroker, harness_factory) -> None:
    h = harness_factory(broker.url)
    link = h.link()
    link.start()
    assert link.wait_connected(10)
    assert wait_until(
        lambda: (retained(broker.url, h.status_topic, timeout=0.5) or {}).get("state") == "online", 10
    )
    birth = retained(broker.url, h.status_topic)
    assert (
        birth is not None
        and birth["device"] == h.device
        and birth["session"] == 7
        and birth["kind"] == "status"
    )
    assert link.stop(flush_timeout=2)
    assert not link.connected
    assert (retained(broker.url, h.status_topic) or {}).get("state") == "offline"


def test_last_will_when_the_agent_is_killed(broker: MosquittoBroker, tmp_path: Path) -> None:
    device = f"dev-{uuid.uuid4().hex[:8]}"
    topic = status_topic(FLEET, device)
    child = textwrap.dedent(
        f"""
        import time
        from edge_agent.config import MqttSettings
        from edge_agent.events import EventCounter
        from edge_agent.mqtt_link import MqttLink
        from edge_agent.spool import Spool
        link = MqttLink(
            MqttSettings(url={broker.url!r}, keepalive=5),
            client_id="will-{device}",
            status_topic={topic!r},
            birth=lambda n: b'{{"state": "online"}}',
            will=b'{{"state": "offline"}}',
            spool=Spool({str(tmp_path / "will.sqlite")!r}, 100, 1 << 20),
            events=EventCounter(),
        )
        link.start()
        assert link.wait_connected(10)
        print("connected", flush=True)
        time.sleep(60)
        """
    )
    sub = Subscriber(broker.url, topic, clean=True)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "connected"
        assert wait_until(lambda: b'{"state": "online"}' in sub.payloads(), 5)
        proc.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker must publish the will
        proc.wait(10)
    finally:
        proc.kill()
    assert wait_until(lambda: b'{"state": "offline"}' in sub.payloads(), 10), sub.payloads()
    sub.close()
    assert retained(broker.url, topic) == {"state": "offline"}


def test_a_reconnect_numbers_its_birth_and_will_after_the_dropped_connection(
    broker: MosquittoBroker, harness_factory
) -> None:
    """A dropped connection's last will and the next connection's birth stay in order: the will (its ts
    taken when its connection opened) carries the number of the birth it follows, the reconnect's birth a
    higher one, so ordering by (session, connection, offline after online) ends online, then offline
    after a clean stop."""
    proxy = TcpProxy(broker.port)
    h = harness_factory(proxy.url)
    sub = Subscriber(broker.url, h.status_topic, clean=True)
    link = h.link()
    link.start()

    def seen() -> list[Status]:
        return [Status.model_validate_json(p) for p in sub.payloads()]

    try:
        assert wait_until(lambda: [s.state for s in seen()] == ["online"], 10), seen()
        proxy.cut()  # the broker sees the socket close without DISCONNECT: it publishes the will
        assert wait_until(lambda: [s.state for s in seen()][:3] == ["online", "offline", "online"], 15), (
            seen()
        )
        birth, will, again = seen()[:3]
        assert will.ts < birth.ts  # the will was composed when its connection opened
        assert (
            will.connection == birth.connection == 1 and again.connection is not None and again.connection > 1
        )
        assert max(seen(), key=status_order) == again  # the device is online, as it is
        assert link.stop(flush_timeout=2)
        assert wait_until(lambda: seen()[-1].state == "offline", 5)
        clean = seen()[-1]
        assert clean.connection == link.connection == again.connection
        assert max(seen(), key=status_order) == clean
    finally:
        sub.close()
        proxy.close()


def test_broker_killed_and_restarted_mid_run(broker_factory, harness_factory) -> None:
    b: MosquittoBroker = broker_factory()
    h = harness_factory(b.url)
    sub = Subscriber(b.url, h.tele)
    # The subscriber's session must be on disk before the crash (mosquitto autosaves every second).
    db = b.workdir / "mosquitto.db"
    assert wait_until(lambda: db.exists() and db.stat().st_mtime > sub.subscribed_at, 5)
    link = h.link()
    link.start()
    assert link.wait_connected(10)

    sent: list[bytes] = []

    def publish(n: int, phase: str) -> None:
        for i in range(n):
            p = f"{phase}-{i}".encode()
            sent.append(p)
            link.publish_spooled(h.tele, p)

    publish(50, "before")
    assert wait_until(lambda: len(sub.payloads()) >= 50, 10)
    assert b.proc is not None
    b.proc.send_signal(signal.SIGSTOP)  # frozen: it reads nothing more, so these stay unacknowledged
    publish(30, "inflight")
    assert wait_until(lambda: link.stats()["inflight"] > 0, 5)
    b.stop(kill=True)
    assert wait_until(lambda: not link.connected, 5)
    publish(40, "outage")
    assert len(h.spool) >= 70  # in-flight rows stayed in the spool
    b.start()
    assert link.wait_connected(10)
    publish(40, "after")

    assert wait_until(lambda: set(sub.payloads()) == set(sent), 15), (
        f"missing: {sorted(set(sent) - set(sub.payloads()))[:10]}"
    )
    assert len(sub.payloads()) >= len(sent)  # at least once (duplicates are allowed)
    assert sub.sessions_present[-1] is True  # the queue for it survived the crash
    assert wait_until(lambda: len(h.spool) == 0, 5)
    totals = h.events.totals()
    assert totals["mqtt_connects"] >= 2 and totals["mqtt_disconnects"] >= 1
    assert link.stop(flush_timeout=5)
    sub.close()


def test_spool_left_by_a_previous_run_is_delivered(broker: MosquittoBroker, harness_factory) -> None:
    h = harness_factory(broker.url)
    sub = Subscriber(broker.url, h.tele)
    path = h.spool.path
    for i in range(25):
        h.spool.put(h.tele, b"old-%d" % i)
    h.spool.close()  # the agent stopped (or crashed) with undelivered telemetry
    h.spool = Spool(path, 10_000, 1 << 24, events=h.events)
    assert len(h.spool) == 25
    link = h.link()
    link.start()
    assert wait_until(lambda: len(sub.payloads()) >= 25, 10)
    assert sub.payloads() == [b"old-%d" % i for i in range(25)]
    assert link.stop(flush_timeout=5) and len(h.spool) == 0
    sub.close()


def test_a_stop_right_after_start_still_connects_and_flushes(
    broker: MosquittoBroker, harness_factory
) -> None:
    """A short run (a directory of photos, a few frames) stops before its link is connected and before the
    broker echoed its status: the flush waits for both instead of leaving the spool for the next start
    (the likely cause of a make test failure on a loaded machine: a restarted agent, 60 frames at full
    speed, exited 0 in about 2 s and its windows never arrived)."""
    h = harness_factory(broker.url)
    sub = Subscriber(broker.url, h.tele)
    for i in range(25):
        h.spool.put(h.tele, b"w-%d" % i)
    link = h.link()
    link.start()
    assert link.stop(flush_timeout=10) is True
    assert len(h.spool) == 0
    assert wait_until(lambda: len(sub.payloads()) >= 25, 10)
    assert sub.payloads() == [b"w-%d" % i for i in range(25)]
    sub.close()


def test_messages_held_in_memory_on_a_full_disk_are_delivered(
    broker: MosquittoBroker, tmp_path: Path, harness_factory
) -> None:
    h = harness_factory(broker.url)
    h.spool.close()
    h.spool = Spool(tmp_path / "full.sqlite", 10_000, 1 << 24, events=h.events, max_pages=12)
    sub = Subscriber(broker.url, h.tele)
    link = h.link()
    sent = [bytes([65 + i % 26]) * 3000 + b"%d" % i for i in range(30)]
    for p in sent:
        link.publish_spooled(h.tele, p)  # the disk fills up: most of these wait in memory
    assert h.events.totals()["spool_disk_errors"] > 0
    assert any(i.id < 0 for i in h.spool.peek(100))
    link.start()
    assert wait_until(lambda: set(sub.payloads()) == set(sent), 10)
    first_seen = list(dict.fromkeys(sub.payloads()))
    assert first_seen == sent  # oldest first, disk rows before the in-memory ones
    assert wait_until(lambda: len(h.spool) == 0, 5)
    assert "spool_evicted" not in h.events.totals()
    sub.close()


def test_stop_while_broker_is_down_keeps_the_spool(broker_factory, harness_factory) -> None:
    b: MosquittoBroker = broker_factory()
    h = harness_factory(b.url)
    link = h.link()
    link.start()
    assert link.wait_connected(10)
    b.stop(kill=True)
    assert wait_until(lambda: not link.connected, 5)
    for i in range(5):
        link.publish_spooled(h.tele, b"%d" % i)  # never raises while the broker is down
    t0 = time.monotonic()
    assert link.stop(flush_timeout=5) is False
    assert time.monotonic() - t0 < 2  # nothing to flush to: no waiting
    assert [i.payload for i in h.spool.peek(10)] == [b"0", b"1", b"2", b"3", b"4"]


def test_a_dead_broker_node_fails_over_to_the_next_url(broker_factory, harness_factory) -> None:
    """Two nodes of one tier (stand-ins for a NATS cluster's MQTT listeners): the node the link is on dies
    for good; with ``fallback_urls`` the link connects to the other and delivers what was spooled."""
    a: MosquittoBroker = broker_factory()
    b: MosquittoBroker = broker_factory()
    h = harness_factory(a.url, fallback_urls=[b.url], identity_check_s=0)
    sub = Subscriber(b.url, h.tele)
    link = h.link()
    link.start()
    assert link.wait_connected(10)
    a.stop(kill=True)
    for i in range(10):
        link.publish_spooled(h.tele, b"%d" % i)
    assert wait_until(lambda: len(sub.payloads()) >= 10, 20), link.stats()
    assert sub.payloads() == [b"%d" % i for i in range(10)]
    assert link.stats()["events"]["mqtt_connects"] == 2
    sub.close()


def test_fallback_urls_must_be_broker_urls_of_the_same_scheme() -> None:
    with pytest.raises(ValueError, match=r"fallback_urls\[1\]: .*mqtt://host:port"):
        MqttSettings(url="mqtt://a:1883", fallback_urls=["mqtt://b:1883", "nats://c:4222"])
    with pytest.raises(ValueError, match="the url's scheme"):
        MqttSettings(url="mqtt://a:1883", fallback_urls=["mqtts://b:8883"])
    assert MqttSettings(url="mqtts://a", fallback_urls=["mqtts://b:9883"]).endpoints == [
        ("a", 8883),
        ("b", 9883),
    ]


def test_publish_now_is_best_effort(broker: MosquittoBroker, harness_factory) -> None:
    h = harness_factory(broker.url)
    topic = f"ef/v1/{FLEET}/dev/{h.device}/pred"
    link = h.link()
    assert link.publish_now(topic, b"early") is False  # not connected yet
    assert h.events.totals()["pred_dropped"] == 1
    sub = Subscriber(broker.url, topic, clean=True)
    link.start()
    assert link.wait_connected(10)
    assert link.publish_now(topic, b"p1") is True
    assert wait_until(lambda: sub.payloads() == [b"p1"], 5)
    assert len(h.spool) == 0  # predictions never touch the spool
    sub.close()


def test_raising_inbound_handler_does_not_kill_the_link(broker: MosquittoBroker, harness_factory) -> None:
    h = harness_factory(broker.url)
    got: list[str] = []

    def handle(topic: str, payload: bytes) -> None:
        cmd = parse_message(topic, payload, Command)  # raises MessageError on garbage
        assert isinstance(cmd, Command)
        if cmd.name == "explode":
            raise RuntimeError("handler bug")
        got.append(cmd.name)

    link = h.link(subscriptions=[(cmd_topic(FLEET, h.device), 1)], on_message=handle)
    link.start()
    assert wait_until(lambda: link.stats()["subscribed"], 10)
    sender = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    sender.connect("127.0.0.1", broker.port)
    sender.loop_start()
    sender.publish(cmd_topic(FLEET, h.device, "ping"), Command(name="ping").to_bytes(), qos=1)
    sender.publish(cmd_topic(FLEET, h.device, "x"), b"not json {", qos=1).wait_for_publish(5)
    sender.publish(cmd_topic(FLEET, h.device, "explode"), Command(name="explode").to_bytes(), qos=1)
    sender.publish(cmd_topic(FLEET, h.device, "after"), Command(name="after").to_bytes(), qos=1)
    assert wait_until(lambda: "after" in got, 5)
    assert got == ["ping", "after"]
    assert h.events.totals()["bad_inbound"] == 2
    assert link.connected and link.stats()["events"].get("mqtt_disconnects") is None
    sender.disconnect()
    sender.loop_stop()


def test_tls_with_the_fleet_ca(tls_broker: MosquittoBroker, pki: Path, harness_factory) -> None:
    h = harness_factory(tls_broker.url, ca=pki / "ca.crt")
    sub = Subscriber(tls_broker.url, h.tele, ca=pki / "ca.crt")
    link = h.link()
    link.start()
    assert link.wait_connected(10)
    link.publish_spooled(h.tele, b"over tls")
    assert wait_until(lambda: sub.payloads() == [b"over tls"], 5)
    assert (retained(tls_broker.url, h.status_topic, ca=pki / "ca.crt") or {}).get("state") == "online"
    sub.close()


def test_tls_rejects_a_broker_signed_by_another_ca(
    tls_broker: MosquittoBroker, tmp_path: Path, harness_factory, caplog
) -> None:
    other = pki_mod.init_ca(tmp_path / "other-ca")
    h = harness_factory(tls_broker.url, ca=other.cert)
    link = h.link()
    link.start()
    assert wait_until(lambda: h.events.totals().get("mqtt_connect_failures", 0) >= 2, 5)
    assert not link.connected
    assert "certificate verify failed" in caplog.text and tls_broker.url in caplog.text


def test_mutual_tls_with_a_device_certificate(broker_factory, pki: Path, harness_factory) -> None:
    tls = BrokerTLS(
        ca=pki / "ca.crt",
        cert=pki / "server" / "broker.crt",
        key=pki / "server" / "broker.key",
        require_certificate=True,
    )
    b: MosquittoBroker = broker_factory(tls=tls)
    dev = harness_factory(
        b.url, ca=pki / "ca.crt", cert=pki / "device" / "dev-a.crt", key=pki / "device" / "dev-a.key"
    )
    anon = harness_factory(b.url, ca=pki / "ca.crt")
    with_cert, without = dev.link(), anon.link()
    with_cert.start()
    without.start()
    assert with_cert.wait_connected(10)
    assert wait_until(lambda: anon.events.totals().get("mqtt_connect_failures", 0) >= 2, 5)
    assert not without.connected


def test_username_password(broker_factory, tmp_path: Path, harness_factory, caplog) -> None:
    tool = shutil.which("mosquitto_passwd")
    require(tool is not None, "mosquitto_passwd")
    passwords = tmp_path / "passwd"
    subprocess.run([str(tool), "-b", "-c", str(passwords), "dev1", "s3cret"], check=True, capture_output=True)
    b: MosquittoBroker = broker_factory(allow_anonymous=False, extra_conf=f"password_file {passwords}")
    good = harness_factory(b.url, username="dev1", password="s3cret")
    bad = harness_factory(b.url, username="dev1", password="wrong")
    good_link, bad_link = good.link(), bad.link()
    good_link.start()
    bad_link.start()
    assert good_link.wait_connected(10)
    assert wait_until(lambda: bad.events.totals().get("mqtt_connect_failures", 0) >= 2, 5)
    assert not bad_link.connected
    assert "broker refused the connection" in caplog.text


def test_missing_tls_file_fails_at_construction(tmp_path: Path, harness_factory) -> None:
    h = harness_factory("mqtts://127.0.0.1:8883", ca=tmp_path / "nope.crt")
    with pytest.raises(ConfigError, match=r"mqtt\.ca: .*nope\.crt"):
        h.link()


def test_reconnects_with_jittered_backoff(tmp_path: Path, mosquitto_binary: str, harness_factory) -> None:
    port = free_port()  # nothing listens here yet
    h = harness_factory(f"mqtt://127.0.0.1:{port}", reconnect_min_s=0.05, reconnect_max_s=0.4)
    link = h.link()
    link.start()
    assert wait_until(lambda: len(link.stats()["recent_reconnect_delays_s"]) >= 6, 5)
    delays = link.stats()["recent_reconnect_delays_s"]
    for k, d in enumerate(delays):
        base = min(0.4, 0.05 * 2**k)
        assert base / 2 <= d <= base, (k, d, delays)
    assert len(set(delays[3:])) > 1  # capped delays still differ: jitter
    assert h.events.totals()["mqtt_connect_failures"] >= 6
    assert not link.connected

    b = MosquittoBroker(tmp_path / "late", port=port, binary=mosquitto_binary).start()
    try:
        assert link.wait_connected(5)  # within one capped delay of the broker appearing
        n = len(link.stats()["recent_reconnect_delays_s"])
        b.stop(kill=True)
        assert wait_until(lambda: len(link.stats()["recent_reconnect_delays_s"]) > n, 5)
        first_after = link.stats()["recent_reconnect_delays_s"][n]
        assert 0.025 <= first_after <= 0.05  # a successful connect resets the backoff
        assert h.events.totals()["mqtt_disconnects"] == 1
    finally:
        b.stop(kill=True)
