"""A minimal third-party monitoring consumer of the EdgeFleet MQTT protocol.

It uses nothing of EdgeFleet's code: paho-mqtt to subscribe (with the read-only ``monitor`` identity of
deploy/mosquitto), the published JSON Schemas (docs/schemas/) and the generic ``jsonschema`` validator
to check every message, and prints one line per device: status, model, frames, mean confidence and the
label-free accuracy estimate of its last window, plus the messages that failed validation.

    python docs/examples/monitor.py --broker mqtts://broker.example.net:8884 --fleet shop \\
        --ca pki/ca.crt --cert pki/service/monitor.crt --key pki/service/monitor.key --seconds 60

With deploy/mosquitto, connect to the services' listener (8884) with the ``monitor`` certificate; the
broker's guard wants a client id starting with ``monitor-`` (the default here). Exit status: 0, 1 when a
message failed validation, 2 when the broker refused the connection or the subscription.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--broker", required=True, help="mqtt://host:port or mqtts://host:port")
    ap.add_argument("--fleet", required=True)
    ap.add_argument("--ca", help="CA certificate that signed the broker's (mqtts; default: system CAs)")
    ap.add_argument("--cert", help="client certificate (mqtts; deploy/mosquitto: the monitor's)")
    ap.add_argument("--key", help="its private key")
    ap.add_argument("--client-id", default=f"monitor-example-{uuid.uuid4().hex[:8]}")
    ap.add_argument("--seconds", type=float, default=30.0, help="listen this long, then print the table")
    ap.add_argument("--schemas", type=Path, default=SCHEMAS)
    args = ap.parse_args(argv)
    if (args.cert is None) != (args.key is None):
        ap.error("--cert and --key go together")

    validators = {
        p.stem: jsonschema.Draft202012Validator(json.loads(p.read_text()))
        for p in args.schemas.glob("*.json")
    }
    devices: dict[str, dict] = {}
    invalid: list[str] = []
    refused: list[str] = []

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        if len(parts) < 6 or parts[3] != "dev" or not msg.payload:
            return
        device, kind = parts[4], parts[5]
        try:
            data = json.loads(msg.payload)
        except ValueError:
            invalid.append(f"{msg.topic}: not JSON")
            return
        errors = list(validators[kind].iter_errors(data)) if kind in validators else []
        if errors:
            where = ".".join(str(p) for p in errors[0].absolute_path) or "<root>"
            invalid.append(f"{msg.topic}: {where}: {errors[0].message[:120]}")
            return
        row = devices.setdefault(device, {"state": "?", "model": "?", "windows": 0, "frames": 0})
        if kind == "status":
            row["state"] = data["state"]
        elif kind == "tele":
            row["model"] = f"{data['model']['name']} {data['model']['version']}"
            row["windows"] += 1
            row["frames"] += data["frames"]["inferred"]
            row["confidence"] = data.get("confidence_mean")
            n = data["frames"]["inferred"]
            row["atc"] = data["atc_above"] / n if n and data.get("atc_above") is not None else None

    def on_connect(c: mqtt.Client, _u: object, _f: object, rc: mqtt.ReasonCode, _p: object) -> None:
        if rc.is_failure:
            refused.append(f"connection refused: {rc}")
        else:
            c.subscribe(topic, qos=1)

    def on_subscribe(_c: mqtt.Client, _u: object, _m: int, codes: list, _p: object) -> None:
        if any(code.is_failure for code in codes):
            refused.append(f"subscription to {topic} refused")
        else:
            print(f"listening on {topic}", file=sys.stderr, flush=True)

    url, topic = urlparse(args.broker), f"ef/v1/{args.fleet}/dev/+/#"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=args.client_id)
    if url.scheme == "mqtts":
        client.tls_set(ca_certs=args.ca, certfile=args.cert, keyfile=args.key, cert_reqs=ssl.CERT_REQUIRED)
    client.on_message, client.on_connect, client.on_subscribe = on_message, on_connect, on_subscribe
    client.connect(url.hostname or "localhost", url.port or (8883 if url.scheme == "mqtts" else 1883))
    client.loop_start()
    time.sleep(args.seconds)
    client.loop_stop()
    client.disconnect()

    print(
        f"{'device':<16} {'state':<8} {'model':<24} {'windows':>7} {'frames':>7} {'conf':>6} {'ATC est.':>8}"
    )
    for device, r in sorted(devices.items()):
        conf = f"{r['confidence']:.3f}" if r.get("confidence") is not None else "-"
        atc = f"{r['atc']:.1%}" if r.get("atc") is not None else "-"
        print(
            f"{device:<16} {r['state']:<8} {r['model']:<24} {r['windows']:>7} {r['frames']:>7} {conf:>6} {atc:>8}"
        )
    for line in invalid:
        print(f"invalid: {line}")
    for line in dict.fromkeys(refused):  # paho retries a refused connection: say it once
        print(f"error: {line}", file=sys.stderr)
    return 2 if refused else 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
