"""Helpers for the update tests: the shipped broker config with mTLS + ACL, TLS clients, agent processes,
and a served mirror of a release repository that tests can tamper with like an attacker on the wire."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from trainer.ops.broker import BrokerTLS, MosquittoBroker, free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY_CONF = ROOT / "deploy" / "mosquitto" / "edgefleet.conf"
DEPLOY_ACL = ROOT / "deploy" / "mosquitto" / "edgefleet.acl"
GUARD_PLUGIN = ROOT / "build" / "edgefleet_guard.so"
"""Built by ``make broker-plugin`` (``make test`` builds it first)."""


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """The first truthy value of ``predicate()`` within ``timeout`` seconds, else None."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value or None
        time.sleep(interval)


class DeployedBroker(MosquittoBroker):
    """mosquitto running deploy/mosquitto/edgefleet.conf as shipped, with only paths and ports rewritten:
    ``port`` is the device listener, ``service_port`` the services' listener."""

    def __init__(self, workdir: Path, pki: Path, binary: str) -> None:
        tls = BrokerTLS(
            ca=pki / "ca.crt",
            cert=pki / "server" / "broker.crt",
            key=pki / "server" / "broker.key",
            require_certificate=True,
            use_identity_as_username=True,
        )
        super().__init__(workdir, tls=tls, binary=binary)
        self.pki = pki
        self.service_port = free_port()

    def config_text(self) -> str:
        assert self.tls is not None
        from .conftest import require

        require(GUARD_PLUGIN.exists(), f"the broker guard plugin {GUARD_PLUGIN} (make broker-plugin)")
        swap = {
            "cafile": f"cafile {self.tls.ca}",
            "certfile": f"certfile {self.tls.cert}",
            "keyfile": f"keyfile {self.tls.key}",
            "acl_file": f"acl_file {DEPLOY_ACL}",
            "plugin": f"plugin {GUARD_PLUGIN}",
            "persistence_location": f"persistence_location {self.workdir}/",
        }
        ports = iter((self.port, self.service_port))
        out = []
        for line in DEPLOY_CONF.read_text().splitlines():
            key = line.split(" ", 1)[0]
            out.append(f"listener {next(ports)} 127.0.0.1" if key == "listener" else swap.get(key, line))
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            out.append("user root")
        out += [f"log_dest file {self.log_path}", "log_type error", "log_type warning", "log_type notice"]
        return "\n".join(out) + "\n"


class TlsClient:
    """A paho client with a client certificate that records what it receives."""

    def __init__(
        self,
        url_port: int,
        pki: Path,
        name: str,
        kind: str = "device",
        *,
        subscribe: str | None = None,
        cert_dir: Path | None = None,
        client_id: str | None = None,
        username: str | None = None,
    ) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.granted: list[int] = []
        """SUBACK reason codes of every subscription (0x80: refused)."""
        self.disconnects = 0
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"{name}-{uuid.uuid4().hex[:6]}",
            protocol=mqtt.MQTTv311,
        )
        if username is not None:  # the broker takes the identity from the certificate, whatever this says
            self.client.username_pw_set(username)
        d = cert_dir or pki / kind
        self.client.tls_set(
            ca_certs=str(pki / "ca.crt"), certfile=str(d / f"{name}.crt"), keyfile=str(d / f"{name}.key")
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.connect("127.0.0.1", url_port, keepalive=10)
        self.client.loop_start()
        if subscribe:
            self.client.subscribe(subscribe, qos=1)
            assert self._subscribed.wait(10), f"{name} could not subscribe to {subscribe}"

    def subscribe(self, topic: str) -> int:
        """Subscribe at QoS 1 and wait for the SUBACK: its reason code (0x80 when refused)."""
        self._subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self._subscribed.wait(10), f"no SUBACK for {topic}"
        return self.granted[-1]

    def _on_subscribe(self, _c: mqtt.Client, _u: object, _mid: int, codes: list, _p: object) -> None:
        self.granted += [c.value for c in codes]
        self._subscribed.set()

    def _on_disconnect(self, *_args: object) -> None:
        self.disconnects += 1

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def json_messages(self, suffix: str) -> list[dict]:
        with self._lock:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith(suffix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class AgentProcess:
    """``edgefleet agent run --config`` as a child process, as on a device."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        cmd = [sys.executable, "-m", "edge_agent.cli", "agent", "run", "--config", str(self.config)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        return self

    def kill(self) -> None:
        """SIGKILL: like pulling the plug (nothing is flushed or closed)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode or 0)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def mirror(repo_dir: Path, served: Path) -> None:
    """Make ``served`` an exact copy of the repository's metadata/ and targets/ (what a static host serves)."""
    for sub in ("metadata", "targets"):
        dst = served / sub
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(repo_dir / sub, dst)


def agent_yaml(
    path: Path,
    *,
    device: str,
    fleet: str,
    state: Path,
    package: Path,
    broker_url: str,
    repo_url: str,
    root: Path,
    tls: tuple[Path, Path, Path] | None = None,
    channel: str = "canary",
    window_frames: int = 10,
    fps: int = 30,
    update: dict[str, Any] | None = None,
) -> Path:
    """Write an agent config with an ``update`` section."""
    upd = {
        "repository": repo_url,
        "root": str(root),
        "channel": channel,
        "poll_seconds": 0,
        "poll_on_start": False,
        "health_windows": 2,
        "latency_budget_ms": 50,
    } | (update or {})
    mqtt_cfg: dict[str, Any] = {"url": broker_url, "reconnect_min_s": 0.1, "reconnect_max_s": 1.0}
    if tls:
        mqtt_cfg |= {"ca": str(tls[0]), "cert": str(tls[1]), "key": str(tls[2])}
    cfg = {
        "device_id": device,
        "fleet": fleet,
        "state_dir": str(state),
        "source": {"uri": f"synthetic:?fps={fps}&width=160&height=120"},
        "model": {"package": str(package), "artifact": "onnx-fp32"},
        "mqtt": mqtt_cfg,
        "telemetry": {"window_seconds": None, "window_frames": window_frames},
        "spool": {"flush_timeout_s": 2},
        "update": upd,
    }
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path
