"""Home Assistant MQTT discovery by the trainer service, on a private broker: retained configs per
device checked against Home Assistant's documented discovery keys, republished on HA's birth message,
a malformed birth ignored, states published, and the entities of a device forgotten (silent too long,
or removed with ``edgefleet trainer forget-device``) cleared."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jsonschema
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.protocol import Status, status_topic, tele_topic
from trainer.fleet.homeassistant import HomeAssistantSettings, node_id
from trainer.fleet.service import TrainerService
from trainer.ops.broker import MosquittoBroker
from trainer.sim.demo import Timeline
from trainer.sim.windows import windows

from .mqtt_helpers import wait_until
from .test_fleet_loop import _service_config
from .test_protocol_contract import validate_captured

_AVAILABILITY = {
    "type": "object",
    "required": ["topic"],
    "additionalProperties": False,
    "properties": {
        k: {"type": "string"}
        for k in ("topic", "payload_available", "payload_not_available", "value_template")
    },
}
_DEVICE = {
    "type": "object",
    "anyOf": [{"required": ["identifiers"]}, {"required": ["connections"]}],
    "additionalProperties": False,
    "properties": {
        "identifiers": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        **{
            k: {"type": "string"}
            for k in (
                "name",
                "manufacturer",
                "model",
                "sw_version",
                "hw_version",
                "suggested_area",
                "configuration_url",
                "via_device",
            )
        },
    },
}
_COMMON = {
    "name": {"type": ["string", "null"]},
    "unique_id": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$"},
    "object_id": {"type": "string"},
    "state_topic": {"type": "string", "pattern": "^[^#+]+$"},
    "value_template": {"type": "string"},
    "availability": {"type": "array", "items": _AVAILABILITY},
    "device": _DEVICE,
    "origin": {"type": "object", "required": ["name"]},
    "entity_category": {"enum": ["config", "diagnostic"]},
}
SCHEMAS = {  # the keys Home Assistant documents for these MQTT platforms (a subset we may use)
    "sensor": {**_COMMON, "unit_of_measurement": {"type": "string"}, "state_class": {"enum": ["measurement", "total", "total_increasing"]},
               "device_class": {"type": "string"}, "suggested_display_precision": {"type": "integer"}},
    "binary_sensor": {**_COMMON, "payload_on": {"type": "string"}, "payload_off": {"type": "string"},
                      "device_class": {"enum": ["connectivity", "problem"]}},
    "update": {**_COMMON},
}  # fmt: skip


def _validate(topic: str, payload: dict) -> None:
    component = topic.split("/")[1]
    schema = {
        "type": "object",
        "required": ["state_topic", "unique_id", "device"],
        "additionalProperties": False,
        "properties": SCHEMAS[component],
    }
    jsonschema.validate(payload, schema)


class Retained:
    """Subscribes to the discovery prefix and state topics; keeps the latest payload of every topic."""

    def __init__(self, port: int, *filters: str) -> None:
        self.latest: dict[str, bytes] = {}
        self.count: dict[str, int] = {}
        self.received: list[tuple[str, bytes]] = []
        """Every message, in arrival order."""
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on
        self.client.on_connect = lambda c, *_: [c.subscribe(f, qos=1) for f in filters]
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        self.latest[msg.topic] = bytes(msg.payload)
        self.received.append((msg.topic, bytes(msg.payload)))
        self.count[msg.topic] = self.count.get(msg.topic, 0) + 1

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_devices_appear_in_home_assistant_and_go_when_forgotten(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    cfg = _service_config(tmp_path, broker.url, base_data="builtin:shapes")
    cfg.fleet = "hass"  # its own topics on the session broker
    cfg.homeassistant = HomeAssistantSettings(state_interval_s=0.5, forget_after_s=8.0)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    now = time.time()
    for d in ("cam-ha", "cam.old"):
        pub.publish(
            status_topic("hass", d),
            Status(fleet="hass", device=d, state="online", session=1, ts=now).to_bytes(),
            qos=1,
            retain=True,
        )
    service = TrainerService(cfg, timeline=Timeline(echo=False)).start()
    ha = Retained(broker.port, "homeassistant/#", "ef/v1/hass/ha/#")
    try:
        assert all(w.wait_connected(10) for w in service.workers)
        for w in windows("cam-ha", 3, fleet="hass", start=now - 30):
            pub.publish(tele_topic("hass", "cam-ha"), w.to_bytes(), qos=1).wait_for_publish(5)
        pub.publish(
            tele_topic("hass", "cam.old"),
            windows("cam.old", 1, fleet="hass", start=now - 30)[0].to_bytes(),
            qos=1,
        )

        def configs(dev: str) -> dict[str, bytes]:
            return {
                t: p
                for t, p in ha.latest.items()
                if f"/{node_id('hass', dev)}/" in t and t.endswith("/config")
            }

        assert wait_until(lambda: len(configs("cam-ha")) == 6 and len(configs("cam.old")) == 6, 20), (
            ha.latest.keys()
        )
        for topic, payload in configs("cam-ha").items():
            _validate(topic, json.loads(payload))
        conn = json.loads(
            ha.latest[f"homeassistant/binary_sensor/{node_id('hass', 'cam-ha')}/connectivity/config"]
        )
        assert (
            conn["state_topic"] == status_topic("hass", "cam-ha") and conn["device_class"] == "connectivity"
        )
        assert wait_until(
            lambda: json.loads(ha.latest.get("ef/v1/hass/ha/cam-ha", b"{}")).get("frames_per_second"), 20
        )
        state = json.loads(ha.latest["ef/v1/hass/ha/cam-ha"])
        assert state["drift"] == "OFF" and state["model"]["installed_version"] is not None

        before = dict(ha.count)
        pub.publish("homeassistant/status", b"garbage", qos=1).wait_for_publish(5)  # ignored
        time.sleep(1.5)
        topic = f"homeassistant/sensor/{node_id('hass', 'cam-ha')}/estimated_accuracy/config"
        assert ha.count[topic] == before[topic]
        pub.publish("homeassistant/status", b"online", qos=1).wait_for_publish(5)  # Home Assistant restarted
        assert wait_until(lambda: ha.count[topic] > before[topic], 10)

        # cam-ha keeps sending; cam.old falls silent and is removed after forget_after_s
        def keep_alive() -> bool:
            w = windows("cam-ha", 1, fleet="hass", start=time.time() - 10, first_seq=int(time.time()))[0]
            pub.publish(tele_topic("hass", "cam-ha"), w.to_bytes(), qos=1)
            return all(ha.latest[t] == b"" for t in configs("cam.old"))

        assert wait_until(keep_alive, 30)
        assert all(p != b"" for p in configs("cam-ha").values())
        # every state and config the service published validates against docs/schemas (jsonschema)
        capture = tmp_path / "messages.jsonl"
        rows = [  # all but Home Assistant's birth, which the test sent
            {"topic": t, "payload": p.decode()} for t, p in list(ha.received) if t != "homeassistant/status"
        ]
        capture.write_text("".join(json.dumps(r) + "\n" for r in rows))
        seen = validate_captured(capture)
        assert set(seen) == {"ha", "ha_discovery"} and seen["ha"] >= 10, seen
    finally:
        ha.close()
        for d in ("cam-ha", "cam.old"):  # leave no retained status behind on the shared broker
            pub.publish(status_topic("hass", d), b"", qos=1, retain=True).wait_for_publish(5)
        pub.loop_stop()
        service.stop()


def _edgefleet(*args: str) -> subprocess.CompletedProcess[str]:
    """The ``edgefleet`` command as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_forget_device_takes_it_out_of_the_fleet_and_home_assistant(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    """`edgefleet trainer forget-device` beside a running service: the device leaves the store's fleet
    (the console's fleet page, the metrics), the service empties its retained discovery configs and
    state, so a fresh subscriber finds none of them (the other device's stay); a window from before the
    removal does not bring it back, a newer one does."""
    from trainer.fleet.config import MetricsSettings
    from trainer.ops.broker import free_port
    from trainer.store.console_queries import device_page

    fleet = "hassrm"
    cfg = _service_config(tmp_path, broker.url, base_data="builtin:shapes")
    cfg.fleet = fleet
    cfg.homeassistant = HomeAssistantSettings(state_interval_s=0.5)
    cfg.metrics = MetricsSettings(port=free_port())
    path = tmp_path / "trainer.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    pub = mqtt.Client(CallbackAPIVersion.VERSION2)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    now = time.time()
    service = TrainerService(cfg, timeline=Timeline(echo=False)).start()
    ha = Retained(broker.port, "homeassistant/#", f"ef/v1/{fleet}/ha/#")
    try:
        assert all(w.wait_connected(10) for w in service.workers)
        for d in ("cam-keep", "cam-gone"):
            status = Status(fleet=fleet, device=d, state="online", session=1, ts=now)
            pub.publish(status_topic(fleet, d), status.to_bytes(), qos=1, retain=True).wait_for_publish(5)
            for w in windows(d, 2, fleet=fleet, start=now - 30):
                pub.publish(tele_topic(fleet, d), w.to_bytes(), qos=1).wait_for_publish(5)

        def mine(latest: dict[str, bytes], dev: str) -> dict[str, bytes]:
            """Its retained discovery configs and its state topic, as a subscriber holds them."""
            return {
                t: p
                for t, p in latest.items()
                if f"/{node_id(fleet, dev)}/" in t or t == f"ef/v1/{fleet}/ha/{dev}"
            }

        assert wait_until(lambda: all(len(mine(ha.latest, d)) == 7 for d in ("cam-keep", "cam-gone")), 20)

        for bad, problem in (
            ((fleet, "cam-nope"), "no device 'cam-nope' in fleet 'hassrm'"),
            (("other", "cam-gone"), "is the trainer of fleet 'hassrm', not 'other'"),
        ):
            r = _edgefleet("trainer", "forget-device", "--config", str(path), *bad)
            assert r.returncode == 2 and problem in r.stderr and len(r.stderr.strip().splitlines()) == 1, (
                r.stderr
            )
        r = _edgefleet(
            "trainer", "forget-device", "--config", str(path), fleet, "cam-gone", "--reason", "taken down"
        )
        assert r.returncode == 0 and "removed cam-gone from fleet hassrm" in r.stdout, r.stderr

        assert wait_until(lambda: all(p == b"" for p in mine(ha.latest, "cam-gone").values()), 10)
        fresh = Retained(broker.port, "homeassistant/#", f"ef/v1/{fleet}/ha/#")
        try:
            assert wait_until(lambda: len(mine(fresh.latest, "cam-keep")) == 7, 10), fresh.latest.keys()
            time.sleep(1.0)  # every retained message has arrived by now
            assert mine(fresh.latest, "cam-gone") == {}
        finally:
            fresh.close()
        store = service.store
        assert store.device("cam-gone") is None
        assert [d.device for d, _ in device_page(store, fleet=fleet).items] == ["cam-keep"]
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{cfg.metrics.port}/metrics", timeout=10).read()
        assert b'device="cam-keep"' in scraped and b"cam-gone" not in scraped
        [entry] = store.audit_log(action="device.forget")
        assert entry.subject == "device/cam-gone" and "taken down" in (entry.details or "")

        # a window from before the removal (a late one from its spool) is kept but revives nothing
        old = windows("cam-gone", 1, fleet=fleet, start=now - 20, first_seq=50, window_s=5)[0]
        pub.publish(tele_topic(fleet, "cam-gone"), old.to_bytes(), qos=1).wait_for_publish(5)
        assert wait_until(lambda: store.count_windows(device="cam-gone") == 3, 10)
        time.sleep(1.0)  # a few Home Assistant steps
        assert store.device("cam-gone") is None and all(
            p == b"" for p in mine(ha.latest, "cam-gone").values()
        )
        # a newer one: the camera is back, and so are its entities
        new = windows("cam-gone", 1, fleet=fleet, start=time.time() - 5, first_seq=60, window_s=5)[0]
        pub.publish(tele_topic(fleet, "cam-gone"), new.to_bytes(), qos=1).wait_for_publish(5)
        assert wait_until(lambda: store.device("cam-gone") is not None, 10)
        assert wait_until(lambda: all(p != b"" for p in mine(ha.latest, "cam-gone").values()), 10)
    finally:
        ha.close()
        for d in ("cam-keep", "cam-gone"):  # leave no retained status behind on the shared broker
            pub.publish(status_topic(fleet, d), b"", qos=1, retain=True).wait_for_publish(5)
        pub.loop_stop()
        service.stop()


HA_VENV = Path(__file__).resolve().parents[1] / "build" / "ha-venv"
"""Home Assistant 2024.3.3 (the last release for Python 3.11) in a virtualenv of its own: its MQTT
integration pins paho-mqtt 1.6.1, this project needs 2.x. ``make ha-venv`` (and ``make test``) make it."""


def _ha_config(directory: Path, port: int) -> None:
    """A minimal Home Assistant configuration whose MQTT integration points at ``port``."""
    (directory / ".storage").mkdir(parents=True)
    (directory / "configuration.yaml").write_text(
        "homeassistant:\n  name: edgefleet-test\n  time_zone: UTC\n"
    )
    entry = {
        "entry_id": "edgefleetmqtt",
        "version": 1,
        "minor_version": 1,
        "domain": "mqtt",
        "title": "test broker",
        "data": {"broker": "127.0.0.1", "port": port, "discovery": True, "discovery_prefix": "homeassistant"},
        "options": {},
        "pref_disable_new_entities": False,
        "pref_disable_polling": False,
        "source": "user",
        "unique_id": None,
        "disabled_by": None,
    }
    doc = {"version": 1, "minor_version": 2, "key": "core.config_entries", "data": {"entries": [entry]}}
    (directory / ".storage" / "core.config_entries").write_text(json.dumps(doc))


def test_home_assistant_itself_creates_the_entities(tmp_path: Path, broker_factory) -> None:  # noqa: ANN001
    """The real Home Assistant, on a private broker, registers the device and its entities from our
    discovery configs."""
    import subprocess

    from .conftest import require

    hass = HA_VENV / "bin" / "hass"
    require(hass.exists(), f"Home Assistant in {HA_VENV} (make ha-venv)")
    b: MosquittoBroker = broker_factory()
    cfg = _service_config(tmp_path, b.url, base_data="builtin:shapes")
    cfg.fleet = "real"
    cfg.homeassistant = HomeAssistantSettings(state_interval_s=1.0)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2)
    pub.connect("127.0.0.1", b.port)
    pub.loop_start()
    now = time.time()
    status = Status(fleet="real", device="cam-h1", state="online", session=1, ts=now)
    pub.publish(status_topic("real", "cam-h1"), status.to_bytes(), qos=1, retain=True).wait_for_publish(5)
    for w in windows("cam-h1", 3, fleet="real", start=now - 30):
        pub.publish(tele_topic("real", "cam-h1"), w.to_bytes(), qos=1).wait_for_publish(5)
    config = tmp_path / "ha"
    _ha_config(config, b.port)
    service = TrainerService(cfg, timeline=Timeline(echo=False)).start()
    log = (tmp_path / "hass.log").open("w")
    proc = subprocess.Popen(
        [str(hass), "-c", str(config), "--skip-pip"], stdout=log, stderr=subprocess.STDOUT
    )
    nid = node_id("real", "cam-h1")
    registry = config / ".storage" / "core.entity_registry"

    def registered() -> set[str]:
        try:
            return {e["unique_id"] for e in json.loads(registry.read_text())["data"]["entities"]}
        except (OSError, ValueError, KeyError):
            return set()

    wanted = {
        f"{nid}_{o}"
        for o in (
            "estimated_accuracy",
            "frames_per_second",
            "mean_confidence",
            "drift",
            "model",
            "connectivity",
        )
    }
    try:
        assert wait_until(lambda: wanted <= registered(), 240), (
            registered(),
            (tmp_path / "hass.log").read_text()[-3000:],
        )
        devices = json.loads((config / ".storage" / "core.device_registry").read_text())["data"]["devices"]
        (dev,) = [d for d in devices if ["mqtt", nid] in d["identifiers"]]
        assert dev["name"] == "cam-h1" and dev["manufacturer"] == "EdgeFleet"
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
        pub.publish(status_topic("real", "cam-h1"), b"", qos=1, retain=True).wait_for_publish(5)
        pub.loop_stop()
        service.stop()
