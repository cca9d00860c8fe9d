"""The REST API under ``/api/v1``: fleets, devices, windows and histograms, models, releases, rollouts,
samples and labels, alerts, the audit log. Lists paginate, time ranges are bounded, writes are audited
with who made them (the store's audit log)."""

from __future__ import annotations

import math
import time
import uuid
from pathlib import Path as FilePath
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import FileResponse, HTMLResponse, Response

from edge_agent.config import MqttSettings
from trainer.console import views
from trainer.console.deps import ConsoleContext, Ctx, Who, require, writer
from trainer.console.schemas import (
    MAX_PAGE,
    AlertOut,
    AuditOut,
    ChannelOut,
    Decision,
    DecisionOut,
    DeviceDetail,
    DeviceSummary,
    FlagIn,
    FleetSummary,
    HistogramsOut,
    LabelIn,
    LabelOut,
    Me,
    ModelOut,
    Paged,
    ProgressOut,
    ReleaseOut,
    RolloutDetail,
    RolloutOut,
    SampleOut,
    SeriesOut,
    WebhookDeliveryOut,
    WindowOut,
)
from trainer.errors import ReleaseError, RolloutDecided

if TYPE_CHECKING:
    from trainer.release.hints import HintSender
from trainer.store import console_queries as q
from trainer.store import webhook_queue
from trainer.store.console_users import Principal

router = APIRouter(prefix="/api/v1")
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE)]
Offset = Annotated[int, Query(ge=0, le=10_000_000)]
Since = Annotated[float | None, Query(description="unix seconds; default: `until` minus one day")]
Until = Annotated[float | None, Query(description="unix seconds; default: now")]
Viewer = require("viewer")
RowId = Annotated[int, Path(ge=1, le=2**63 - 1, description="a row id")]


def time_range(
    since: float | None, until: float | None, max_s: float, default_s: float = views.DAY
) -> tuple[float, float]:
    """``[since, until)`` with defaults, 422 when reversed, not finite or longer than ``max_s``."""
    until = time.time() if until is None else until
    since = until - default_s if since is None else since
    if not (math.isfinite(since) and math.isfinite(until)):
        raise HTTPException(422, "since and until must be finite unix times")
    if until <= since:
        raise HTTPException(422, f"until ({until}) must be after since ({since})")
    if until - since > max_s:
        raise HTTPException(
            422, f"the range is {(until - since) / 86400:.1f} days; at most {max_s / 86400:.0f} days here"
        )
    return since, until


def _device_or_404(ctx: ConsoleContext, device: str) -> None:
    if ctx.store.device(device) is None:
        raise HTTPException(404, f"no device {device!r}")


@router.get("/me", response_model=Me)
def me(who: Who) -> Me:
    return Me(username=who.username, role=who.role, csrf=who.csrf)


@router.get("/fleets", response_model=list[FleetSummary], dependencies=[Viewer])
def fleets(ctx: Ctx) -> list[FleetSummary]:
    return views.fleet_summaries(ctx.store)


@router.get("/devices", response_model=Paged[DeviceSummary], dependencies=[Viewer])
def devices(
    ctx: Ctx,
    fleet: str | None = None,
    state: Literal["online", "offline", "unknown"] | None = None,
    drift: Literal["ok", "warning", "drift", "rebasing", "unknown"] | None = None,
    search: Annotated[str | None, Query(max_length=100)] = None,
    sort: Literal[tuple(q.DEVICE_SORTS)] = "device",  # type: ignore[valid-type]
    order: Literal["asc", "desc"] = "asc",
    limit: Limit = 100,
    offset: Offset = 0,
) -> Paged[DeviceSummary]:
    page = q.device_page(
        ctx.store,
        fleet=fleet,
        state=state,
        drift=drift,
        search=search,
        sort=sort,
        order=order,
        limit=limit,
        offset=offset,
    )
    items = [views.device_summary(d, h) for d, h in page.items]
    return Paged(items=items, total=page.total, limit=limit, offset=offset)


@router.get("/devices/{device}", response_model=DeviceDetail, dependencies=[Viewer])
def device(ctx: Ctx, device: str) -> DeviceDetail:
    out = views.device_detail(ctx.store, device)
    if out is None:
        raise HTTPException(404, f"no device {device!r}")
    return out


@router.get("/devices/{device}/series", response_model=SeriesOut, dependencies=[Viewer])
def series(ctx: Ctx, device: str, since: Since = None, until: Until = None) -> SeriesOut:
    """Estimated and labelled accuracy, confidence, frames/s, latency and incidents over time: raw
    windows up to 6 hours, hourly roll-ups up to 45 days, daily beyond."""
    _device_or_404(ctx, device)
    since, until = time_range(since, until, views.MAX_RANGE_S)
    return views.device_series(ctx.store, device, since, until)


@router.get("/devices/{device}/histograms", response_model=HistogramsOut, dependencies=[Viewer])
def histograms(
    ctx: Ctx,
    device: str,
    since: Since = None,
    until: Until = None,
    model: Annotated[str | None, Query(pattern="^[0-9a-f]{64}$")] = None,
) -> HistogramsOut:
    """The device's confidence and input-statistic histograms merged exactly over the range, with the
    model's reference proportions and the band a sample of this size would show under it."""
    _device_or_404(ctx, device)
    since, until = time_range(since, until, views.MAX_RANGE_S)
    return views.device_histograms(ctx.store, device, since, until, model)


@router.get("/devices/{device}/windows", response_model=Paged[WindowOut], dependencies=[Viewer])
def windows(
    ctx: Ctx, device: str, since: Since = None, until: Until = None, limit: Limit = 100, offset: Offset = 0
) -> Paged[WindowOut]:
    """Raw telemetry windows (newest first); at most 7 days per request."""
    _device_or_404(ctx, device)
    since, until = time_range(since, until, views.MAX_WINDOW_RANGE_S)
    items, total = views.device_windows(ctx.store, device, since, until, limit, offset)
    return Paged(items=items, total=total, limit=limit, offset=offset)


def _page(items: list[Any], limit: int, offset: int) -> Paged[Any]:
    """One page of a list assembled in full (short lists: models, releases, rollouts)."""
    return Paged(items=items[offset : offset + limit], total=len(items), limit=limit, offset=offset)


@router.get("/models", response_model=Paged[ModelOut], dependencies=[Viewer])
def models(ctx: Ctx, limit: Limit = 100, offset: Offset = 0) -> Paged[ModelOut]:
    """Registered models, newest first, with their gate, int8 agreement and how many devices run them."""
    return _page(views.models(ctx.store), limit, offset)


@router.get("/models/{sha256}", response_model=ModelOut, dependencies=[Viewer])
def model(ctx: Ctx, sha256: str) -> ModelOut:
    out = views.model_out(ctx.store, sha256)
    if out is None:
        raise HTTPException(404, f"no model {sha256[:80]!r}")
    return out


@router.get("/models/{sha256}/card", response_class=HTMLResponse, dependencies=[Viewer])
def model_card(ctx: Ctx, sha256: str) -> Response:
    """The model card (HTML, figures inline) the trainer wrote into the package."""
    path = views.card_path(ctx.store, sha256)
    if path is None:
        raise HTTPException(404, f"no model card for {sha256[:80]!r}")
    return FileResponse(
        path,
        media_type="text/html",
        headers={"Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'"},
    )


@router.get("/releases", response_model=Paged[ReleaseOut], dependencies=[Viewer])
def releases(ctx: Ctx, fleet: str | None = None, limit: Limit = 100, offset: Offset = 0) -> Paged[ReleaseOut]:
    """Releases recorded in the store, newest first."""
    return _page(views.releases(ctx.store, fleet), limit, offset)


@router.get("/channels", response_model=list[ChannelOut], dependencies=[Viewer])
def channels(ctx: Ctx, fleet: str | None = None) -> list[ChannelOut]:
    """What each channel of the signed repository serves now."""
    return views.channels(ctx.repo(), fleet)


@router.get("/rollouts", response_model=Paged[RolloutOut], dependencies=[Viewer])
def rollouts(ctx: Ctx, fleet: str | None = None, limit: Limit = 100, offset: Offset = 0) -> Paged[RolloutOut]:
    """Rollouts, newest first."""
    return _page(views.rollouts(ctx.store, fleet), limit, offset)


@router.get("/rollouts/{rollout_id}", response_model=RolloutDetail, dependencies=[Viewer])
def rollout(ctx: Ctx, rollout_id: RowId) -> RolloutDetail:
    out = views.rollout_detail(ctx.store, rollout_id)
    if out is None:
        raise HTTPException(404, f"no rollout {rollout_id}")
    return out


def _hint_sender(settings: MqttSettings) -> HintSender:
    """A connection of its own for the decision's hint, connected before anything is decided (503 if the
    broker does not answer) and waiting for the broker's PUBACK. Its client id is the service's plus a
    suffix: reusing the service's own id would take the service's connection over."""
    from trainer.release.hints import HintSender

    own = settings.model_copy(
        update={"client_id": f"{settings.client_id or 'trainer'}-console-{uuid.uuid4().hex[:8]}"}
    )
    try:
        return HintSender(own)
    except ReleaseError as exc:
        raise HTTPException(503, f"nothing decided: {exc}") from exc


def decide(
    ctx: ConsoleContext, rollout_id: RowId, action: Literal["promote", "abort"], reason: str, who: Principal
) -> DecisionOut:
    """Promote or abort a running canary for ``who`` (404 unknown, 409 decided already or not a canary)."""
    from trainer.fleet.rollout import decide_by_hand

    row = next((r for r in ctx.store.rollouts() if r.id == rollout_id), None)
    if row is None:
        raise HTTPException(404, f"no rollout {rollout_id}")
    repo = ctx.repo()
    models = sorted({r.model for r in repo.releases() if r.fleet == row.fleet}) if repo else []
    if repo is None or len(models) != 1:
        raise HTTPException(
            409, f"fleet {row.fleet} has {len(models)} models released; this console decides for one"
        )
    publisher = _hint_sender(ctx.mqtt) if ctx.mqtt is not None else None
    try:
        out = decide_by_hand(
            ctx.store,
            repo,
            publisher,
            fleet=row.fleet,
            model=models[0],
            action=action,
            reason=reason,
            actor=who.username,
            rollout_id=rollout_id,
        )
    except RolloutDecided as exc:
        raise HTTPException(409, str(exc)) from exc
    except ReleaseError as exc:  # decided and signed; only the broker's acknowledgement of the hint failed
        raise HTTPException(502, f"decided, but {exc}") from exc
    finally:
        if publisher is not None:
            publisher.close()
    return DecisionOut(
        rollout=rollout_id,
        decision=out.decision,
        release=out.release.release,
        channel=out.release.channel,
        actor=who.username,
    )


@router.post("/rollouts/{rollout_id}/promote", response_model=DecisionOut)
def promote(
    ctx: Ctx, rollout_id: RowId, body: Decision, who: Annotated[Principal, writer("operator")]
) -> DecisionOut:
    """Promote the canary to every device (operator)."""
    return decide(ctx, rollout_id, "promote", body.reason, who)


@router.post("/rollouts/{rollout_id}/abort", response_model=DecisionOut)
def abort(
    ctx: Ctx, rollout_id: RowId, body: Decision, who: Annotated[Principal, writer("operator")]
) -> DecisionOut:
    """Roll the canary cohort forward onto the champion (operator)."""
    return decide(ctx, rollout_id, "abort", body.reason, who)


@router.get("/samples", response_model=Paged[SampleOut], dependencies=[Viewer])
def samples(
    ctx: Ctx,
    status: Literal["unlabelled", "labelled", "flagged", "all"] = "unlabelled",
    device: str | None = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Paged[SampleOut]:
    """Privacy-filtered samples (oldest first) with the model's top-k, labels (who, when) and flags."""
    page = q.sample_page(ctx.store, status=status, device=device, limit=limit, offset=offset)
    return Paged(items=views.samples(ctx.store, page.items), total=page.total, limit=limit, offset=offset)


@router.get("/samples/{sample_id}", response_model=SampleOut, dependencies=[Viewer])
def sample(ctx: Ctx, sample_id: RowId) -> SampleOut:
    got = views.samples(ctx.store, [sample_id])
    if not got:
        raise HTTPException(404, f"no sample {sample_id}")
    return got[0]


@router.get("/samples/{sample_id}/image", dependencies=[Viewer], response_class=Response)
def sample_image(ctx: Ctx, sample_id: RowId) -> Response:
    """The sample's image bytes as the device sent them (after its privacy filter)."""
    got = q.sample_image(ctx.store, sample_id)
    if got is None:
        raise HTTPException(404, f"no sample {sample_id}")
    data, path, ctype = got
    if data is None and path:
        p = FilePath(path)
        data = p.read_bytes() if p.is_file() else None
    if data is None:
        raise HTTPException(404, f"sample {sample_id}: its image is no longer stored")
    return Response(data, media_type=ctype, headers={"Cache-Control": "private, max-age=3600"})


@router.post("/samples/{sample_id}/label", response_model=LabelOut)
def label(
    ctx: Ctx, sample_id: RowId, body: LabelIn, who: Annotated[Principal, writer("labeller")]
) -> LabelOut:
    """Label a sample with one of its model's classes (labeller); who labelled is kept."""
    got = views.samples(ctx.store, [sample_id])
    if not got:
        raise HTTPException(404, f"no sample {sample_id}")
    manifest = ctx.store.manifest(got[0].model_sha256) if got[0].model_sha256 else None
    if manifest is not None and body.label not in manifest.labels:
        raise HTTPException(422, f"{body.label!r} is not a class of model {manifest.name} {manifest.version}")
    stored = ctx.store.add_labels([(sample_id, body.label)], source="human", labeller=who.username)
    return LabelOut(sample=sample_id, label=body.label, labeller=who.username, stored=bool(stored))


@router.post("/samples/{sample_id}/flag", response_model=SampleOut)
def flag(
    ctx: Ctx, sample_id: RowId, body: FlagIn, who: Annotated[Principal, writer("labeller")]
) -> SampleOut:
    """Mark a sample unusable (labeller): it is never trained on nor used as an audit label."""
    if not q.flag_sample(ctx.store, sample_id, body.flag, actor=who.username):
        raise HTTPException(404, f"no sample {sample_id}")
    return views.samples(ctx.store, [sample_id])[0]


@router.get("/labelling/progress", response_model=list[ProgressOut], dependencies=[Viewer])
def progress(ctx: Ctx, fleet: str | None = None) -> list[ProgressOut]:
    """Samples, labels and flags per drifted device."""
    return views.labelling_progress(ctx.store, fleet)


@router.get("/alerts", response_model=Paged[AlertOut], dependencies=[Viewer])
def alerts(
    ctx: Ctx,
    fleet: str | None = None,
    kind: str | None = None,
    severity: str | None = None,
    device: str | None = None,
    since: Since = None,
    until: Until = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> Paged[AlertOut]:
    since, until = time_range(since, until, views.MAX_RANGE_S, default_s=30 * views.DAY)
    page = q.alert_page(
        ctx.store,
        fleet=fleet,
        kind=kind,
        severity=severity,
        device=device,
        since=since,
        until=until,
        limit=limit,
        offset=offset,
    )
    return Paged(items=[views.alert_out(a) for a in page.items], total=page.total, limit=limit, offset=offset)


@router.get("/webhooks/deliveries", response_model=Paged[WebhookDeliveryOut], dependencies=[Viewer])
def webhook_deliveries(
    ctx: Ctx,
    state: Literal["pending", "delivered", "failed"] | None = None,
    webhook: Annotated[str | None, Query(max_length=64)] = None,
    fleet: str | None = None,
    alert: Annotated[int | None, Query(ge=1, le=2**63 - 1, description="one alert's deliveries")] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> Paged[WebhookDeliveryOut]:
    """Alert deliveries to the webhooks, newest first: pending (with the next attempt), delivered, or
    failed (given up after ``max_attempts``), each with its attempts and last error."""
    page = webhook_queue.delivery_page(
        ctx.store,
        states=None if state is None else [state],
        webhook=webhook,
        fleet=fleet,
        alert_id=alert,
        limit=limit,
        offset=offset,
    )
    items = [views.webhook_delivery_out(r, ctx.webhooks) for r in page.items]
    return Paged(items=items, total=page.total, limit=limit, offset=offset)


@router.get("/audit", response_model=Paged[AuditOut], dependencies=[Viewer])
def audit(
    ctx: Ctx,
    actor: str | None = None,
    action: Annotated[str | None, Query(description="prefix, e.g. rollout.")] = None,
    subject: Annotated[str | None, Query(description="prefix, e.g. rollout/3")] = None,
    since: Since = None,
    until: Until = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> Paged[AuditOut]:
    since, until = time_range(since, until, views.MAX_RANGE_S, default_s=30 * views.DAY)
    page = q.audit_page(
        ctx.store,
        actor=actor,
        action=action,
        subject=subject,
        since=since,
        until=until,
        limit=limit,
        offset=offset,
    )
    return Paged(items=[views.audit_out(e) for e in page.items], total=page.total, limit=limit, offset=offset)
