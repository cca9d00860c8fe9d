"""The published MQTT contract: docs/asyncapi.json and docs/schemas/*.json are what the code generates,
the AsyncAPI document is valid AsyncAPI 3.0, and real messages validate against the JSON Schemas with a
generic validator (``jsonschema``, not pydantic): what third parties build on is what the code sends.

``tests/data/asyncapi-3.0.0.schema.json`` is the official AsyncAPI 3.0.0 JSON Schema from the npm
package @asyncapi/specs 6.8.0 (Apache-2.0), vendored so the check needs no network.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from edge_agent.asyncapi import CHANNELS, asyncapi_document, dumps, message_schemas

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_the_committed_contract_is_what_the_code_generates() -> None:
    assert (DOCS / "asyncapi.json").read_text() == dumps(asyncapi_document()), (
        "docs/asyncapi.json is stale: edgefleet protocol asyncapi --out docs/asyncapi.json"
    )
    for kind, schema in message_schemas().items():
        assert (DOCS / "schemas" / f"{kind}.json").read_text() == dumps(schema), (
            f"docs/schemas/{kind}.json is stale: edgefleet protocol schemas --out docs/schemas"
        )
    assert sorted(p.stem for p in (DOCS / "schemas").glob("*.json")) == sorted(c.name for c in CHANNELS)
    assert "asyncapi.json" in (DOCS / "protocol.md").read_text()


def test_the_asyncapi_document_is_valid_asyncapi_3() -> None:
    official = json.loads((ROOT / "tests" / "data" / "asyncapi-3.0.0.schema.json").read_text())
    errors = list(jsonschema.Draft7Validator(official).iter_errors(asyncapi_document()))
    assert not errors, [f"{list(e.absolute_path)}: {e.message[:200]}" for e in errors[:5]]


def test_the_schemas_refuse_what_the_receivers_refuse() -> None:
    """A generic validator reading only the schema refuses a wrong kind, an unknown field and a bad id."""
    tele = jsonschema.Draft202012Validator(message_schemas()["tele"])
    from trainer.sim.windows import tiny_window

    good = json.loads(tiny_window("cam-1", 0, fleet="f").to_bytes())
    assert not list(tele.iter_errors(good))
    for bad in (
        {**good, "kind": "status"},
        {**good, "extra": 1},
        {**good, "device": "cam/1"},
        {**good, "seq": -1},
    ):
        assert list(tele.iter_errors(bad)), bad


def test_the_home_assistant_state_schema_refuses_what_its_templates_cannot_read() -> None:
    """The bridge's state document validates; one without a key the value templates read (they test
    ``is not none``, so ``null`` is fine and absence is not), or with another drift payload, does not."""
    from trainer.fleet.homeassistant import device_state

    ha = jsonschema.Draft202012Validator(message_schemas()["ha"])
    state = device_state(
        estimated_accuracy=None, frames_per_second=2.345, confidence_mean=0.8, drift=True,
        installed="1.0.0", latest=None,
    )  # fmt: skip
    good = json.loads(state.to_bytes())
    assert good["estimated_accuracy"] is None and good["frames_per_second"] == 2.35
    assert not list(ha.iter_errors(good))
    without = {k: v for k, v in good.items() if k != "estimated_accuracy"}
    for bad in (without, {**good, "drift": "on"}, {**good, "model": {}}, {**good, "extra": 1}):
        assert list(ha.iter_errors(bad)), bad


def channel_of(topic: str) -> str:
    """The name of the first channel whose address (its parameters as one level each) matches ``topic``."""
    for c in CHANNELS:
        if re.fullmatch(re.sub(r"\\\{[a-z_]+\\\}", "[^/+#]+", re.escape(c.address)), topic):
            return c.name
    pytest.fail(f"{topic}: no channel of docs/asyncapi.json has this address")


def validate_captured(path: Path) -> dict[str, int]:
    """Validate every message of a ``messages.jsonl`` capture against the schema of its topic's channel;
    returns the count per channel. An empty payload (a retained topic cleared) is no message and is
    skipped. Used on the end-to-end demo's capture (tests/test_fleet_loop.py) and on what the Home
    Assistant bridge publishes (tests/test_homeassistant.py)."""
    validators = {k: jsonschema.Draft202012Validator(s) for k, s in message_schemas().items()}
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if not row["payload"]:
            continue
        kind = channel_of(row["topic"])
        errors = [
            f"{list(e.absolute_path)}: {e.message[:200]}"
            for e in validators[kind].iter_errors(json.loads(row["payload"]))
        ]
        if errors:
            pytest.fail(f"{row['topic']}: {errors[:3]}")
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _start_monitor(*args: str) -> subprocess.Popen[str]:
    """docs/examples/monitor.py run as a user would, listening 5 s; returns once it has subscribed."""
    proc = subprocess.Popen(
        [sys.executable, str(DOCS / "examples" / "monitor.py"), "--seconds", "5", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    line = proc.stderr.readline()  # the first line: subscribed, or the end of a failed run
    if not line.startswith("listening on"):
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"monitor.py did not subscribe (exit {proc.returncode}): {line}{err}{out}")
    return proc


def _traffic(fleet: str, good: str, bad: str) -> tuple[list[tuple[str, bytes]], int]:
    """A device's birth and three windows, then an invalid window of another device; and the frames the
    good device inferred."""
    from edge_agent.protocol import Status, status_topic, tele_topic
    from trainer.sim.windows import windows

    ws = windows(good, 3, fleet=fleet)
    status = Status(fleet=fleet, device=good, state="online", session=1, ts=1.0)
    msgs = [(status_topic(fleet, good), status.to_bytes())]
    msgs += [(tele_topic(fleet, good), w.to_bytes()) for w in ws]
    invalid = json.loads(windows(bad, 1, fleet=fleet)[0].to_bytes()) | {"seq": -1}
    msgs += [(tele_topic(fleet, bad), json.dumps(invalid).encode())]
    return msgs, sum(w.frames.inferred for w in ws)


def _check_table(proc: subprocess.Popen[str], fleet: str, good: str, bad: str, frames: int) -> None:
    """The monitor exits 1 (one invalid message), tabulates the good device and names the bad message."""
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err  # one message failed validation
    row = next(line for line in out.splitlines() if line.startswith(good))
    assert row.split()[1] == "online" and row.split()[4:6] == ["3", str(frames)]
    assert f"invalid: ef/v1/{fleet}/dev/{bad}/tele" in out and f"{bad} " not in out.split("invalid:")[0]


def test_the_example_consumer_validates_and_tabulates_what_it_receives(broker) -> None:  # noqa: ANN001
    """docs/examples/monitor.py, run as a user would, on a private broker."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    fleet = "example"
    proc = _start_monitor("--broker", broker.url, "--fleet", fleet)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    msgs, frames = _traffic(fleet, "cam-7", "cam-8")
    for topic, payload in msgs:
        pub.publish(topic, payload, qos=1).wait_for_publish(5)
    pub.loop_stop()
    pub.disconnect()
    _check_table(proc, fleet, "cam-7", "cam-8", frames)


def test_the_example_consumer_runs_as_the_monitor_on_the_deployed_broker(
    tmp_path: Path, mosquitto_binary: str, pki: Path
) -> None:
    """deploy/mosquitto as shipped (mutual TLS, ACL, guard): monitor.py with the monitor certificate on
    the services' listener receives, validates and tabulates what devices publish with their own
    certificates; with a client id the guard refuses for that certificate it says so and exits 2."""
    from trainer.ops import pki as pki_mod

    from .update_helpers import DeployedBroker, TlsClient

    certs = tmp_path / "certs"  # the session's PKI stays as the other tests know it
    pki_mod.issue(pki, "monitor", kind="service", out_dir=certs)
    deployed = DeployedBroker(tmp_path / "broker", pki, mosquitto_binary).start()
    fleet, tls = "monitored", ["--ca", str(pki / "ca.crt")]
    tls += ["--cert", str(certs / "monitor.crt"), "--key", str(certs / "monitor.key")]
    url = f"mqtts://127.0.0.1:{deployed.service_port}"
    devices: list[TlsClient] = []
    try:
        proc = _start_monitor("--broker", url, "--fleet", fleet, *tls)
        devices = [TlsClient(deployed.port, pki, d, client_id=d) for d in ("dev-a", "dev-b")]
        msgs, frames = _traffic(fleet, "dev-a", "dev-b")
        for topic, payload in msgs:
            devices[0 if "/dev-a/" in topic else 1].publish(topic, payload)
        _check_table(proc, fleet, "dev-a", "dev-b", frames)

        cmd = [sys.executable, str(DOCS / "examples" / "monitor.py"), "--broker", url, "--fleet", fleet]
        cmd += [*tls, "--seconds", "2", "--client-id", "dashboard"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "error: connection refused: Not authorized" in r.stderr, r.stderr
    finally:
        for d in devices:
            d.close()
        deployed.stop()
