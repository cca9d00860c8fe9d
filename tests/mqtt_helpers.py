"""MQTT test helpers shared by the link, agent and fleet tests: a real paho subscriber and waiting."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class Subscriber:
    """A plain paho subscriber; with ``clean=False`` the broker queues QoS 1 messages for it while it is
    away, across broker restarts too (persistence). It subscribes again whenever the broker answers
    without its session (a broker killed before its autosave forgets it; seen in CI, where the outage test
    then received nothing after the restart)."""

    def __init__(self, url: str, topic: str, *, clean: bool = False, ca: Path | None = None) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.sessions_present: list[bool] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._topic = topic
        parts = urlsplit(url)
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"sub-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv311,
            clean_session=clean,
        )
        if ca is not None:
            self.client.tls_set(ca_certs=str(ca))
        self.client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=5)
        self.client.loop_start()
        assert self._subscribed.wait(10), f"subscriber could not subscribe to {topic} on {url}"
        self.subscribed_at = time.time()

    def _on_connect(self, client: mqtt.Client, userdata: object, flags, reason_code, properties) -> None:
        self.sessions_present.append(bool(flags.session_present))
        if not self._subscribed.is_set() or not flags.session_present:
            client.subscribe(self._topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [p for _, p, _ in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained(url: str, topic: str, ca: Path | None = None, timeout: float = 5.0) -> dict | None:
    """The current message on a retained ``topic`` as JSON, read by a fresh subscriber (None if none).

    The broker's retained copy arrives first; a live publish racing the subscription is just as current.
    """
    sub = Subscriber(url, topic, clean=True, ca=ca)
    try:
        if not wait_until(lambda: bool(sub.messages), timeout):
            return None
        time.sleep(0.05)  # a live message published right after the retained one supersedes it
        return json.loads(sub.messages[-1][1])
    finally:
        sub.close()
