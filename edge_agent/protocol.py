"""MQTT topics and message schemas: the wire contract between devices, trainer and monitors.

Every message is a pydantic model with a schema version ``v`` and a ``kind`` literal, serialised as
compact JSON. docs/protocol.md documents the topics; this module is the source of truth.
Receivers call :func:`parse_message`, which rejects oversized, non-JSON and invalid payloads with an
error that names the problem instead of raising deep inside a callback.
"""

from __future__ import annotations

import json
import operator
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    ValidationError,
    model_validator,
)

from edge_agent.errors import EdgeFleetError

SCHEMA_VERSION = 1
TOPIC_ROOT = "ef/v1"
MAX_MESSAGE_BYTES = 256 * 1024
"""Inbound payloads larger than this are rejected before JSON parsing."""

_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
Identifier = Annotated[str, Field(pattern=_ID_PATTERN)]
"""Device ids, fleet names and channels: no MQTT wildcards or separators, at most 64 characters."""

SERVICE_IDENTITIES = frozenset({"trainer", "monitor", "ingest", "broker"})
"""Certificate names of the services: the broker ACL grants these names a service's rights."""
RESERVED_DEVICE_IDS = SERVICE_IDENTITIES | {"fleet", "homeassistant", "all", "none"}
"""Names no device may take (compared case-insensitively): the services' identities, the fleet-wide
drift key ``fleet``, and names that read as something else in the console and in Home Assistant."""


def check_device_id(device: str) -> str:
    """``device`` if it may name a device; ValueError naming the clash if it is reserved."""
    if device.lower() in RESERVED_DEVICE_IDS:
        raise ValueError(
            f"{device!r} is reserved (services and fleet-wide keys use it); choose another device id"
        )
    return device


DeviceId = Annotated[str, Field(pattern=_ID_PATTERN), AfterValidator(check_device_id)]
"""A device id: an :data:`Identifier` that is not one of :data:`RESERVED_DEVICE_IDS`."""


def _topic(fleet: str, *parts: str) -> str:
    return "/".join((TOPIC_ROOT, fleet, *parts))


def status_topic(fleet: str, device: str) -> str:
    """Retained birth/last-will topic of one device."""
    return _topic(fleet, "dev", device, "status")


def tele_topic(fleet: str, device: str) -> str:
    """QoS 1 telemetry windows of one device."""
    return _topic(fleet, "dev", device, "tele")


def pred_topic(fleet: str, device: str) -> str:
    """QoS 0 per-frame predictions for local consumers (opt-in)."""
    return _topic(fleet, "dev", device, "pred")


def sample_topic(fleet: str, device: str) -> str:
    """QoS 1 opt-in privacy-filtered sample frames."""
    return _topic(fleet, "dev", device, "sample")


def update_topic(fleet: str, device: str) -> str:
    """QoS 1 update state changes of one device."""
    return _topic(fleet, "dev", device, "update")


def cmd_topic(fleet: str, device: str, name: str = "+") -> str:
    """QoS 1 commands to one device (``+`` subscribes to all of them)."""
    return _topic(fleet, "dev", device, "cmd", name)


def release_topic(fleet: str, channel: str) -> str:
    """Retained release hint of a channel (canary, stable)."""
    return _topic(fleet, "release", channel)


def alert_topic(fleet: str) -> str:
    """Drift and health alerts for monitoring services."""
    return _topic(fleet, "alert")


def ha_state_topic(fleet: str, device: str) -> str:
    """Retained Home Assistant state of one device, published by the trainer (opt-in discovery)."""
    return _topic(fleet, "ha", device)


def device_topics(fleet: str, device: str = "+") -> str:
    """Wildcard over every per-device topic of a fleet (or of one device)."""
    return _topic(fleet, "dev", device, "#")


class _Strict(BaseModel):
    """Every wire model: unknown fields and non-finite numbers (NaN, Infinity, 1e400) are refused, so
    neither side stores or sends a number JSON cannot carry and statistics cannot add up."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Message(_Strict):
    v: Literal[1] = 1

    def to_bytes(self) -> bytes:
        """Compact JSON encoding used on the wire."""
        return self.model_dump_json(exclude_none=True).encode()


class ModelRef(_Strict):
    """Which model a device runs: enough to find its package and reference statistics."""

    name: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    artifact: str | None = None


class Histogram(_Strict):
    """Fixed-edge histogram; ``counts[i]`` counts values in ``[edges[i], edges[i+1])``.

    The first and last bins are open-ended (values outside the edges are clipped into them), so no
    sample is ever lost and two histograms with equal edges merge exactly by adding counts.
    """

    edges: list[float] = Field(min_length=2, max_length=1025)
    counts: list[NonNegativeInt]

    @model_validator(mode="after")
    def _one_count_per_bin(self) -> Histogram:
        edges = self.edges
        if len(self.counts) != len(edges) - 1:
            raise ValueError(f"{len(self.counts)} counts for {len(edges)} edges (needs one per bin)")
        if not all(map(operator.lt, edges, edges[1:])):  # a C loop: ingest validates ~10 per window
            raise ValueError("edges must increase strictly")
        return self


class LatencySummary(_Strict):
    """Latency of one pipeline stage over a window, in milliseconds."""

    count: NonNegativeInt = 0
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None
    hist: Histogram | None = None


class FrameCounts(_Strict):
    """What happened to frames during a window. Every window of an agent satisfies
    ``captured + carried_in == inferred + dropped + failed + carried_out`` (docs/protocol.md), and so
    does any sum of windows."""

    captured: NonNegativeInt = 0
    """Frames the source read, corrupt ones included."""
    inferred: NonNegativeInt = 0
    dropped: NonNegativeInt = 0
    failed: NonNegativeInt = 0
    carried_in: NonNegativeInt = 0
    """Frames captured before the window opened and not yet inferred, dropped or failed then (the
    previous window's ``carried_out``)."""
    carried_out: NonNegativeInt = 0
    """Frames captured but not yet inferred, dropped or failed when the window closed (queued or being
    inferred): the next window settles them. 0 in the last window of a clean stop."""


class TelemetryWindow(_Message):
    """One telemetry window (topic ``tele``). Deduplicated on (device, session, seq)."""

    kind: Literal["tele"] = "tele"
    fleet: str
    device: DeviceId
    session: int = Field(ge=0)
    seq: int = Field(ge=0)
    start: float
    end: float
    model: ModelRef
    agent_version: str
    frames: FrameCounts
    class_counts: dict[NonNegativeInt, NonNegativeInt] = Field(default_factory=dict)
    histograms: dict[str, Histogram] = Field(default_factory=dict)
    latency_ms: dict[str, LatencySummary] = Field(default_factory=dict)
    stats_every: int = Field(default=1, ge=1)
    """Input statistics were computed on every k-th inferred frame (on the model-input-sized frame)."""
    events: dict[str, NonNegativeInt] = Field(default_factory=dict)
    """Counted incidents since the previous window: source_reconnects, spool_evicted, bad_inbound, ..."""
    confidence_mean: float | None = None
    """Exact mean max-softmax confidence of the inferred frames (the average-confidence estimate)."""
    atc_above: NonNegativeInt | None = None
    """Inferred frames whose confidence exceeds the model's ATC threshold (reference.atc_threshold);
    atc_above / frames.inferred is the label-free accuracy estimate (Garg et al., ICLR 2022)."""


class BackendChoice(_Strict):
    """Which artifact the agent runs and why (reported in the status birth)."""

    artifact: str
    runtime: str
    forced: bool = False
    timings_ms: dict[str, float] = Field(default_factory=dict)
    """Median ms per frame of each eligible artifact, timed interleaved on this device."""
    agreement: dict[str, float] = Field(default_factory=dict)
    """Top-1 agreement of each artifact with the package's fp32 references, measured on this device."""
    excluded: dict[str, str] = Field(default_factory=dict)
    """Artifacts that may not serve here, and why (below the agreement floor, or cannot run)."""


class Status(_Message):
    """Retained device status: the birth message on connect and the last will ``offline``.

    A device's statuses are ordered by :func:`status_order`, not by ``ts`` alone: the last will is
    composed when its connection is opened, before the birth it follows."""

    kind: Literal["status"] = "status"
    fleet: str
    device: DeviceId
    state: Literal["online", "offline"]
    session: int = Field(ge=0)
    ts: float
    connection: int | None = Field(default=None, ge=1)
    """Connection attempt within the session (1, 2, ...): the birth and the last will registered for one
    connection, and the clean-shutdown ``offline`` sent on it, carry the same number. Absent from agents
    older than this field; receivers then order by ``ts``."""
    agent_version: str | None = None
    model: ModelRef | None = None
    backend: BackendChoice | None = None


def status_order(status: Status) -> tuple[int, int, int, float]:
    """The key that orders one device's statuses as they happened (the largest is its current state):
    session, then connection, then ``offline`` after ``online`` of the same connection, then ``ts``.

    A last will is composed when its connection opens, so its ``ts`` predates the birth it follows; a
    reconnect keeps the session, so ``offline`` cannot simply win within a session. Statuses without
    ``connection`` (older agents) fall back to ``ts`` within their session."""
    connection = status.connection or 0  # connections count from 1
    offline_last = 1 if connection and status.state == "offline" else 0
    return (status.session, connection, offline_last, status.ts)


class Prediction(_Message):
    """One frame's result (topic ``pred``, QoS 0, opt-in)."""

    kind: Literal["pred"] = "pred"
    device: DeviceId
    session: int
    frame: int
    ts: float
    top: list[tuple[int, float]]
    """Top-k (class index, probability), best first."""
    labels: list[str] = Field(default_factory=list)
    model_version: str


class Sample(_Message):
    """An opt-in, privacy-filtered frame for labelling (topic ``sample``, QoS 1)."""

    kind: Literal["sample"] = "sample"
    fleet: str
    device: DeviceId
    session: int = Field(ge=0)
    frame: int
    ts: float
    model: ModelRef
    reason: Literal["low_confidence", "drift", "audit"]
    """``audit`` frames are a uniform random sample of the window (the only ones that may feed the
    trainer's prediction-powered accuracy estimate); the others are chosen for being informative."""
    inclusion: float | None = Field(default=None, gt=0.0, le=1.0)
    """Audit frames: the probability that a frame of this window was sent as an audit frame (its weight
    in the accuracy estimate is 1 / inclusion)."""
    top: list[tuple[int, float]]
    consent: str = Field(min_length=1)
    """Consent or licence policy of the device under which the image was sent (provenance)."""
    faces_blurred: int = Field(ge=0)
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    jpeg_b64: str
    """The JPEG (downscaled, faces pixelated, no metadata), base64-encoded."""


class Alert(_Message):
    """A drift or health alert from the trainer for monitoring services (topic ``alert``, QoS 1)."""

    kind: Literal["alert"] = "alert"
    fleet: str
    alert: str
    """drift, drift_cleared, retrain_started, retrain_failed, gate_failed, canary_started,
    rollout_promoted, rollout_rolled_back, ..."""
    severity: Literal["info", "warning", "critical"] = "warning"
    message: str
    device: str | None = None
    model: ModelRef | None = None
    ts: float
    details: dict[str, str | int | float | bool | None | list[str]] = Field(default_factory=dict)


class Command(_Message):
    """A command to one device (topic ``cmd/{name}``); the name is also in the topic."""

    kind: Literal["cmd"] = "cmd"
    name: str
    args: dict[str, str | int | float | bool] = Field(default_factory=dict)
    id: str | None = None


_SHA256 = r"^[0-9a-f]{64}$"
_TARGET_PATH = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}(/[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}){1,4}$"


class ReleaseHint(_Message):
    """Retained hint on ``release/{channel}``: a new release exists. Only a hint: devices act on nothing
    in it but the target path, and trust only verified TUF metadata (see docs/updates.md)."""

    kind: Literal["release"] = "release"
    fleet: Identifier
    channel: Identifier
    model: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=32)
    release: int = Field(ge=1)
    """The release counter (repository-wide, strictly increasing)."""
    target: str = Field(pattern=_TARGET_PATH)
    """TUF target path, e.g. ``canary/shop/colour.tar``."""
    sha256: str = Field(pattern=_SHA256)
    """sha256 of the target file (the package archive)."""
    length: int = Field(ge=1)
    package_sha256: str = Field(pattern=_SHA256)
    repository: str | None = Field(default=None, max_length=512)
    """Where the trainer serves metadata and targets (informational: devices use their configured URL)."""
    action: Literal["release", "promote", "rollback"] = "release"
    ts: float


UpdateState = Literal[
    "booted", "downloading", "staged", "verified", "trial", "active", "rolled_back", "rejected"
]


class UpdateEvent(_Message):
    """One state change of a device's updater (topic ``update``, QoS 1 through the spool)."""

    kind: Literal["update"] = "update"
    fleet: str
    device: DeviceId
    session: int = Field(ge=0)
    seq: int = Field(ge=0)
    """Counts update events within a session; dedupe on (device, session, seq)."""
    ts: float
    state: UpdateState
    reason: str | None = None
    """Why: a code for ``rejected`` and ``rolled_back`` (e.g. ``artifact_mismatch``), else context."""
    detail: str | None = Field(default=None, max_length=2000)
    target: str | None = None
    release: int | None = None
    version: str | None = None
    model: ModelRef | None = None
    """The release's package (candidate or newly active)."""
    serving: ModelRef | None = None
    """What the device serves after this change."""
    slot: str | None = None
    """``factory``, ``a`` or ``b``: where the package lives on the device."""
    max_release: int = Field(default=0, ge=0)
    """Highest release counter ever swapped in on this device (releases at or below it are refused)."""
    selftest_ms: float | None = None
    windows: int | None = None
    """Health windows evaluated so far (``trial``, ``active``, ``rolled_back``)."""


class HomeAssistantModel(_Strict):
    """The model versions of a device for Home Assistant's ``update`` entity."""

    installed_version: str | None
    latest_version: str | None
    """The champion's version (the installed one when there is no champion)."""


class HomeAssistantState(_Strict):
    """A device's state for Home Assistant (topic ``ha/{device}``, retained; opt-in discovery).

    No ``v`` or ``kind``: the entities' value templates read these keys. Every key is always present
    (``null`` when unknown) so a template can test ``is not none``; an empty retained payload means the
    device was removed."""

    estimated_accuracy: float | None
    """The trainer's label-free accuracy estimate of the device (a fraction, 0..1)."""
    frames_per_second: float | None = Field(ge=0.0)
    """Inferred frames per second over the recent windows, rounded to 0.01."""
    confidence_mean: float | None
    """Mean max-softmax confidence of the recent windows (a fraction, 0..1)."""
    drift: Literal["ON", "OFF"]
    """``ON`` while the device drifts (Home Assistant's binary sensor payloads)."""
    model: HomeAssistantModel

    def to_bytes(self) -> bytes:
        """Compact JSON with every key, ``null`` included (the templates need them)."""
        return self.model_dump_json().encode()


class HomeAssistantDiscovery(BaseModel):
    """A retained Home Assistant MQTT discovery config of one entity (topic
    ``{prefix}/{component}/{node_id}/{object_id}/config``; an empty payload deletes the entity).

    Home Assistant's MQTT discovery schema governs the payload (per platform:
    https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery); this model names the keys every
    EdgeFleet config carries and allows the platform's other documented keys."""

    model_config = ConfigDict(extra="allow")

    name: str | None
    unique_id: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    object_id: str
    state_topic: str = Field(pattern=r"^[^#+]+$")
    value_template: str
    device: dict[str, object]
    """Home Assistant's device block: ``identifiers``, ``name``, ``manufacturer``, ``model``, ..."""
    origin: dict[str, object]


class MessageError(EdgeFleetError, ValueError):
    """An inbound MQTT payload is oversized, not JSON, or not a valid message of the expected kind."""


def parse_message(topic: str, payload: bytes, model: type[_Message]) -> _Message:
    """Validate an inbound payload as ``model``; raise :class:`MessageError` naming topic and problem."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise MessageError(f"{topic}: payload of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"{topic}: not JSON ({exc})") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise MessageError(f"{topic}: invalid {model.__name__} at {loc}: {first['msg']}") from None
