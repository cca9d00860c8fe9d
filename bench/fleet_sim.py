"""One process of bench/fleet_load_bench.py's simulated fleet: thousands of paho clients on one selector loop.

No thread per client: every client's socket is registered in one ``selectors`` loop through paho's
external-loop callbacks (``on_socket_open``/``close``/``register_write``/``unregister_write``) and served
with ``loop_read``/``loop_write``/``loop_misc``. Each device does what the agent's link does on the
wire (edge_agent/agent.py, edge_agent/mqtt_link.py): its own client id and certificate, a retained
``offline`` last will, a retained ``online`` birth, subscriptions to its own status (the identity
echo, QoS 0), its commands (QoS 1) and the ``stable`` and ``canary`` release hints (QoS 0); once its birth comes back it
publishes pre-rendered windows (QoS 1) every ``period`` seconds at its own phase, and on a clean stop a
retained ``offline``. A device that loses its connection reconnects and sends what it missed.

Run by the bench as ``python -m bench.fleet_sim SPEC.json``: it prints ``READY`` once every device is
connected (or the connect deadline passed), reads ``GO <t0>`` on stdin, publishes from t0 for
``seconds``, flushes, writes its results to ``spec["out"]`` and prints ``DONE``.
"""

from __future__ import annotations

import contextlib
import json
import resource
import selectors
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.backoff import Backoff
from edge_agent.config import MqttSettings
from edge_agent.protocol import (
    Status,
    TelemetryWindow,
    cmd_topic,
    release_topic,
    status_topic,
    tele_topic,
)

MISC_EVERY_S = 1.0


@dataclass
class Device:
    """One simulated device: its client, connection state and what it published."""

    name: str
    index: int
    phase: float
    client: mqtt.Client | None = None
    connection: int = 0
    started: float = 0.0
    confirmed_at: float = 0.0
    birth: bytes = b""
    up: bool = False
    confirmed: bool = False
    retry_at: float = 0.0
    payloads: list[bytes] = field(default_factory=list)
    backoff: Backoff = field(
        default_factory=lambda: Backoff(
            MqttSettings.model_fields["reconnect_min_s"].default,
            MqttSettings.model_fields["reconnect_max_s"].default,
        )
    )
    """The agent's jittered exponential reconnect delays (its defaults), reset once connected."""
    missed: list[int] = field(default_factory=list)
    """Windows due while disconnected (the agent's spool): sent once the birth comes back."""


class Fleet:
    """Every device of this process and the selector loop that drives them."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.fleet: str = spec["fleet"]
        self.session: int = spec["session"]
        self.sel = selectors.DefaultSelector()
        total = spec["total_devices"]
        self.devices = [Device(name, i, (i + 0.5) / total * spec["period"]) for name, i in spec["devices"]]
        self.todo: list[Device] = list(self.devices)
        self.pending = 0
        self.inflight: dict[tuple[int, int], tuple[Device, int, float]] = {}
        """(device index, mid) -> (device, seq, publish time) of windows awaiting their PUBACK."""
        self.published: list[tuple[str, int, float]] = []
        self.puback_ms: list[float] = []
        self.lateness: list[float] = []
        self.counts = {"connect_failures": 0, "disconnects": 0, "refused_subscriptions": 0, "acked": 0}
        self.stdin_line = ""

    # -- connecting ------------------------------------------------------------------------------
    def _client(self, dev: Device) -> mqtt.Client:
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"{self.fleet}-{dev.name}",
            protocol=mqtt.MQTTv311,
            clean_session=True,
            userdata=dev,
        )
        tls = self.spec.get("tls")
        if tls:
            c.tls_set(
                ca_certs=tls["ca"],
                certfile=f"{tls['dir']}/{dev.name}.crt",
                keyfile=f"{tls['dir']}/{dev.name}.key",
                cert_reqs=ssl.CERT_REQUIRED,
            )
        c.max_inflight_messages_set(20)
        c.on_connect, c.on_subscribe, c.on_message = self._on_connect, self._on_subscribe, self._on_message
        c.on_publish, c.on_disconnect = self._on_publish, self._on_disconnect
        c.on_socket_open, c.on_socket_close = self._sock_open, self._sock_close
        c.on_socket_register_write, c.on_socket_unregister_write = self._want_write, self._no_write
        return c

    def _status(self, dev: Device, state: str) -> bytes:
        return Status(
            fleet=self.fleet,
            device=dev.name,
            state=state,  # type: ignore[arg-type]
            session=self.session,
            ts=time.time(),
            connection=dev.connection,
            agent_version="0.1.0",
        ).to_bytes()

    def connect(self, dev: Device) -> None:
        """Open one connection (TCP and TLS block here; the CONNACK comes through the loop)."""
        if dev.client is None:
            dev.client = self._client(dev)
        dev.connection += 1
        dev.client.will_set(
            status_topic(self.fleet, dev.name), self._status(dev, "offline"), qos=1, retain=True
        )
        host, port = self.spec["endpoints"][dev.index % len(self.spec["endpoints"])]
        dev.started = dev.started or time.time()
        try:
            dev.client.connect(host, port, keepalive=self.spec["keepalive"])
        except (OSError, ssl.SSLError):
            self.counts["connect_failures"] += 1
            dev.retry_at = time.monotonic() + dev.backoff.next()
            self.todo.append(dev)
            return
        self.pending += 1

    def _on_connect(self, c: mqtt.Client, dev: Device, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self.counts["connect_failures"] += 1
            return
        dev.up = True
        dev.birth = self._status(dev, "online")
        c.publish(status_topic(self.fleet, dev.name), dev.birth, qos=1, retain=True)
        subs = [(status_topic(self.fleet, dev.name), 0), (cmd_topic(self.fleet, dev.name), 1)]
        subs += [(release_topic(self.fleet, ch), 0) for ch in ("stable", "canary")]  # as the agent does
        c.subscribe(subs)

    def _on_subscribe(self, c: mqtt.Client, dev: Device, mid: int, codes: Any, props: Any) -> None:
        self.counts["refused_subscriptions"] += sum(1 for rc in codes if rc.is_failure)

    def _on_message(self, c: mqtt.Client, dev: Device, msg: mqtt.MQTTMessage) -> None:
        mine = msg.topic == status_topic(self.fleet, dev.name) and bytes(msg.payload) == dev.birth
        if mine and not dev.confirmed:
            dev.confirmed = True
            self.pending -= 1
            dev.confirmed_at = dev.confirmed_at or time.time()
            dev.backoff.reset()
            for seq in dev.missed:
                self._publish(dev, seq, late=0.0)
            dev.missed.clear()

    def _on_disconnect(self, c: mqtt.Client, dev: Device, flags: Any, rc: Any, props: Any) -> None:
        if self.stdin_line == "STOP":
            return
        self.counts["disconnects"] += 1
        if not dev.confirmed:
            self.pending -= 1
        dev.up = dev.confirmed = False
        dev.retry_at = time.monotonic() + dev.backoff.next()
        self.todo.append(dev)

    # -- the selector --------------------------------------------------------------------------------
    def _sock_open(self, c: mqtt.Client, dev: Device, sock: Any) -> None:
        self.sel.register(sock, selectors.EVENT_READ, c)

    def _sock_close(self, c: mqtt.Client, dev: Device, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)

    def _want_write(self, c: mqtt.Client, dev: Device, sock: Any) -> None:
        self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)

    def _no_write(self, c: mqtt.Client, dev: Device, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, selectors.EVENT_READ, c)

    def serve(self, timeout: float) -> None:
        """One selector pass: read and write every ready socket (and what TLS already decrypted)."""
        for key, events in self.sel.select(timeout):
            if key.data is None:  # stdin
                self.stdin_line = sys.stdin.readline().strip()
                self.sel.unregister(sys.stdin)
                continue
            c: mqtt.Client = key.data
            if events & selectors.EVENT_WRITE:
                c.loop_write()
            if events & selectors.EVENT_READ:
                c.loop_read()
                sock = c.socket()
                while isinstance(sock, ssl.SSLSocket) and sock.pending() and c.socket() is sock:
                    c.loop_read()

    def misc(self) -> None:
        """Keepalive pings and timeouts of every client (paho's loop_misc), and due reconnects."""
        for dev in self.devices:
            if dev.client is not None and dev.client.socket() is not None:
                dev.client.loop_misc()
        self.start_connects()

    def start_connects(self) -> None:
        now = time.monotonic()
        while self.todo and self.pending < self.spec["max_pending"]:
            dev = self.todo[0]
            if dev.retry_at > now:
                self.todo.append(self.todo.pop(0))
                if all(d.retry_at > now for d in self.todo):
                    return
                continue
            self.connect(self.todo.pop(0))

    # -- windows ---------------------------------------------------------------------------------------
    def render(self, t0: float) -> list[tuple[float, Device, int]]:
        """Pre-render every window of every device (seq per device, end = its due time); the schedule."""
        templates = [
            TelemetryWindow.model_validate_json(line)
            for line in Path(self.spec["templates"]).read_text().splitlines()
        ]
        period, seconds = self.spec["period"], self.spec["seconds"]
        schedule = []
        for dev in self.devices:
            k = 0
            while dev.phase + k * period < seconds:
                due = t0 + dev.phase + k * period
                w = templates[(dev.index + k) % len(templates)].model_copy(
                    update={
                        "fleet": self.fleet,
                        "device": dev.name,
                        "session": self.session,
                        "seq": k,
                        "start": due - period,
                        "end": due,
                    }
                )
                dev.payloads.append(w.to_bytes())
                schedule.append((due, dev, k))
                k += 1
        schedule.sort(key=lambda s: s[0])
        return schedule

    def _publish(self, dev: Device, seq: int, late: float) -> None:
        assert dev.client is not None
        info = dev.client.publish(tele_topic(self.fleet, dev.name), dev.payloads[seq], qos=1)
        now = time.time()
        self.published.append((dev.name, seq, now))
        self.lateness.append(late)
        self.inflight[(dev.index, info.mid)] = (dev, seq, now)

    def _on_publish(self, c: mqtt.Client, dev: Device, mid: int, rc: Any, props: Any) -> None:
        got = self.inflight.pop((dev.index, mid), None)
        if got is not None:
            self.counts["acked"] += 1
            self.puback_ms.append(1000 * (time.time() - got[2]))

    def due(self, schedule: list[tuple[float, Device, int]], at: int) -> int:
        """Publish (or keep for the reconnect) every window due by now; the next schedule index."""
        now = time.time()
        while at < len(schedule) and schedule[at][0] <= now:
            t, dev, seq = schedule[at]
            if dev.confirmed:
                self._publish(dev, seq, late=now - t)
            else:
                dev.missed.append(seq)
            at += 1
        return at


def _loop_until(fleet: Fleet, done: Any, deadline: float, schedule: Any = None) -> int:
    """Serve the sockets until ``done()`` or the deadline; publishes due windows when given a schedule."""
    at, last_misc = 0, 0.0
    while not done(at) and time.monotonic() < deadline:
        fleet.serve(0.02)
        if schedule is not None:
            at = fleet.due(schedule, at)
        if time.monotonic() - last_misc >= MISC_EVERY_S:
            last_misc = time.monotonic()
            fleet.misc()
    return at


def _connect_phase(fleet: Fleet) -> dict[str, Any]:
    t_start = time.time()
    fleet.start_connects()
    deadline = time.monotonic() + fleet.spec["connect_timeout_s"]
    _loop_until(fleet, lambda _a: all(d.confirmed for d in fleet.devices), deadline)
    confirmed = [d.confirmed_at - d.started for d in fleet.devices if d.confirmed]
    return {
        "connect_started": t_start,
        "connect_done": max((d.confirmed_at for d in fleet.devices if d.confirmed), default=None),
        "connected": len(confirmed),
        "device_connect_s": sorted(confirmed),
        "confirmed_at": sorted(d.confirmed_at for d in fleet.devices if d.confirmed),
    }


def _stop(fleet: Fleet) -> None:
    """The agent's clean stop: a retained ``offline`` on each connection, then DISCONNECT."""
    fleet.stdin_line = "STOP"
    for dev in fleet.devices:
        if dev.client is not None and dev.up:
            dev.client.publish(status_topic(fleet.fleet, dev.name), fleet._status(dev, "offline"), 1, True)
    _loop_until(fleet, lambda _a: False, time.monotonic() + 3.0)
    for dev in fleet.devices:
        if dev.client is not None and dev.client.socket() is not None:
            dev.client.disconnect()
    _loop_until(fleet, lambda _a: False, time.monotonic() + 1.0)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Connect, report READY, publish from GO for ``seconds``, flush, stop; the results."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fleet = Fleet(spec)
    connect = _connect_phase(fleet)
    print("READY " + json.dumps({"connected": connect["connected"]}), flush=True)
    fleet.sel.register(sys.stdin, selectors.EVENT_READ, None)
    _loop_until(fleet, lambda _a: fleet.stdin_line.startswith("GO"), time.monotonic() + 3600)
    t0 = float(fleet.stdin_line.split()[1])
    t_render = time.perf_counter()
    schedule = fleet.render(t0)
    render_s = time.perf_counter() - t_render
    end = t0 + spec["seconds"] + 600
    _loop_until(fleet, lambda at: at >= len(schedule), end - time.time() + time.monotonic(), schedule)
    _loop_until(fleet, lambda _a: not fleet.inflight, time.monotonic() + spec["flush_timeout_s"])
    unacked = [[dev.name, seq] for dev, seq, _ in fleet.inflight.values()]
    _stop(fleet)
    connect["finally_connected"] = sum(1 for d in fleet.devices if d.confirmed)
    return {
        **connect,
        "render_s": render_s,
        "scheduled": len(schedule),
        "published": fleet.published,
        "unacked": len(unacked),
        "unacked_keys": unacked,
        "puback_ms": sorted(fleet.puback_ms),
        "max_lateness_s": max(fleet.lateness, default=0.0),
        "cpu_s": time.process_time(),
        **fleet.counts,
    }


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    result = run(spec)
    Path(spec["out"]).write_text(json.dumps(result))
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
