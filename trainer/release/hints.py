"""Announce a release: the retained MQTT hint on ``ef/v1/{fleet}/release/{channel}``.

Only a hint: devices check the TUF metadata themselves and ignore everything in the hint but the target
path. It is retained so a device that was offline reads it on reconnect. The trainer's service identity
is the only one the broker ACL lets write release topics (deploy/mosquitto/).
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from pathlib import Path
from typing import Protocol

from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.config import MqttSettings
from edge_agent.mqtt_client import new_client
from edge_agent.protocol import ReleaseHint, release_topic
from trainer.errors import ReleaseError


class HintPublisher(Protocol):
    """What announces a release: the service's :class:`~trainer.fleet.messaging.FleetPublisher`, or a
    command's :class:`HintSender`."""

    def hint(self, hint: ReleaseHint) -> None: ...


class HintSender:
    """One connection for a command's release hints: connected (CONNACK received) before the command
    changes anything, and each retained hint published at QoS 1 and acknowledged (PUBACK) before the
    command reports success. Errors are :class:`ReleaseError` naming the broker."""

    def __init__(self, settings: MqttSettings, timeout: float = 10.0) -> None:
        self.settings, self.timeout = settings, timeout
        self.client = new_client(settings, settings.client_id or f"trainer-release-{uuid.uuid4().hex[:8]}")
        connack: list[ReasonCode] = []
        accepted = threading.Event()

        def on_connect(_c: object, _u: object, _f: object, reason: ReasonCode, _p: object) -> None:
            connack.append(reason)
            accepted.set()

        self.client.on_connect = on_connect
        try:
            self.client.connect(settings.host, settings.port, keepalive=30)
        except Exception as exc:  # noqa: BLE001 - refused, unreachable, TLS: one clear error
            raise ReleaseError(f"cannot connect to {settings.url} to send the release hint: {exc}") from None
        self.client.loop_start()
        if not accepted.wait(timeout) or connack[0].is_failure:
            self.close()
            why = f"refused: {connack[0]}" if connack else f"no CONNACK within {timeout:g} s"
            raise ReleaseError(f"cannot connect to {settings.url} to send the release hint: {why}")

    def hint(self, hint: ReleaseHint) -> None:
        """Publish ``hint`` retained and wait for the broker's acknowledgement."""
        info = self.client.publish(
            release_topic(hint.fleet, hint.channel), hint.to_bytes(), qos=1, retain=True
        )
        with contextlib.suppress(RuntimeError):  # the connection was lost before the message left
            info.wait_for_publish(self.timeout)
        if not info.is_published():
            raise ReleaseError(
                f"{self.settings.url} did not acknowledge the hint for release {hint.release} on "
                f"{hint.channel} within {self.timeout:g} s (the release is signed: devices find it when "
                "they next poll)"
            )

    def close(self) -> None:
        """Disconnect (after what was acknowledged)."""
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> HintSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def send_hint(settings: MqttSettings, hint: ReleaseHint, timeout: float = 10.0) -> None:
    """Publish ``hint`` retained at QoS 1 and wait for the broker's PUBACK (one short-lived connection)."""
    with HintSender(settings, timeout) as sender:
        sender.hint(hint)


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
