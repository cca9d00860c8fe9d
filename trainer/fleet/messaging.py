"""The trainer service's own MQTT connection: alerts, device commands and retained release hints.

One long-lived paho client with the service identity (the broker ACL lets only it write commands and
release topics). Publishing never blocks the control loop; QoS 1 messages queued while disconnected
are sent after reconnecting (paho keeps them).
"""

from __future__ import annotations

import logging
import uuid

from edge_agent.config import MqttSettings
from edge_agent.mqtt_client import new_client
from edge_agent.protocol import Alert, Command, ReleaseHint, alert_topic, cmd_topic, release_topic

log = logging.getLogger(__name__)


class FleetPublisher:
    """Publishes the trainer's messages; connects in the background and reconnects by itself."""

    def __init__(self, settings: MqttSettings, fleet: str) -> None:
        self.fleet = fleet
        self.client = new_client(settings, settings.client_id or f"trainer-{uuid.uuid4().hex[:8]}")
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
