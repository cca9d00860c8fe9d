"""deploy/mosquitto as shipped: mutual TLS, identities from certificates, and the topic ACL.

In MQTT 3.1.1 a broker drops an unauthorised PUBLISH silently (it still acknowledges it), so every
"cannot" below is checked by absence, each behind a positive control sent afterwards on the same
connection (delivery is in order, so once the control arrived the forbidden message never will).
"""

from __future__ import annotations

import logging
import ssl
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import MqttSettings
from edge_agent.protocol import tele_topic
from trainer.fleet.messaging import FleetPublisher
from trainer.ingest.worker import IngestConfig, IngestWorker
from trainer.ops import pki as pki_mod
from trainer.ops.broker import free_port
from trainer.sim.windows import windows

from .update_helpers import GUARD_PLUGIN, DeployedBroker, TlsClient, wait_for

FLEET = "acl"
OTHER_SERVICES = ("monitor", "homeassistant")
"""Service identities of deploy/mosquitto besides the trainer (plugin_opt_services)."""


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory, mosquitto_binary: str, pki: Path):
    b = DeployedBroker(tmp_path_factory.mktemp("deployed-broker"), pki, mosquitto_binary).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Path:
    """Certificates of the monitor and Home Assistant identities (a directory of their own: the session's
    PKI stays as the other tests know it)."""
    out = tmp_path_factory.mktemp("service-certs")
    for name in OTHER_SERVICES:
        pki_mod.issue(pki, name, kind="service", out_dir=out)
    return out


def _trainer_settings(deployed: DeployedBroker, pki: Path, client_id: str | None = None) -> MqttSettings:
    """The trainer's broker settings on the services' listener, with its certificate."""
    return MqttSettings(
        url=f"mqtts://127.0.0.1:{deployed.service_port}",
        client_id=client_id,
        ca=pki / "ca.crt",
        cert=pki / "service" / "trainer.crt",
        key=pki / "service" / "trainer.key",
    )


def _ingest_worker(
    deployed: DeployedBroker, pki: Path, db: Path, fleet: str, service_id: str | None = None
) -> IngestWorker:
    """A real ingest worker with the trainer's certificate and its default client id (derived from the
    service's ``service_id`` when given, as the trainer service does), subscribed."""
    settings = _trainer_settings(deployed, pki, service_id)
    worker = IngestWorker(IngestConfig(mqtt=settings, db_url=f"sqlite:///{db}", fleet=fleet)).start()
    assert worker.wait_connected(10), f"ingest worker {worker.client_id} did not subscribe"
    return worker


def _send_windows(device: TlsClient, fleet: str, count: int) -> None:
    """Publish ``count`` valid telemetry windows of dev-a at QoS 1 (each acknowledged by the broker)."""
    for w in windows("dev-a", count, fleet=fleet):
        device.publish(tele_topic(fleet, "dev-a"), w.to_bytes())


def test_device_cannot_write_another_devices_topics_or_release_hints(
    deployed: DeployedBroker, pki: Path
) -> None:
    trainer = TlsClient(deployed.service_port, pki, "trainer", "service", subscribe="ef/v1/#")
    a = TlsClient(deployed.port, pki, "dev-a")
    try:
        a.publish(f"ef/v1/{FLEET}/dev/dev-b/tele", b"forged telemetry")
        a.publish(f"ef/v1/{FLEET}/dev/dev-b/status", b"forged status", retain=True)
        a.publish(f"ef/v1/{FLEET}/release/canary", b"forged hint", retain=True)
        a.publish(f"ef/v1/{FLEET}/dev/dev-b/cmd/flush", b"forged command")
        a.publish(f"ef/v1/{FLEET}/dev/dev-a/tele", b"own telemetry")  # the positive control, sent last
        assert wait_for(lambda: any(t.endswith("dev-a/tele") for t, _, _ in trainer.messages), 10)
        topics = [t for t, _, _ in trainer.messages]
        assert topics == [f"ef/v1/{FLEET}/dev/dev-a/tele"], topics
    finally:
        trainer.close()
        a.close()


def test_device_reads_only_its_commands_and_release_hints(deployed: DeployedBroker, pki: Path) -> None:
    a = TlsClient(deployed.port, pki, "dev-a", subscribe="ef/v1/#")  # asks for everything
    b = TlsClient(deployed.port, pki, "dev-b")
    trainer = TlsClient(deployed.service_port, pki, "trainer", "service")
    try:
        b.publish(f"ef/v1/{FLEET}/dev/dev-b/tele", b"b's telemetry")
        trainer.publish(f"ef/v1/{FLEET}/dev/dev-b/cmd/flush", b"for b")
        trainer.publish(f"ef/v1/{FLEET}/dev/dev-a/cmd/flush", b"for a")
        trainer.publish(f"ef/v1/{FLEET}/release/stable", b"hint", retain=True)
        assert wait_for(lambda: any(t.endswith("/release/stable") for t, _, _ in a.messages), 10)
        got = sorted(t for t, _, _ in a.messages)
        assert got == [f"ef/v1/{FLEET}/dev/dev-a/cmd/flush", f"ef/v1/{FLEET}/release/stable"], got
    finally:
        for c in (a, b, trainer):
            c.close()
        cleaner = TlsClient(deployed.service_port, pki, "trainer", "service")
        cleaner.publish(f"ef/v1/{FLEET}/release/stable", b"", retain=True)  # clear the retained hint
        cleaner.close()


def test_only_a_service_can_join_the_ingest_share_group(deployed: DeployedBroker, pki: Path) -> None:
    """mosquitto 2.0's acl_file grants any subscription; the guard plugin refuses $share/... to devices,
    so a device cannot be dealt (and lose) a share of the fleet's telemetry."""
    share = f"$share/ingest/ef/v1/{FLEET}/dev/+/tele"
    ingest = TlsClient(deployed.service_port, pki, "trainer", "service", client_id="trainer-ingest-acl-0")
    thief = TlsClient(deployed.port, pki, "dev-b")
    a = TlsClient(deployed.port, pki, "dev-a")
    try:
        assert ingest.subscribe(share) == 1
        assert thief.subscribe(share) == 0x80  # refused in the SUBACK
        assert thief.subscribe(f"$share/other/ef/v1/{FLEET}/dev/+/tele") == 0x80
        for i in range(40):
            a.publish(f"ef/v1/{FLEET}/dev/dev-a/tele", f"window {i}".encode())
        assert wait_for(lambda: len(ingest.messages) == 40, 10), len(ingest.messages)
        assert not thief.messages
    finally:
        for c in (ingest, thief, a):
            c.close()


def test_only_the_ingest_identity_can_join_the_ingest_share_group(
    deployed: DeployedBroker, pki: Path, services: Path, tmp_path: Path
) -> None:
    """The monitor and Home Assistant may read plain topics as their ACL allows, but their $share
    subscriptions are refused in the SUBACK: granted, each was dealt a third of the windows after the
    device got its PUBACK (the monitor kept its third from ingest, Home Assistant lost its third at the
    read check). The trainer itself may join only the ingest group."""
    fleet = "acl-share"
    share = f"$share/ingest/ef/v1/{fleet}/dev/+/tele"
    worker = _ingest_worker(deployed, pki, tmp_path / "ingest.db", fleet)
    joiners = {
        name: TlsClient(deployed.service_port, pki, name, cert_dir=services) for name in OTHER_SERVICES
    }
    trainer = TlsClient(deployed.service_port, pki, "trainer", "service")
    a = TlsClient(deployed.port, pki, "dev-a")
    try:
        for name, joiner in joiners.items():
            assert joiner.subscribe(share) == 0x80, f"{name} joined the ingest group"
            assert joiner.subscribe(f"$share/{name}/ef/v1/{fleet}/dev/+/tele") == 0x80, name
        assert trainer.subscribe(f"$share/other/ef/v1/{fleet}/dev/+/tele") == 0x80
        posing = TlsClient(deployed.service_port, pki, "monitor", cert_dir=services, username="trainer")
        assert posing.subscribe(share) == 0x80  # the identity is the certificate's, not the username sent
        posing.close()
        assert joiners["monitor"].subscribe(f"ef/v1/{fleet}/dev/+/tele") == 1  # plain topics: as the ACL says
        assert joiners["homeassistant"].subscribe(f"ef/v1/{fleet}/dev/+/status") == 1
        _send_windows(a, fleet, 60)
        assert wait_for(lambda: worker.stats()["stored"] == 60, 20), worker.stats()
        assert wait_for(lambda: len(joiners["monitor"].messages) == 60, 10), len(joiners["monitor"].messages)
        s = worker.stats()
        assert (s["received"], s["dead_lettered"]) == (60, 0), s
        assert not joiners["homeassistant"].messages and not trainer.messages
    finally:
        worker.stop()
        for c in (*joiners.values(), trainer, a):
            c.close()


def test_a_service_connects_only_under_client_ids_of_its_own_name(
    deployed: DeployedBroker, pki: Path, services: Path, tmp_path: Path
) -> None:
    """On the services' listener a client id is ``NAME`` or ``NAME-...`` of the certificate: a monitor
    certificate naming the ingest worker's client id is refused at CONNECT (before it could take the
    worker's session over), and the worker keeps receiving. The trainer's own default client ids pass."""
    fleet = "acl-takeover"
    worker = _ingest_worker(deployed, pki, tmp_path / "ingest.db", fleet, "trainer")  # deploy/trainer.yaml
    publisher = FleetPublisher(_trainer_settings(deployed, pki), fleet)  # its default client id
    assert wait_for(publisher.client.is_connected, 10), "the trainer's publisher was refused"
    ca = pki / "ca.crt"
    monitor = (services / "monitor.crt", services / "monitor.key")
    trainer = (pki / "service" / "trainer.crt", pki / "service" / "trainer.key")
    dev_b = (pki / "device" / "dev-b.crt", pki / "device" / "dev-b.key")
    a = TlsClient(deployed.port, pki, "dev-a")
    try:
        _send_windows(a, fleet, 10)
        assert wait_for(lambda: worker.stats()["stored"] == 10, 20), worker.stats()
        port = deployed.service_port
        for cert, client_id in [
            (monitor, worker.client_id),
            (monitor, "ingest-x"),
            (monitor, "trainer"),
            (monitor, "monitorx"),  # the name must be followed by "-"
            (trainer, "edgefleet-trainer-1"),
            (dev_b, worker.client_id),  # a device that reached the services' listener
            (dev_b, "dev-b-as-service"),
        ]:
            assert _handshake(port, ca, *cert, client_id=client_id).startswith("refused"), (cert, client_id)
        for cert, client_id in [(monitor, "monitor"), (monitor, "monitor-dash-1"), (dev_b, "dev-b")]:
            assert _handshake(port, ca, *cert, client_id=client_id) == "connected", (cert, client_id)
        _send_windows(a, fleet, 30)  # the same windows again, and 20 new ones
        assert wait_for(lambda: worker.stats()["received"] == 40, 20), worker.stats()
        assert wait_for(lambda: worker.stats()["stored"] == 30, 10), worker.stats()
        assert worker.client.is_connected() and worker.stats()["duplicates"] == 10, worker.stats()
    finally:
        worker.stop()
        publisher.close()
        a.close()


def test_a_device_cannot_take_over_another_clients_session(deployed: DeployedBroker, pki: Path) -> None:
    """The device listener makes the certificate's name the client id, so naming the ingest's or another
    device's client id takes over nothing."""
    ingest = TlsClient(deployed.service_port, pki, "trainer", "service", client_id="trainer-ingest-acl-1")
    victim = TlsClient(deployed.port, pki, "dev-a", client_id="dev-a")
    try:
        assert ingest.subscribe(f"$share/ingest/ef/v1/{FLEET}/dev/+/tele") == 1
        impostors = [
            TlsClient(deployed.port, pki, "dev-b", client_id="trainer-ingest-acl-1"),
            TlsClient(deployed.port, pki, "dev-b", client_id="dev-a"),
        ]
        for i in range(30):
            victim.publish(f"ef/v1/{FLEET}/dev/dev-a/tele", f"window {i}".encode())
        assert wait_for(lambda: len(ingest.messages) == 30, 10), len(ingest.messages)
        assert (ingest.disconnects, victim.disconnects) == (0, 0)
        for c in impostors:
            c.close()
    finally:
        ingest.close()
        victim.close()


def test_an_agent_whose_device_id_is_not_its_certificate_keeps_its_windows_and_says_so(
    deployed: DeployedBroker, pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker acknowledges and drops every publish of a device id the ACL does not grant (MQTT
    3.1.1); the link waits for its own birth to come back before it sends the spool, so nothing is lost,
    and it logs why. The same link with the right id delivers everything."""
    from edge_agent.config import MqttSettings
    from edge_agent.events import EventCounter
    from edge_agent.mqtt_link import MqttLink
    from edge_agent.protocol import Status, status_topic, tele_topic
    from edge_agent.spool import Spool

    trainer = TlsClient(
        deployed.service_port, pki, "trainer", "service", subscribe=f"ef/v1/{FLEET}/dev/+/tele"
    )
    settings = MqttSettings(
        url=f"mqtts://127.0.0.1:{deployed.port}",
        ca=pki / "ca.crt",
        cert=pki / "device" / "dev-a.crt",
        key=pki / "device" / "dev-a.key",
        identity_check_s=1.0,
        reconnect_min_s=0.2,
        reconnect_max_s=0.5,
    )

    def run(device: str) -> tuple[MqttLink, Spool, EventCounter]:
        events = EventCounter()
        spool = Spool(tmp_path / f"{device}.sqlite", 1000, 1 << 20, events=events)
        for i in range(5):
            spool.put(tele_topic(FLEET, device), f"{device} window {i}".encode(), 1, False)
        link = MqttLink(
            settings,
            client_id=device,
            status_topic=status_topic(FLEET, device),
            birth=lambda _n: Status(
                fleet=FLEET, device=device, state="online", session=1, ts=time.time()
            ).to_bytes(),
            will=Status(fleet=FLEET, device=device, state="offline", session=1, ts=0.0).to_bytes(),
            spool=spool,
            events=events,
        )
        link.start()
        return link, spool, events

    try:
        with caplog.at_level(logging.ERROR, logger="edge_agent.mqtt_link"):
            wrong, spool, events = run("dev-b")  # dev-a's certificate
            assert wait_for(lambda: events.totals().get("mqtt_identity_unconfirmed", 0) >= 2, 15)
            wrong.stop(flush_timeout=1)
        assert len(spool) == 5 and not trainer.messages
        assert "does the device id match the certificate's name" in caplog.text
        right, spool, events = run("dev-a")
        assert wait_for(lambda: len(trainer.messages) == 5, 15), trainer.messages
        assert wait_for(lambda: len(spool) == 0, 10) and right.stats()["identity_confirmed"]
        right.stop(flush_timeout=1)
    finally:
        trainer.close()


def _handshake(
    port: int, ca: Path, cert: Path | None = None, key: Path | None = None, *, client_id: str = ""
) -> str:
    """Connect and wait for CONNACK; returns "connected" or why not (paho's random id by default)."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    c.tls_set(
        ca_certs=str(ca),
        certfile=str(cert) if cert else None,
        keyfile=str(key) if key else None,
        cert_reqs=ssl.CERT_REQUIRED,
    )
    result: list[str] = []
    c.on_connect = lambda cl, u, f, rc, p: result.append(
        "connected" if not rc.is_failure else f"refused {rc}"
    )
    try:
        c.connect("127.0.0.1", port, keepalive=5)
        for _ in range(40):
            if c.loop(0.1) != mqtt.MQTT_ERR_SUCCESS or result:
                break
    except (ssl.SSLError, OSError) as exc:
        return f"error {type(exc).__name__}"
    finally:
        c.disconnect()
    return result[0] if result else "dropped"


def test_clients_without_a_fleet_certificate_are_refused(
    deployed: DeployedBroker, pki: Path, tmp_path: Path
) -> None:
    assert (
        _handshake(deployed.port, pki / "ca.crt", pki / "device" / "dev-a.crt", pki / "device" / "dev-a.key")
        == "connected"
    )
    assert _handshake(deployed.port, pki / "ca.crt") != "connected"  # no client certificate at all
    rogue = tmp_path / "rogue"
    pki_mod.init_ca(rogue, name="Rogue CA")
    pki_mod.issue(rogue, "dev-a", kind="device")  # the right name, signed by the wrong CA
    assert (
        _handshake(
            deployed.port, pki / "ca.crt", rogue / "device" / "dev-a.crt", rogue / "device" / "dev-a.key"
        )
        != "connected"
    )
    plain = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)  # no TLS at all
    with pytest.raises((OSError, ConnectionError)):
        plain.connect("127.0.0.1", deployed.port, keepalive=5)
        for _ in range(20):
            if plain.loop(0.1) != mqtt.MQTT_ERR_SUCCESS:
                raise ConnectionError("dropped")


def test_pki_cli_issues_identities_with_private_keys_0600(tmp_path: Path) -> None:
    d = tmp_path / "pki"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edge_agent.cli", "pki", *args, "--dir", str(d)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert run("init", "--broker-host", "broker.example").returncode == 0
    assert run("issue-device", "cam-07").returncode == 0
    assert run("issue-service", "trainer").returncode == 0
    for key in (
        d / "ca.key",
        d / "server" / "broker.key",
        d / "device" / "cam-07.key",
        d / "service" / "trainer.key",
    ):
        assert key.stat().st_mode & 0o777 == 0o600, key
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((d / "device" / "cam-07.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value == "cam-07"
    clash = run("issue-device", "trainer")  # one name, one identity: a device cannot become the trainer
    assert clash.returncode == 2 and "already a service identity" in clash.stderr
    assert run("issue-device", "cam/+").returncode == 2
    prefixed = run("issue-device", "monitor-7")  # the monitor's certificate may use client id monitor-7
    assert prefixed.returncode == 2 and "starts with 'monitor-'" in prefixed.stderr, prefixed.stderr
    assert not (d / "device" / "monitor-7.key").exists()
    assert run("init").returncode == 2  # never overwrites a CA


@pytest.mark.parametrize(
    ("share_groups", "expected"),
    [
        (None, "plugin_opt_share_groups (GROUP:IDENTITY, e.g. ingest:trainer) is required"),
        ("ingest", "'ingest' is not GROUP:IDENTITY"),
        ("ingest:cam-01", "'ingest:cam-01' is not GROUP:IDENTITY with IDENTITY in plugin_opt_services"),
    ],
)
def test_the_guard_names_a_bad_share_group_option_and_the_broker_does_not_start(
    mosquitto_binary: str, tmp_path: Path, share_groups: str | None, expected: str
) -> None:
    """A guard that would refuse every $share subscription (ingest included) is a configuration mistake:
    mosquitto stops at start-up with the guard's message instead."""
    from .conftest import require

    require(GUARD_PLUGIN.exists(), f"the broker guard plugin {GUARD_PLUGIN} (make broker-plugin)")
    conf = tmp_path / "guard.conf"
    lines = [
        f"listener {free_port()} 127.0.0.1",
        "allow_anonymous false",
        f"plugin {GUARD_PLUGIN}",
        "plugin_opt_services trainer monitor",
        *([f"plugin_opt_share_groups {share_groups}"] if share_groups else []),
        "log_dest stderr",
    ]
    conf.write_text("\n".join(lines) + "\n")
    run = subprocess.run([mosquitto_binary, "-c", str(conf)], capture_output=True, text=True, timeout=10)
    assert run.returncode != 0 and expected in run.stderr + run.stdout, (run.returncode, run.stderr)
