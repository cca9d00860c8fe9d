"""Announce a release: the retained MQTT hint on ``ef/v1/{fleet}/release/{channel}``.

Only a hint: devices check the TUF metadata themselves and ignore everything in the hint but the target
path. It is retained so a device that was offline reads it on reconnect. The trainer's service identity
is the only one the broker ACL lets write release topics (deploy/mosquitto/).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from edge_agent.config import MqttSettings
from edge_agent.mqtt_client import new_client
from edge_agent.protocol import ReleaseHint, release_topic
from trainer.errors import ReleaseError


def send_hint(settings: MqttSettings, hint: ReleaseHint, timeout: float = 10.0) -> None:
    """Publish ``hint`` retained at QoS 1 and wait for the broker's PUBACK (one short-lived connection)."""
    client = new_client(settings, settings.client_id or f"trainer-release-{uuid.uuid4().hex[:8]}")
    try:
        client.connect(settings.host, settings.port, keepalive=30)
    except Exception as exc:  # noqa: BLE001 - refused, unreachable, TLS: one clear error
        raise ReleaseError(f"cannot connect to {settings.url} to send the release hint: {exc}") from None
    client.loop_start()
    try:
        info = client.publish(release_topic(hint.fleet, hint.channel), hint.to_bytes(), qos=1, retain=True)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise ReleaseError(f"{settings.url} did not acknowledge the release hint within {timeout} s")
    finally:
        client.disconnect()
        client.loop_stop()


def mqtt_settings(
    url: str, ca: str | None = None, cert: str | None = None, key: str | None = None
) -> MqttSettings:
    """Broker settings from CLI flags."""
    return MqttSettings(
        url=url,
        ca=Path(ca) if ca else None,
        cert=Path(cert) if cert else None,
        key=Path(key) if key else None,
    )
