"""A minimal third-party monitoring consumer of the EdgeFleet MQTT protocol.

It uses nothing of EdgeFleet's code: paho-mqtt to subscribe (with the read-only ``monitor`` identity of
deploy/mosquitto), the published JSON Schemas (docs/schemas/) and the generic ``jsonschema`` validator
to check every message, and prints one line per device: status, model, frames, mean confidence and the
label-free accuracy estimate of its last window, plus the messages that failed validation.

    python docs/examples/monitor.py --broker mqtts://broker.example.net:8884 --fleet shop \\
        --ca pki/ca.crt --cert pki/service/monitor.crt --key pki/service/monitor.key --seconds 60
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import time
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
    ap.add_argument("--ca")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--seconds", type=float, default=30.0, help="listen this long, then print the table")
    ap.add_argument("--schemas", type=Path, default=SCHEMAS)
    args = ap.parse_args(argv)

    validators = {
        p.stem: jsonschema.Draft202012Validator(json.loads(p.read_text()))
        for p in args.schemas.glob("*.json")
    }
    devices: dict[str, dict] = {}
    invalid: list[str] = []

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

    url = urlparse(args.broker)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"monitor-example-{int(time.time())}")
    if url.scheme == "mqtts":
        client.tls_set(ca_certs=args.ca, certfile=args.cert, keyfile=args.key, cert_reqs=ssl.CERT_REQUIRED)
    client.on_message = on_message
    client.on_connect = lambda c, *_: c.subscribe(f"ef/v1/{args.fleet}/dev/+/#", qos=1)
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
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
