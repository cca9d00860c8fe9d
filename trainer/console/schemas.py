"""The REST API's documents (pydantic): what ``/api/v1`` returns and accepts, as the OpenAPI document
at ``/api/v1/openapi.json`` describes them."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field

from trainer.store.rollups import SeriesPoint

T = TypeVar("T")

MAX_PAGE = 500
"""The largest page any list returns."""


class Paged(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class FleetSummary(BaseModel):
    fleet: str
    devices: int
    online: int
    by_state: dict[str, int] = Field(default_factory=dict)
    by_drift: dict[str, int] = Field(default_factory=dict)


class Estimate(BaseModel):
    """An accuracy estimate with its 95% interval (only when audit labels were used) and method."""

    value: float | None
    low: float | None = None
    high: float | None = None
    method: str | None = None
    labels: int = 0


class DeviceSummary(BaseModel):
    device: str
    fleet: str
    state: Literal["online", "offline"] | None
    """From the device's retained status (its newest by session and time)."""
    last_seen: float
    """The device's own time of its newest window or status (see ``views.last_seen``)."""
    status_ts: float | None
    last_window_end: float | None
    agent_version: str | None
    model_name: str | None
    model_version: str | None
    model_sha256: str | None
    artifact: str | None = None
    drift_state: str | None
    reference: str | None
    estimated_accuracy: Estimate
    frames_per_second: float | None
    confidence_mean: float | None
    health_updated_at: float | None


class UpdateEventOut(BaseModel):
    ts: float
    state: str
    reason: str | None
    release: int | None
    model_sha256: str | None


class DeviceDetail(DeviceSummary):
    backend: dict[str, Any] | None
    """The artifact choice reported in the device's newest status: artifact, timings, agreement."""
    events_24h: dict[str, int]
    """Incident counters over the last 24 hours (spool evictions, source reconnects, ...)."""
    spool_evicted_24h: int
    reconnects_24h: int
    updates: list[UpdateEventOut]
    open_alerts: int


class LabelledPoint(BaseModel):
    """True accuracy from labelled audit samples in a time bucket."""

    start: float
    end: float
    labels: int
    accuracy: float


class SeriesOut(BaseModel):
    device: str
    since: float
    until: float
    resolution: Literal["window", "hour", "day"]
    points: list[SeriesPoint]
    """The store's roll-up points as they are (:class:`trainer.store.rollups.SeriesPoint`)."""
    labelled: list[LabelledPoint]


class HistogramOut(BaseModel):
    edges: list[float]
    counts: list[int]
    reference: list[float] | None = None
    """The model's reference proportions per bin, when the model carries them."""
    band: list[tuple[float, float]] | None = None
    """Per bin, the range of proportions the reference windows showed (low, high)."""


class HistogramsOut(BaseModel):
    device: str
    model_sha256: str | None
    since: float
    until: float
    reference: str | None = None
    """Which reference the bands come from: ``training`` (the model's), or ``device:<since>``, the
    device's own after a promotion (what its drift state is judged against)."""
    histograms: dict[str, HistogramOut]


class WindowOut(BaseModel):
    session: int
    seq: int
    start: float
    end: float
    model_version: str
    artifact: str | None
    frames_inferred: int
    frames_failed: int
    confidence_mean: float | None
    atc_above: int | None


class ArtifactOut(BaseModel):
    key: str
    runtime: str
    precision: str
    top1_agreement: float | None
    heldout_accuracy: float | None


class ModelOut(BaseModel):
    sha256: str
    name: str
    version: str
    registered_at: float
    created: str | None
    artifacts: list[ArtifactOut]
    gate: dict[str, Any] | None
    reference_accuracy: float | None
    devices: int
    """Devices serving it now."""
    has_card: bool


class ReleaseOut(BaseModel):
    id: int
    fleet: str
    channel: str
    model_sha256: str
    model_version: str | None
    created_at: float
    created_by: str
    details: dict[str, Any]


class ChannelOut(BaseModel):
    fleet: str
    model: str
    channel: str
    release: int
    version: str
    package_sha256: str
    published: float
    cohort_share_bp: int | None


class RolloutCheckOut(BaseModel):
    ts: float
    decision: str
    canary_accuracy: float | None
    control_accuracy: float | None
    p_noninferior: float | None
    canary_windows: int
    control_windows: int
    reasons: list[str]


class AuditOut(BaseModel):
    id: int
    ts: float
    actor: str
    action: str
    subject: str
    details: dict[str, Any] | None


class RolloutOut(BaseModel):
    id: int
    fleet: str
    release_id: int
    channel: str | None
    model_sha256: str | None
    model_version: str | None
    cohort: str | None
    state: str
    started_at: float
    updated_at: float


class RolloutDetail(RolloutOut):
    checks: list[RolloutCheckOut]
    decisions: list[AuditOut]
    champion_sha256: str | None
    champion_version: str | None


class Decision(BaseModel):
    reason: str = Field(min_length=3, max_length=500)


class DecisionOut(BaseModel):
    rollout: int
    decision: Literal["promote", "rollback"]
    release: int
    channel: str
    actor: str


class SampleOut(BaseModel):
    id: int
    fleet: str
    device: str
    ts: float
    model_sha256: str | None
    consent_policy: str
    sha256: str
    content_type: str
    reason: str | None
    top: list[dict[str, Any]]
    """The model's top-k on the device: label index, name and probability."""
    provenance: dict[str, Any]
    labels: list[dict[str, Any]]
    flag: dict[str, Any] | None


class LabelIn(BaseModel):
    label: str = Field(min_length=1, max_length=100)


class FlagIn(BaseModel):
    flag: Literal["unusable"] = "unusable"


class LabelOut(BaseModel):
    sample: int
    label: str
    labeller: str
    stored: bool
    """False when the sample already had this label (nothing new was stored)."""


class ProgressOut(BaseModel):
    device: str
    drift_state: str | None
    samples: int
    labelled: int
    flagged: int


class AlertOut(BaseModel):
    id: int
    fleet: str | None
    device: str | None
    kind: str
    severity: str
    message: str
    details: dict[str, Any] | None
    created_at: float
    resolved_at: float | None


class WebhookDeliveryOut(BaseModel):
    """One alert's delivery to one webhook (``webhooks:`` in trainer.yaml)."""

    id: int
    webhook: str
    url: str | None = Field(
        description="scheme://host:port/… (no user, path or query: they may hold a secret); null when this "
        "console's trainer.yaml does not configure the webhook"
    )
    alert_id: int
    kind: str
    severity: str
    fleet: str | None
    device: str | None
    state: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: float | None = Field(description="when it is tried next (pending only)")
    last_error: str | None = Field(
        description="what went wrong on the last attempt (HTTP 500, the deadline...)"
    )
    created_at: float
    delivered_at: float | None


class Me(BaseModel):
    username: str
    role: str
    csrf: str | None
