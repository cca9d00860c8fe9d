"""Wire protocol: topics, validation of inbound payloads, and documentation kept in step with the models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent import protocol as p

DOC = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()


def test_topics() -> None:
    assert p.tele_topic("shop", "cam-1") == "ef/v1/shop/dev/cam-1/tele"
    assert p.cmd_topic("shop", "cam-1", "flush") == "ef/v1/shop/dev/cam-1/cmd/flush"
    assert p.release_topic("shop", "canary") == "ef/v1/shop/release/canary"
    assert p.device_topics("shop") == "ef/v1/shop/dev/+/#"


@pytest.mark.parametrize(
    "model",
    [
        p.Status,
        p.TelemetryWindow,
        p.Prediction,
        p.Command,
        p.ModelRef,
        p.FrameCounts,
        p.Histogram,
        p.LatencySummary,
        p.BackendChoice,
    ],
)
def test_every_field_is_documented(model: type) -> None:
    for name in model.model_fields:
        assert f"`{name}`" in DOC, f"{model.__name__}.{name} is not documented in docs/protocol.md"


def test_parse_message_rejects_bad_payloads_with_the_reason() -> None:
    topic = "ef/v1/f/dev/d/cmd/flush"
    ok = p.parse_message(topic, json.dumps({"name": "flush"}).encode(), p.Command)
    assert isinstance(ok, p.Command)
    with pytest.raises(p.MessageError, match="not JSON"):
        p.parse_message(topic, b"\xff\xfe garbage", p.Command)
    with pytest.raises(p.MessageError, match="exceeds"):
        p.parse_message(topic, b"x" * (p.MAX_MESSAGE_BYTES + 1), p.Command)
    with pytest.raises(p.MessageError, match="invalid Command at name: Field required"):
        p.parse_message(topic, b"{}", p.Command)
    with pytest.raises(p.MessageError, match="at v"):
        p.parse_message(topic, json.dumps({"name": "flush", "v": 2}).encode(), p.Command)
    with pytest.raises(p.MessageError, match="at evil: Extra inputs are not permitted"):
        p.parse_message(topic, json.dumps({"name": "flush", "evil": 1}).encode(), p.Command)


def test_identifiers_reject_mqtt_wildcards() -> None:
    from pydantic import TypeAdapter, ValidationError

    ta = TypeAdapter(p.Identifier)
    assert ta.validate_python("cam-01.a_b") == "cam-01.a_b"
    for bad in ("cam/01", "cam+", "#", "", "x" * 65):
        with pytest.raises(ValidationError):
            ta.validate_python(bad)
