"""The agent's broker connection: retained birth and last will, reconnect with jittered backoff, and
at-least-once delivery of spooled messages across broker outages and agent restarts.

One thread owns the paho client (MQTT 3.1.1 only, so it runs on mosquitto, EMQX, VerneMQ and amqtt). It
connects, publishes the retained birth and resubscribes on every connect, then loops: it keeps up to
``max_inflight`` spooled QoS 1 messages in flight, oldest first, and deletes a spool row only when its
PUBACK arrives. Other threads only write to the spool or to a small queue, so paho is never called from
two threads. Every connection gets a fresh paho client, so nothing paho queued on a dead connection is
replayed behind the spool's back: after a reconnect the unacknowledged rows are sent again, in order
(duplicates are possible; receivers dedupe on (device, session, seq)).

Every connection attempt gets the next number (1, 2, ...), passed to ``birth`` and ``will``: the status
messages of one connection carry it, so a receiver can tell a reconnect's birth from the last will of
the connection before it (whose ``ts``, taken when that connection opened, may be older)::

    link = MqttLink(settings, client_id="shop-cam1", status_topic=status_topic("shop", "cam1"),
                    birth=lambda n: status("online", n).to_bytes(),   # n: the connection number
                    will=lambda n: status("offline", n).to_bytes(), spool=spool, events=events)
    link.start()
    link.publish_spooled(tele_topic("shop", "cam1"), window.to_bytes())   # never blocks, never raises
    link.publish_now(pred_topic("shop", "cam1"), pred.to_bytes())         # QoS 0, dropped when offline
    drained = link.stop(flush_timeout=10)   # deliver what it can, retained "offline", clean DISCONNECT
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from edge_agent.backoff import Backoff
from edge_agent.config import MqttSettings
from edge_agent.errors import ConfigError
from edge_agent.events import EventCounter
from edge_agent.mqtt_client import new_client
from edge_agent.spool import Spool

log = logging.getLogger(__name__)

LOOP_TIMEOUT_S = 0.05
"""One network iteration; also the longest a ``publish_now`` message waits for the link thread."""
CONNACK_TIMEOUT_S = 10.0
OFFLINE_ACK_TIMEOUT_S = 2.0
NOW_QUEUE_MAX = 1000
"""``publish_now`` messages waiting for the link thread; beyond this they are dropped and counted."""


class MqttLink:
    """A self-reconnecting MQTT 3.1.1 connection that delivers a :class:`Spool` at least once."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str,
        status_topic: str,
        birth: Callable[[int], bytes],
        will: bytes | Callable[[int], bytes],
        spool: Spool,
        events: EventCounter,
        subscriptions: Sequence[tuple[str, int]] = (),
        on_message: Callable[[str, bytes], None] | None = None,
    ) -> None:
        """Check TLS files now, so a bad path fails at start instead of in every reconnect attempt."""
        for field in ("ca", "cert", "key"):
            path = getattr(settings, field)
            if path is not None and not path.is_file():
                raise ConfigError(f"mqtt.{field}: {path} is not a readable file")
        self.settings = settings
        self.client_id = client_id
        self.status_topic = status_topic
        self._birth = birth
        self._will = will if callable(will) else (lambda _n, data=bytes(will): data)
        """The offline status of connection n: built when the connection registers it as its last will,
        and again for the clean shutdown, so each carries the time it was made."""
        self.connection = 0
        """Number of the current (or last) connection attempt: 1 for the first, +1 for every retry."""
        self._spool = spool
        self._events = events
        self._subscriptions = list(subscriptions)
        self._requested: list[tuple[str, int]] = []
        """What the current connection subscribed to, in SUBACK order."""
        self._on_message = on_message
        self._endpoint = 0
        """Index in ``settings.endpoints`` of the broker node this link connects to."""
        self._url = self._endpoint_url()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._flush_deadline = 0.0
        self._thread: threading.Thread | None = None
        self._now: deque[tuple[str, bytes, int, bool]] = deque()
        self._now_lock = threading.Lock()
        # Link-thread state: paho message id -> spool id of the messages in flight on this connection.
        self._inflight: dict[int, int] = {}
        self._acked: list[int] = []
        self._cursor = 0
        self._refused: str | None = None
        self._up = False
        self._subscribed = False
        self._delays: deque[float] = deque(maxlen=64)
        self._echo: bytes | None = None
        """The birth sent on this connection; spooled messages wait until the broker echoes it back."""
        self._confirmed = False

    # ----- public API -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the network thread (it connects in the background and keeps reconnecting)."""
        if self._thread is not None:
            raise RuntimeError("MqttLink.start() called twice")
        self._thread = threading.Thread(target=self._run, name=f"mqtt-link-{self.client_id}", daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        """True between CONNACK and the loss of the connection."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected or ``timeout`` seconds have passed."""
        return self._connected.wait(timeout)

    def publish_spooled(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, carries: int = 0
    ) -> None:
        """Queue a message on the durable spool; the link thread delivers it whenever the broker is up.
        ``carries``: the spool evictions the message reports (see :class:`~edge_agent.spool.SpoolItem`)."""
        if not topic or "+" in topic or "#" in topic:
            raise ValueError(f"cannot publish to topic {topic!r}: empty or contains a wildcard")
        self._spool.put(topic, payload, qos, retain, carries)

    def publish_now(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """Best-effort send (per-frame predictions): False, counted as ``pred_dropped``, when offline."""
        if self._connected.is_set():
            with self._now_lock:
                if len(self._now) < NOW_QUEUE_MAX:
                    self._now.append((topic, bytes(payload), qos, retain))
                    return True
        self._events.add("pred_dropped")
        return False

    def stop(self, flush_timeout: float = 10.0) -> bool:
        """Deliver the spool for up to ``flush_timeout`` s if connected, publish "offline", disconnect.

        Returns True when the spool is empty afterwards.
        """
        if self._thread is not None:
            self._flush_deadline = time.monotonic() + max(0.0, flush_timeout)
            self._stop.set()
            self._thread.join(flush_timeout + OFFLINE_ACK_TIMEOUT_S + CONNACK_TIMEOUT_S)
            if self._thread.is_alive():
                log.error("MQTT link thread for %s did not stop in time", self._url)
        return len(self._spool) == 0

    def stats(self) -> dict[str, Any]:
        """A snapshot for status reports and tests."""
        return {
            "connected": self.connected,
            "inflight": len(self._inflight),
            "spooled": len(self._spool),
            "spool_bytes": self._spool.size_bytes(),
            "subscribed": self._subscribed,
            "identity_confirmed": self._confirmed,
            "queued_now": len(self._now),
            "recent_reconnect_delays_s": list(self._delays),
            "events": self._events.totals(),
        }

    # ----- the link thread ----------------------------------------------------------------------

    def _run(self) -> None:
        """Connect, serve, and reconnect with jittered exponential backoff until stopped.

        A stop that finds the link between connections (not started yet, or waiting to reconnect) with
        spooled messages makes one more attempt at once: a short run, or a stop during a broker's
        hiccup, still flushes if the broker answers, and a broker that is down costs one refused connect."""
        backoff = Backoff(self.settings.reconnect_min_s, self.settings.reconnect_max_s)
        while True:
            final = self._stop.is_set()
            if final and (len(self._spool) == 0 or time.monotonic() >= self._flush_deadline):
                break
            client = self._new_client()
            try:
                self._session(client, backoff)
            except Exception:
                log.exception("MQTT link to %s failed unexpectedly; reconnecting", self._url)
            finally:
                self._end_session(client)
            if self._stop.is_set():
                if final or len(self._spool) == 0 or time.monotonic() >= self._flush_deadline:
                    break
                continue
            delay = backoff.next()
            self._delays.append(delay)
            log.info("MQTT: reconnecting to %s in %.2f s", self._url, delay)
            self._stop.wait(delay)

    def _new_client(self) -> mqtt.Client:
        """A fresh paho client with credentials, TLS, the last will and our callbacks."""
        s = self.settings
        client = new_client(s, self.client_id, clean_session=True)
        self.connection += 1
        client.will_set(self.status_topic, self._will(self.connection), qos=1, retain=True)
        client.max_inflight_messages_set(s.max_inflight + 10)  # room for birth/offline beside the spool
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_inbound
        client.on_subscribe = self._on_subscribe
        return client

    def _endpoint_url(self) -> str:
        host, port = self.settings.endpoints[self._endpoint]
        return f"{'mqtts' if self.settings.tls else 'mqtt'}://{host}:{port}"

    def _next_endpoint(self) -> None:
        """After a failed connection attempt, try the next node of the tier (``fallback_urls``)."""
        if len(self.settings.endpoints) > 1:
            self._endpoint = (self._endpoint + 1) % len(self.settings.endpoints)
            self._url = self._endpoint_url()

    def _session(self, client: mqtt.Client, backoff: Backoff) -> None:
        """One connection: connect, wait for CONNACK, then loop and pump until it drops or we stop."""
        self._refused = None
        host, port = self.settings.endpoints[self._endpoint]
        try:
            client.connect(host, port, keepalive=self.settings.keepalive)
        except Exception as exc:  # refused, unreachable, DNS, TLS handshake or certificate errors
            self._events.add("mqtt_connect_failures")
            log.warning("MQTT: cannot connect to %s: %s", self._url, exc)
            self._next_endpoint()
            return
        deadline = time.monotonic() + CONNACK_TIMEOUT_S
        while not self._connected.is_set():
            rc = client.loop(LOOP_TIMEOUT_S)
            if self._connected.is_set():
                break  # accepted; a drop in the same loop call is a lost connection, handled below
            if self._refused or rc != MQTTErrorCode.MQTT_ERR_SUCCESS or time.monotonic() > deadline:
                self._events.add("mqtt_connect_failures")
                why = self._refused or (mqtt.error_string(rc) if rc else "no CONNACK in time")
                log.warning("MQTT: connection to %s failed: %s", self._url, why)
                self._next_endpoint()
                return
            if self._stop.is_set() and time.monotonic() >= self._flush_deadline:
                return  # stopping, with no time left to flush on this connection
        backoff.reset()
        connected_at = time.monotonic()
        while True:
            if self._stop.is_set():
                self._shutdown(client, connected_at)
                return
            if self._confirmed:
                self._pump(client)
            elif time.monotonic() - connected_at > self.settings.identity_check_s:
                self._events.add("mqtt_identity_unconfirmed")
                log.error(
                    "MQTT: %s does not echo this device's status on %s: it drops what this device sends "
                    "(does the device id match the certificate's name, and does the ACL allow it?); "
                    "%d messages stay spooled",
                    self._url,
                    self.status_topic,
                    len(self._spool),
                )
                return
            rc = client.loop(LOOP_TIMEOUT_S)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or not self._connected.is_set():
                log.warning(
                    "MQTT: lost connection to %s (%s); %d unacknowledged messages stay spooled",
                    self._url,
                    mqtt.error_string(rc) if rc else "disconnected",
                    len(self._inflight),
                )
                return

    def _end_session(self, client: mqtt.Client) -> None:
        """Forget per-connection state; unacknowledged rows are still in the spool and will be re-sent."""
        if self._up and not self._stop.is_set():
            self._events.add("mqtt_disconnects")
        self._up = self._subscribed = self._confirmed = False
        self._echo = None
        self._connected.clear()
        self._apply_acks()
        self._inflight.clear()
        self._cursor = 0
        with self._now_lock:
            dropped = len(self._now)
            self._now.clear()
        self._events.add("pred_dropped", dropped)
        if client.socket() is not None:  # after a CONNACK timeout or an unexpected error: close it
            client.disconnect()
            client.loop(LOOP_TIMEOUT_S)

    def _shutdown(self, client: mqtt.Client, connected_at: float) -> None:
        """Flush the spool until the deadline, publish the retained offline status, disconnect cleanly.

        A stop that comes before the broker echoed this device's status still waits for the echo (up to
        ``identity_check_s``): breaking off at once left a short run's whole spool for the next start."""
        while True:
            self._apply_acks()
            unconfirmed_too_long = (
                not self._confirmed and time.monotonic() - connected_at > self.settings.identity_check_s
            )
            if (
                len(self._spool) == 0
                or time.monotonic() >= self._flush_deadline
                or not self._connected.is_set()
                or unconfirmed_too_long
            ):
                break
            if self._confirmed:
                self._pump(client)
            client.loop(LOOP_TIMEOUT_S)
        if not self._connected.is_set():
            return
        left = len(self._spool)
        if left:
            log.warning("MQTT: %d messages stay spooled for the next start (flush timeout)", left)
        info = client.publish(self.status_topic, self._will(self.connection), qos=1, retain=True)
        deadline = time.monotonic() + OFFLINE_ACK_TIMEOUT_S
        while (
            info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS
            and not info.is_published()
            and time.monotonic() < deadline
        ):
            if client.loop(LOOP_TIMEOUT_S) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        client.disconnect()
        for _ in range(20):  # let the DISCONNECT reach the socket
            if client.loop(LOOP_TIMEOUT_S) != MQTTErrorCode.MQTT_ERR_SUCCESS or client.socket() is None:
                break
        self._connected.clear()
        log.info("MQTT: disconnected from %s", self._url)

    def _pump(self, client: mqtt.Client) -> None:
        """Ack what the broker confirmed, send queued ``publish_now`` messages, top up spooled in-flight."""
        self._apply_acks()
        with self._now_lock:
            now = list(self._now)
            self._now.clear()
        for topic, payload, qos, retain in now:
            try:
                ok = (
                    client.publish(topic, payload, qos=qos, retain=retain).rc
                    == MQTTErrorCode.MQTT_ERR_SUCCESS
                )
            except ValueError as exc:  # invalid topic or QoS from the caller
                log.warning("MQTT: dropped a message for %r: %s", topic, exc)
                ok = False
            if not ok:
                self._events.add("pred_dropped")
        room = self.settings.max_inflight - len(self._inflight)
        if room <= 0:
            return
        sent = set(self._inflight.values())
        in_overflow = sum(1 for i in sent if i < 0)  # overflow items come back from every peek
        for item in self._spool.peek(room + in_overflow, after_id=self._cursor):
            if item.id in sent:
                continue
            try:
                info = client.publish(item.topic, item.payload, qos=item.qos, retain=item.retain)
            except ValueError as exc:  # a row no broker would accept: drop it rather than block the spool
                log.error("MQTT: dropping spooled message %d for %r: %s", item.id, item.topic, exc)
                self._events.add("spool_rejected")
                self._spool.ack(item.id)
                continue
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                log.debug(
                    "MQTT: publish of spooled message %d failed (%s)", item.id, mqtt.error_string(info.rc)
                )
                break
            if item.qos == 0:
                self._acked.append(item.id)  # QoS 0 has no PUBACK: handed to the socket is all we get
            else:
                self._inflight[info.mid] = item.id
            if item.id > 0:
                self._cursor = item.id

    def _apply_acks(self) -> None:
        if self._acked:
            acked, self._acked = self._acked, []
            self._spool.ack_many(acked)

    # ----- paho callbacks (run on the link thread, inside client.loop) -------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        """Publish the retained birth and (re)subscribe: the session is clean on every connect."""
        if reason_code.is_failure:
            self._refused = f"broker refused the connection: {reason_code}"
            return
        self._up = True
        self._connected.set()
        self._events.add("mqtt_connects")
        log.info("MQTT: connected to %s as %s", self._url, self.client_id)
        try:
            birth = self._birth(self.connection)
        except Exception:
            log.exception("MQTT: building the birth message failed; no birth on this connection")
            self._confirmed = True  # nothing to echo: the identity cannot be checked on this connection
        else:
            client.publish(self.status_topic, birth, qos=1, retain=True)
            self._echo = birth
            self._confirmed = self.settings.identity_check_s == 0
        # the caller's subscriptions, and this device's own status topic while its echo is awaited (QoS 0:
        # the echo is the retained birth sent on SUBACK, and on the NATS tier QoS 1 costs a consumer)
        self._requested = ([] if self._confirmed else [(self.status_topic, 0)]) + self._subscriptions
        if self._requested:
            rc, _mid = client.subscribe(self._requested)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                log.warning("MQTT: subscribing to %s failed: %s", self._requested, mqtt.error_string(rc))

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any
    ) -> None:
        """SUBACK: name every filter the broker refused (usually an ACL problem)."""
        refused = [t for (t, _), rc in zip(self._requested, reason_codes, strict=False) if rc.is_failure]
        if refused:
            log.error("MQTT: %s refused the subscription to %s", self._url, ", ".join(refused))
        self._subscribed = not refused

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        self._connected.clear()

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        """PUBACK: the broker owns the message now, so its spool row can go."""
        item_id = self._inflight.pop(mid, None)
        if item_id is not None:
            self._acked.append(item_id)

    def _on_inbound(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        """Hand an inbound message to the handler; whatever it raises is counted, never fatal."""
        topic = "<undecodable topic>"
        try:
            topic = message.topic
            if topic == self.status_topic:  # our own birth coming back: the broker accepts this identity
                if self._echo is not None and bytes(message.payload) == self._echo and not self._confirmed:
                    self._confirmed = True
                    log.info("MQTT: %s confirmed this device's identity (its status came back)", self._url)
                return
            if self._on_message is not None:
                self._on_message(topic, bytes(message.payload))
        except Exception as exc:
            self._events.add("bad_inbound")
            log.warning("MQTT: rejected inbound message on %s: %s: %s", topic, type(exc).__name__, exc)
