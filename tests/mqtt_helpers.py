"""MQTT test helpers shared by the link, agent and fleet tests: a real paho subscriber and waiting."""

from __future__ import annotations

import contextlib
import json
import socket
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


class TcpProxy:
    """A TCP relay to ``127.0.0.1:target_port`` whose connections :meth:`cut` closes at once: a network
    drop as the broker sees it (the socket closes without DISCONNECT, so it publishes the last will)
    while the broker itself keeps running. New connections are accepted again right after a cut."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self.accepted = 0
        threading.Thread(target=self._accept, name="tcp-proxy", daemon=True).start()

    def _accept(self) -> None:
        """Relay every accepted client to a fresh connection to the target, both ways."""
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self._target), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        """Copy bytes from ``src`` to ``dst`` until either side closes."""
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Close every relayed connection (both ends) now."""
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        """Stop accepting and cut what is open."""
        with contextlib.suppress(OSError):  # shutdown wakes the accept() blocked in the thread
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self.cut()
