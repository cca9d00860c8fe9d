"""`make demo` (until the fleet loop lands): the agent on real photographs, int8, against a local broker.

1. exports the pretrained EfficientNet-Lite0 package once (build/models/lite0);
2. copies the colour photographs that scikit-image ships into build/demo/photos;
3. starts a private mosquitto and a monitor that subscribes to the fleet's topics;
4. runs the real agent (``edgefleet agent run``, tflite-int8) on ``dir:`` of the photographs;
5. prints every message the monitor receives: status birth/offline, per-photo predictions and the
   telemetry window, as a monitoring service would see them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import paho.mqtt.client as mqtt

from edge_agent.config import MqttSettings
from edge_agent.mqtt_client import new_client
from edge_agent.package import load_package
from trainer.data.photos import PHOTO_FILES, load_photos
from trainer.ops.broker import MosquittoBroker, find_mosquitto

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build"
PHOTOS = ["chelsea", "coffee", "astronaut", "rocket", "motorcycle", "camera", "coins", "moon"]


def ensure_package(out: Path) -> Path:
    try:
        load_package(out)
        return out
    except Exception:  # noqa: BLE001 - missing or stale: export it
        from trainer.export.pretrained import export_pretrained

        print(f"exporting the pretrained model package into {out} (about 40 s) ...", flush=True)
        export_pretrained(out, overwrite=True)
        return out


def _describe(topic: str, payload: bytes, labels: list[str]) -> str:
    kind = topic.rsplit("/", 1)[-1]
    try:
        msg = json.loads(payload)
    except json.JSONDecodeError:
        return f"{topic}: {payload[:80]!r}"
    if kind == "status":
        model = msg.get("model") or {}
        return f"status   {msg['state']:7s} session={msg['session']} model={model.get('name')} {model.get('version')} via {(msg.get('backend') or {}).get('artifact')}"
    if kind == "pred":
        tops = ", ".join(f"{lab} {p:.2f}" for lab, (_, p) in zip(msg["labels"], msg["top"]))
        return f"pred     frame {msg['frame']}: {tops}"
    if kind == "tele":
        top = sorted(((int(k), v) for k, v in msg["class_counts"].items()), key=lambda kv: -kv[1])[:5]
        lat = {k: v.get("p50") for k, v in msg["latency_ms"].items()}
        conf = msg["histograms"]["confidence"]["counts"]
        return (
            f"tele     seq={msg['seq']} frames={msg['frames']} classes={[labels[c] for c, _ in top]}\n"
            f"         confidence histogram (20 bins 0..1): {conf}\n"
            f"         latency p50 ms: {lat}  events: {msg['events']}  ({len(payload)} bytes)"
        )
    return f"{topic}: {payload[:120]!r}"


def _monitor(port: int, received: list[str], connected: threading.Event, labels: list[str]) -> mqtt.Client:
    """An MQTT client that prints every demo message as it arrives and records it in ``received``."""
    monitor = new_client(MqttSettings(url=f"mqtt://127.0.0.1:{port}"), "demo-monitor")

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        received.append(_describe(msg.topic, bytes(msg.payload), labels))
        print(received[-1], flush=True)

    def on_connect(client: mqtt.Client, *_: object) -> None:
        client.subscribe("ef/v1/demo/#", qos=1)
        connected.set()

    monitor.on_message = on_message
    monitor.on_connect = on_connect
    return monitor


def main() -> int:
    if not find_mosquitto():
        print("mosquitto is not installed (make demo installs it with apt-get)", file=sys.stderr)
        return 1
    pkg_dir = ensure_package(BUILD / "models" / "lite0")
    labels = load_package(pkg_dir).manifest.labels
    photos_dir = BUILD / "demo" / "photos"
    shutil.rmtree(photos_dir, ignore_errors=True)
    photos_dir.mkdir(parents=True)
    photos = load_photos(PHOTOS)
    for i, (name, img) in enumerate(photos.items()):
        cv2.imwrite(str(photos_dir / f"{i:02d}-{name}.jpg"), img)
    print(f"{len(photos)} photographs from scikit-image ({', '.join(PHOTO_FILES[n] for n in photos)})")

    received: list[str] = []
    done = threading.Event()
    with MosquittoBroker(BUILD / "demo" / "broker") as broker:
        print(f"private broker at {broker.url}")
        monitor = _monitor(broker.port, received, done, labels)
        monitor.connect("127.0.0.1", broker.port)
        monitor.loop_start()
        done.wait(5)
        cmd = [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "agent",
            "run",
            "--package",
            str(pkg_dir),
            "--source",
            f"dir:{photos_dir}",
            "--broker",
            broker.url,
            "--device-id",
            "demo-cam-01",
            "--fleet",
            "demo",
            "--artifact",
            "tflite-int8",
            "--state-dir",
            str(BUILD / "demo" / "state"),
            "--publish-predictions",
            "--window-seconds",
            "60",
        ]
        print("$ edgefleet " + " ".join(cmd[3:]), flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd)
        time.sleep(0.5)
        monitor.loop_stop()
        monitor.disconnect()
    print(
        f"agent exited with {rc} after {time.time() - t0:.1f} s; the monitor received {len(received)} messages"
    )
    print(f"model package: {pkg_dir} (model.json, ONNX and TFLite fp32/int8)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
