"""The trainer service's own MQTT connection: alerts, device commands and retained release hints.

One long-lived paho client with the service identity (the broker ACL lets only it write commands and
release topics). Publishing never blocks the control loop; QoS 1 messages queued while disconnected
are sent after reconnecting (paho keeps them).
"""

from __future__ import annotations

import logging
import ssl
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import MqttSettings
from edge_agent.protocol import Alert, Command, ReleaseHint, alert_topic, cmd_topic, release_topic

log = logging.getLogger(__name__)


class FleetPublisher:
    """Publishes the trainer's messages; connects in the background and reconnects by itself."""

    def __init__(self, settings: MqttSettings, fleet: str) -> None:
        self.fleet = fleet
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=settings.client_id or f"edgefleet-trainer-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv311,
        )
        if settings.username is not None:
            self.client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            self.client.tls_set(
                ca_certs=str(settings.ca) if settings.ca else None,
                certfile=str(settings.cert) if settings.cert else None,
                keyfile=str(settings.key) if settings.key else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        self.client.reconnect_delay_set(1, 5)
        self.client.max_queued_messages_set(10_000)
        self.client.connect_async(settings.host, settings.port, keepalive=30)
        self.client.loop_start()

    def alert(self, alert: Alert) -> None:
        self.client.publish(alert_topic(self.fleet), alert.to_bytes(), qos=1)

    def command(self, device: str, name: str, **args: str | int | float | bool) -> None:
        cmd = Command(name=name, args=args, id=uuid.uuid4().hex[:12])
        self.client.publish(cmd_topic(self.fleet, device, name), cmd.to_bytes(), qos=1)

    def hint(self, hint: ReleaseHint) -> None:
        self.client.publish(release_topic(hint.fleet, hint.channel), hint.to_bytes(), qos=1, retain=True)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
