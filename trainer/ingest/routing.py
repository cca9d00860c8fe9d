"""Routing and validation of inbound device messages: topic suffix -> message kind -> batch writer.

Pure logic, no I/O. A kind is registered once (:func:`register_kind`) with its topic suffix, its pydantic
model and the function that stores a batch of validated messages inside a transaction; ingest
subscribes to the kinds it is given and routes by the last topic segment. Built in: ``tele``
(TelemetryWindow), ``status`` (Status), ``sample`` (Sample: the image is checked against its sha256)
and ``update`` (UpdateEvent). Another kind plugs in with one call::

    register_kind(Kind("health", HealthReport, write_health_reports))

:func:`classify` turns one MQTT message into :class:`Accepted` or into :class:`~trainer.store.Rejected`
with a reason code: ``unknown_topic``, ``oversized``, ``not_json``, ``wrong_kind`` (a valid message of
another kind), ``invalid`` (schema), ``topic_mismatch`` (fleet/device in the payload differ from the
topic, which per-device ACLs vouch for).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import Connection

from edge_agent.protocol import MAX_MESSAGE_BYTES, TOPIC_ROOT, Status, TelemetryWindow, UpdateEvent
from edge_agent.protocol import Sample as SampleMessage
from trainer.store.ingest_writes import (
    ModelCheck,
    Received,
    Rejected,
    WriteResult,
    sample_image,
    write_samples,
    write_statuses,
    write_update_events,
    write_windows,
)

Writer = Callable[[Connection, Sequence[Received[Any]], ModelCheck, str], WriteResult]
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_ROOT = tuple(TOPIC_ROOT.split("/"))


@dataclass(frozen=True)
class Kind:
    """One routable message kind: topic suffix, pydantic model, and the batch writer that stores it."""

    name: str
    model: type[BaseModel]
    write: Writer
    check: Callable[[Any], str | None] | None = None
    """Checks the schema cannot express (e.g. an image against its sha256): the problem, or None."""


KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind) -> None:
    """Make a kind routable (replacing an earlier registration of the same name)."""
    KINDS[kind.name] = kind


def _check_sample(sample: SampleMessage) -> str | None:
    try:
        sample_image(sample)
    except ValueError as exc:
        return str(exc)
    return None


register_kind(Kind("tele", TelemetryWindow, write_windows))
register_kind(Kind("status", Status, write_statuses))
register_kind(Kind("sample", SampleMessage, write_samples, _check_sample))
register_kind(Kind("update", UpdateEvent, write_update_events))


def subscription(group: str, fleet: str, kind: str, shared: bool = True) -> str:
    """The shared-subscription filter of one kind: ``$share/{group}/ef/v1/{fleet}/dev/+/{kind}``
    (without ``$share/{group}/`` for brokers that have no shared subscriptions: one worker only)."""
    for what, value in (("group", group), ("fleet", fleet)):
        if not _ID.match(value):
            raise ValueError(f"{what} {value!r} is not a valid identifier")
    plain = f"{TOPIC_ROOT}/{fleet}/dev/+/{kind}"
    return f"$share/{group}/{plain}" if shared else plain


@dataclass(frozen=True, slots=True)
class Accepted:
    """A valid message routed to its kind."""

    kind: str
    topic: str
    item: Received[Any]


def classify(
    topic: str, payload: bytes, received_at: float, kinds: Mapping[str, Kind] = KINDS
) -> Accepted | Rejected:
    """Validate one inbound message against the kind its topic names."""

    def reject(reason: str, detail: str) -> Rejected:
        return Rejected(topic, payload, reason, detail, received_at)

    parts = topic.split("/")
    if len(parts) != 6 or tuple(parts[:2]) != _ROOT or parts[3] != "dev":
        return reject("unknown_topic", f"not a device topic {TOPIC_ROOT}/{{fleet}}/dev/{{device}}/{{kind}}")
    fleet, device, name = parts[2], parts[4], parts[5]
    kind = kinds.get(name)
    if kind is None:
        return reject("unknown_topic", f"no handler for message kind {name!r}")
    if len(payload) > MAX_MESSAGE_BYTES:
        return reject("oversized", f"payload of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        msg = kind.model.model_validate_json(payload)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors[0]["type"] == "json_invalid":
            return reject("not_json", f"not JSON: {errors[0]['msg']}")
        wrong = next((e for e in errors if e["loc"] == ("kind",)), None)
        first = wrong or errors[0]
        loc = ".".join(str(p) for p in first["loc"]) or "<root>"
        return reject(
            "wrong_kind" if wrong else "invalid", f"invalid {kind.model.__name__} at {loc}: {first['msg']}"
        )
    got_fleet, got_device = getattr(msg, "fleet", fleet), getattr(msg, "device", device)
    if got_fleet != fleet or got_device != device:
        return reject("topic_mismatch", f"payload names {got_fleet}/{got_device}, topic {fleet}/{device}")
    if not _ID.match(device) or not _ID.match(fleet):
        return reject("invalid", "fleet or device is not a valid identifier")
    if kind.check is not None and (problem := kind.check(msg)):
        return reject("invalid", f"invalid {kind.model.__name__}: {problem}")
    try:
        raw = payload.decode()
    except UnicodeDecodeError as exc:
        return reject("not_json", f"not UTF-8: {exc}")
    return Accepted(name, topic, Received(msg, raw, received_at))
