"""The machine-readable MQTT contract: an AsyncAPI 3.0 document and one JSON Schema per message,
generated from the pydantic models of :mod:`edge_agent.protocol` (the source of truth).

``edgefleet protocol asyncapi [--out FILE]`` and ``edgefleet protocol schemas --out DIR`` write them;
the copies under ``docs/`` are kept identical to the generated ones by a test, and captured messages of
a real fleet are validated against the schemas with a generic validator (``jsonschema``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from edge_agent import protocol as p

DEVICE_TOPIC = f"{p.TOPIC_ROOT}/{{fleet}}/dev/{{device}}"


@dataclass(frozen=True)
class Channel:
    """One topic: its address, message model, who sends it, QoS and whether it is retained."""

    name: str
    address: str
    model: type[BaseModel]
    sender: str
    qos: int
    retain: bool
    description: str


CHANNELS = (
    Channel("status", f"{DEVICE_TOPIC}/status", p.Status, "device", 1, True,
            "Retained birth (`online`) on every connect, and `offline` as the last will or on a clean stop."),
    Channel("tele", f"{DEVICE_TOPIC}/tele", p.TelemetryWindow, "device", 1, False,
            "One telemetry window: frame counters, histograms, latency, incidents, label-free estimates."),
    Channel("pred", f"{DEVICE_TOPIC}/pred", p.Prediction, "device", 0, False,
            "Per-frame top-k for local consumers (opt-in, `telemetry.publish_predictions`)."),
    Channel("sample", f"{DEVICE_TOPIC}/sample", p.Sample, "device", 1, False,
            "An opt-in, privacy-filtered frame for labelling, with its provenance."),
    Channel("update", f"{DEVICE_TOPIC}/update", p.UpdateEvent, "device", 1, False,
            "A state change of the device's updater (downloading, staged, verified, trial, active, ...)."),
    Channel("cmd", f"{DEVICE_TOPIC}/cmd/{{command}}", p.Command, "trainer", 1, False,
            "A command to one device (`flush`, `sample`)."),
    Channel("release", f"{p.TOPIC_ROOT}/{{fleet}}/release/{{channel}}", p.ReleaseHint, "trainer", 1, True,
            "Retained hint that a release exists; devices trust only verified TUF metadata."),
    Channel("alert", f"{p.TOPIC_ROOT}/{{fleet}}/alert", p.Alert, "trainer", 1, False,
            "Drift and health alerts for monitoring services."),
    Channel("ha", f"{p.TOPIC_ROOT}/{{fleet}}/ha/{{device}}", p.HomeAssistantState, "trainer", 1, True,
            "A device's state for Home Assistant's entities, refreshed every `state_interval_s` (opt-in: "
            "`homeassistant:` in trainer.yaml). Every key is present, `null` when unknown; an empty retained "
            "payload means the device was removed."),
    Channel("ha_discovery", "{prefix}/{component}/{node_id}/{object_id}/config", p.HomeAssistantDiscovery,
            "trainer", 1, True,
            "Retained Home Assistant MQTT discovery config of one entity of a device (opt-in). The payload "
            "follows Home Assistant's MQTT discovery schema for the component "
            "(https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery); the schema here names the keys "
            "every EdgeFleet config carries. Republished when Home Assistant's birth (`online` on "
            "`{prefix}/status`) arrives; an empty retained payload deletes the entity."),
)  # fmt: skip

PARAMETERS = {
    "fleet": "Fleet name: letters, digits, `_`, `.`, `-` (at most 64).",
    "device": "Device id, the common name of its certificate (same characters; reserved names excluded).",
    "command": "Command name, also in the payload's `name`.",
    "channel": "Release channel: `canary` or `stable`.",
    "prefix": "Home Assistant's discovery prefix (`homeassistant:` `discovery_prefix`, default `homeassistant`).",
    "component": "Home Assistant platform: `sensor`, `binary_sensor` or `update`.",
    "node_id": "`edgefleet_{fleet}_{device}` with every character but letters, digits, `_`, `-` replaced by `_`.",
    "object_id": "The entity: `estimated_accuracy`, `frames_per_second`, `mean_confidence`, `drift`, `model`, "
    "`connectivity`.",
}


def _schemas() -> tuple[dict[Any, dict[str, Any]], dict[str, Any]]:
    """Each message model's schema with shared definitions under ``#/components/schemas``."""
    refs, defs = models_json_schema(
        [(c.model, "validation") for c in CHANNELS], ref_template="#/components/schemas/{model}"
    )
    return {m: schema for (m, _mode), schema in refs.items()}, defs.get("$defs", {})


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of every topic and message."""
    refs, defs = _schemas()
    channels, operations, messages = {}, {}, {}
    for c in CHANNELS:
        messages[c.name] = {
            "name": c.model.__name__,
            "title": c.model.__name__,
            "summary": (c.model.__doc__ or "").strip().splitlines()[0],
            "contentType": "application/json",
            "payload": refs[c.model],
        }
        params = [name for name in PARAMETERS if f"{{{name}}}" in c.address]
        channels[c.name] = {
            "address": c.address,
            "description": c.description,
            "messages": {c.name: {"$ref": f"#/components/messages/{c.name}"}},
            "parameters": {name: {"$ref": f"#/components/parameters/{name}"} for name in params},
        }
        operations[f"{c.sender}Sends{c.name.title().replace('_', '')}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{c.name}"},
            "summary": f"The {c.sender} publishes on `{c.name}` (QoS {c.qos}{', retained' if c.retain else ''}).",
            "messages": [{"$ref": f"#/channels/{c.name}/messages/{c.name}"}],
            "bindings": {"mqtt": {"qos": c.qos, "retain": c.retain, "bindingVersion": "0.2.0"}},
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "EdgeFleet MQTT protocol",
            "version": f"{p.SCHEMA_VERSION}.0.0",
            "description": "Topics and messages between EdgeFleet devices, the trainer and monitoring services. "
            "Generated from edge_agent/protocol.py; documented in docs/protocol.md.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "broker": {
                "host": "broker.example.net:8883",
                "protocol": "mqtts",
                "protocolVersion": "3.1.1",
                "description": "Mutual TLS: the certificate's common name is the MQTT username the topic ACL keys on "
                "(deploy/mosquitto). Services connect to 8884.",
                "security": [{"$ref": "#/components/securitySchemes/certificate"}],
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "schemas": defs,
            "parameters": {name: {"description": text} for name, text in PARAMETERS.items()},
            "securitySchemes": {
                "certificate": {"type": "X509", "description": "A client certificate signed by the fleet CA."}
            },
        },
    }


def message_schemas() -> dict[str, dict[str, Any]]:
    """A standalone JSON Schema (draft 2020-12) per message kind, named by its topic suffix."""
    out = {}
    for c in CHANNELS:
        schema = c.model.model_json_schema(mode="validation")
        out[c.name] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://edgefleet.example/schemas/v{p.SCHEMA_VERSION}/{c.name}.json",
            **schema,
        }
    return out


def dumps(doc: dict[str, Any]) -> str:
    """The canonical text of a generated document (what is committed under docs/)."""
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"
