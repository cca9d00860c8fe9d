"""Home Assistant MQTT discovery (opt-in: ``homeassistant:`` in trainer.yaml).

Each device of the fleet becomes one Home Assistant device with: sensors for the estimated accuracy,
frames per second and mean confidence, a connectivity binary sensor read straight from the device's
retained status, a ``problem`` binary sensor that is on while the device drifts, and an ``update``
entity comparing the model version it runs with the champion's. Every entity but connectivity is
available while the device's status says ``online``.

* configs are retained under ``{prefix}/{component}/edgefleet_{fleet}_{device}/{object}/config`` and
  published for each new device, and again whenever Home Assistant's birth message (``online`` on
  ``{prefix}/status``) arrives; any other birth payload is ignored;
* states are one retained JSON document per device on ``ef/v1/{fleet}/ha/{device}``, refreshed every
  ``state_interval_s``;
* a device not heard from for ``forget_after_s``, or removed from the fleet by a person
  (``edgefleet trainer forget-device``), is removed: an empty retained config per entity and an empty
  retained state.

Payload builders are pure (:func:`discovery_configs`, :func:`device_state`); :class:`HomeAssistantBridge`
does the MQTT. deploy/mosquitto's ACL lets the trainer write these topics and a ``homeassistant``
identity read them.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from pydantic import Field

from edge_agent.config import MqttSettings
from edge_agent.config_files import StrictModel
from edge_agent.mqtt_client import new_client
from edge_agent.protocol import HomeAssistantDiscovery, HomeAssistantState, ha_state_topic, status_topic

log = logging.getLogger(__name__)


class HomeAssistantSettings(StrictModel):
    """Home Assistant MQTT discovery by the trainer service."""

    discovery_prefix: str = Field(default="homeassistant", pattern=r"^[A-Za-z0-9_\-]+$")
    state_interval_s: float = Field(default=30.0, gt=0)
    forget_after_s: float = Field(default=7 * 86400.0, gt=0)
    """A device not heard from for this long is removed from Home Assistant."""


def node_id(fleet: str, device: str) -> str:
    """Home Assistant's node id: letters, digits, ``_`` and ``-`` only."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"edgefleet_{fleet}_{device}")


# (component, object id, name, extra config) of every entity of one device
_ENTITIES: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("sensor", "estimated_accuracy", "Estimated accuracy", {
        "unit_of_measurement": "%", "state_class": "measurement", "suggested_display_precision": 1,
        "value_template": "{{ (value_json.estimated_accuracy * 100) | round(1) if value_json.estimated_accuracy is not none else none }}",
    }),
    ("sensor", "frames_per_second", "Frames per second", {
        "unit_of_measurement": "fps", "state_class": "measurement", "suggested_display_precision": 1,
        "value_template": "{{ value_json.frames_per_second }}",
    }),
    ("sensor", "mean_confidence", "Mean confidence", {
        "unit_of_measurement": "%", "state_class": "measurement", "suggested_display_precision": 1,
        "value_template": "{{ (value_json.confidence_mean * 100) | round(1) if value_json.confidence_mean is not none else none }}",
    }),
    ("binary_sensor", "drift", "Drift", {
        "device_class": "problem", "payload_on": "ON", "payload_off": "OFF", "value_template": "{{ value_json.drift }}",
    }),
    ("update", "model", "Model", {"value_template": "{{ value_json.model | tojson }}", "entity_category": "diagnostic"}),
)  # fmt: skip


def discovery_configs(
    prefix: str, fleet: str, device: str, *, model: str | None, agent_version: str | None
) -> dict[str, dict[str, Any]]:
    """Every retained discovery config of one device, by topic (documented MQTT discovery keys)."""
    nid = node_id(fleet, device)
    dev = {
        "identifiers": [nid],
        "name": device,
        "manufacturer": "EdgeFleet",
        "model": model or "camera",
        **({"sw_version": agent_version} if agent_version else {}),
        "suggested_area": fleet,
    }
    availability = {
        "topic": status_topic(fleet, device),
        "value_template": "{{ value_json.state }}",
        "payload_available": "online",
        "payload_not_available": "offline",
    }
    out: dict[str, dict[str, Any]] = {}
    for component, obj, name, extra in _ENTITIES:
        out[f"{prefix}/{component}/{nid}/{obj}/config"] = {
            "name": name,
            "unique_id": f"{nid}_{obj}",
            "object_id": f"{nid}_{obj}",
            "state_topic": ha_state_topic(fleet, device),
            "availability": [availability],
            "device": dev,
            "origin": {"name": "EdgeFleet trainer"},
            **extra,
        }
    out[f"{prefix}/binary_sensor/{nid}/connectivity/config"] = {
        "name": "Connectivity",
        "unique_id": f"{nid}_connectivity",
        "object_id": f"{nid}_connectivity",
        "device_class": "connectivity",
        "state_topic": status_topic(fleet, device),
        "value_template": "{{ 'ON' if value_json.state == 'online' else 'OFF' }}",
        "payload_on": "ON",
        "payload_off": "OFF",
        "device": dev,
        "origin": {"name": "EdgeFleet trainer"},
    }
    for payload in out.values():  # the keys the protocol documents (docs/asyncapi.json) are all there
        HomeAssistantDiscovery.model_validate(payload)
    return out


def device_state(
    *,
    estimated_accuracy: float | None,
    frames_per_second: float | None,
    confidence_mean: float | None,
    drift: bool,
    installed: str | None,
    latest: str | None,
) -> HomeAssistantState:
    """The retained state document the entities' templates read (the protocol's model, documented in
    docs/asyncapi.json)."""
    return HomeAssistantState.model_validate(
        {
            "estimated_accuracy": estimated_accuracy,
            "frames_per_second": round(frames_per_second, 2) if frames_per_second is not None else None,
            "confidence_mean": confidence_mean,
            "drift": "ON" if drift else "OFF",
            "model": {"installed_version": installed, "latest_version": latest or installed},
        }
    )


@dataclass
class DeviceView:
    """What the bridge publishes about one device (read from the store and the service)."""

    device: str
    model: str | None
    version: str | None
    agent_version: str | None
    last_seen: float
    state: HomeAssistantState


class HomeAssistantBridge:
    """Publishes discovery and state for a fleet; republishes discovery on Home Assistant's birth."""

    def __init__(
        self, settings: HomeAssistantSettings, mqtt_settings: MqttSettings, fleet: str, client_id: str
    ) -> None:
        self.settings, self.fleet = settings, fleet
        self._announced: dict[str, DeviceView] = {}
        self._removed: set[str] = set()
        self._rediscover = threading.Event()
        self._lock = threading.Lock()
        self.client = new_client(mqtt_settings, client_id, clean_session=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect_async(mqtt_settings.host, mqtt_settings.port)
        self.client.loop_start()

    @property
    def rediscover_pending(self) -> bool:
        """Home Assistant (re)started, or this bridge (re)connected: everything is announced again."""
        return self._rediscover.is_set()

    @property
    def birth_topic(self) -> str:
        return f"{self.settings.discovery_prefix}/status"

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe(self.birth_topic, qos=1)
        self._rediscover.set()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.payload == b"online":
            self._rediscover.set()
        elif msg.payload != b"offline":
            log.warning("home assistant: ignored a birth message %r on %s", msg.payload[:40], msg.topic)

    def publish(self, views: Mapping[str, DeviceView], now: float, removed: Iterable[str] = ()) -> None:
        """Announce new devices (or all, after a birth), refresh every state, remove forgotten devices
        and the ``removed`` ones (taken out of the fleet: each cleared once per bridge)."""
        everyone = self._rediscover.is_set()
        self._rediscover.clear()
        removed = set(removed)
        for device in removed:
            if device not in self._removed and device not in views:
                self._clear(device, "removed from the fleet")
                self._removed.add(device)
        self._removed.intersection_update(removed)  # one that came back and goes again is cleared again
        for device, view in views.items():
            if now - view.last_seen > self.settings.forget_after_s:
                if device in self._announced or everyone:
                    self._clear(device, f"not heard from for {self.settings.forget_after_s:.0f} s")
                continue
            if everyone or device not in self._announced or self._changed(self._announced[device], view):
                self._announce(view)
            self.client.publish(ha_state_topic(self.fleet, device), view.state.to_bytes(), qos=1, retain=True)

    @staticmethod
    def _changed(before: DeviceView, now: DeviceView) -> bool:
        return (before.model, before.agent_version) != (now.model, now.agent_version)

    def _announce(self, view: DeviceView) -> None:
        cfgs = discovery_configs(
            self.settings.discovery_prefix,
            self.fleet,
            view.device,
            model=view.model,
            agent_version=view.agent_version,
        )
        for topic, payload in cfgs.items():
            self._send(topic, payload)
        self._announced[view.device] = view

    def _clear(self, device: str, why: str) -> None:
        """Empty retained configs (Home Assistant deletes the entities) and an empty retained state."""
        for topic in discovery_configs(
            self.settings.discovery_prefix, self.fleet, device, model=None, agent_version=None
        ):
            self.client.publish(topic, b"", qos=1, retain=True)
        self.client.publish(ha_state_topic(self.fleet, device), b"", qos=1, retain=True)
        self._announced.pop(device, None)
        log.info("home assistant: removed %s (%s)", device, why)

    def _send(self, topic: str, payload: dict[str, Any]) -> None:
        self.client.publish(topic, json.dumps(payload, separators=(",", ":")), qos=1, retain=True)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def views_of(service: Any, now: float) -> dict[str, DeviceView]:
    """What the store holds of each device of the service's fleet, for the bridge: its row, recent
    windows and the health the service wrote (the console and the metrics show the same)."""
    from trainer.fleet.metrics import RATE_WINDOW_S
    from trainer.store.fleet_state import device_rows

    fleet = service.cfg.fleet
    latest = service.champion.manifest.version if service.champion is not None else None
    recent = service.store.recent_activity(fleet, now - RATE_WINDOW_S)
    out = {}
    for d, h in device_rows(service.store, fleet):
        activity = recent.get(d.device)
        state = device_state(
            estimated_accuracy=h.estimated_accuracy if h else None,
            frames_per_second=activity.frames_per_second if activity else None,
            confidence_mean=activity.confidence_mean if activity else None,
            drift=h is not None and h.drift_state == "drift",
            installed=d.model_version,
            latest=latest,
        )
        out[d.device] = DeviceView(
            d.device, d.model_name, d.model_version, d.agent_version, float(d.last_seen), state
        )
    return out
