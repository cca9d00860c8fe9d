"""The console's pages: server-rendered HTML (Jinja2) with SVG charts drawn on the server
(:mod:`trainer.console.charts`), one small script for live refresh and keyboard labelling. Every page
reads the same views as the REST API."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from trainer.console import charts, views
from trainer.console.api import RowId, decide, time_range
from trainer.console.deps import Ctx, require, writer
from trainer.console.schemas import MAX_PAGE, HistogramOut, RolloutDetail, SeriesOut
from trainer.store import console_queries as q
from trainer.store import webhook_queue
from trainer.store.console_users import Principal

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
RANGES = {"6h": 6 * 3600.0, "24h": views.DAY, "7d": 7 * views.DAY, "30d": 30 * views.DAY}
PAGE = 50


def _fmt_time(t: float | None) -> str:
    return "—" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(t: float | None) -> str:
    if t is None:
        return "never"
    s = max(0.0, time.time() - t)
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            return f"{s / n:.0f} {unit} ago"
    return f"{s:.0f} s ago"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


templates.env.filters.update(time=_fmt_time, ago=_ago, pct=_pct)


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A page with what every page shows: who is logged in, the fleet, and whether the store and the
    broker answer."""
    ctx = request.app.state.ctx
    err = request.app.state.db_error
    base = {
        "who": context.pop("who", None),
        "fleet": ctx.fleet,
        "refresh_s": ctx.refresh_s,
        "broker_up": ctx.broker_up(),
        "db_error": err[1] if err and time.time() - err[0] < 30 else None,
        "path": request.url.path,
    }
    return templates.TemplateResponse(request, name, {**base, **context}, status_code=status_code)


def login_page(request: Request, error: str | None, status: int, next_url: str) -> HTMLResponse:
    return render(request, "login.html", status, error=error, next=next_url)


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    return render(request, "error.html", status, status=status, message=message)


def unavailable(request: Request) -> HTMLResponse:
    msg = "The database does not answer right now. This page retries by itself; nothing was changed."
    return render(request, "error.html", 503, status=503, message=msg)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/") -> HTMLResponse:  # noqa: A002 - query name
    return login_page(request, None, 200, next)


@router.get("/")
def home() -> Response:
    return RedirectResponse("/fleet", 303)


@router.get("/fleet", response_class=HTMLResponse)
def fleet_page(
    request: Request,
    ctx: Ctx,
    who: Annotated[Principal, require("viewer")],
    fleet: str | None = None,
    state: Literal["online", "offline", "unknown", ""] = "",
    drift: Literal["ok", "warning", "drift", "rebasing", "unknown", ""] = "",
    search: Annotated[str, Query(max_length=100)] = "",
    sort: Literal[tuple(q.DEVICE_SORTS)] = "device",  # type: ignore[valid-type]
    order: Literal["asc", "desc"] = "asc",
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> HTMLResponse:
    fleet = fleet or ctx.fleet
    rows = q.device_page(
        ctx.store,
        fleet=fleet,
        state=state or None,
        drift=drift or None,
        search=search or None,
        sort=sort,
        order=order,
        limit=PAGE,
        offset=(page - 1) * PAGE,
    )
    devices = [views.device_summary(d, h) for d, h in rows.items]
    counts = q.state_counts(ctx.store, fleet)
    params = {
        "fleet": fleet or "",
        "state": state,
        "drift": drift,
        "search": search,
        "sort": sort,
        "order": order,
    }
    return render(
        request,
        "fleet.html",
        who=who,
        devices=devices,
        total=rows.total,
        page=page,
        pages=max(1, -(-rows.total // PAGE)),
        counts=counts,
        params=params,
        fleets=views.fleet_summaries(ctx.store),
        shown_fleet=fleet,
    )


def _x(end: float, s: SeriesOut) -> float:
    """Where a point is drawn: at its window's or period's end, but the period still running (the
    current hour) at the range's end rather than in the future."""
    return min(end, s.until)


def _accuracy_chart(s: SeriesOut) -> str:
    est = charts.LineSeries(
        "estimated", [(_x(p.end, s), p.estimated_accuracy) for p in s.points], "estimated"
    )
    true = charts.LineSeries(
        "labelled", [(_x(p.end, s), p.accuracy) for p in s.labelled], "labelled", dashed=True
    )
    conf = charts.LineSeries(
        "mean confidence", [(_x(p.end, s), p.confidence_mean) for p in s.points], "confidence"
    )
    return charts.line_chart(
        [est, true, conf], y_range=(0.0, 1.0), y_format=charts.percent, title="Accuracy and confidence"
    )


def _ops_charts(s: SeriesOut) -> dict[str, str]:
    fps = charts.LineSeries("frames/s", [(_x(p.end, s), p.frames_per_second) for p in s.points], "fps")
    lat = charts.LineSeries(
        "inference p50 (ms)", [(_x(p.end, s), p.latency_p50_ms) for p in s.points], "latency"
    )
    failed = charts.LineSeries(
        "failed frames", [(_x(p.end, s), float(p.frames_failed)) for p in s.points], "failed"
    )
    return {
        "fps": charts.line_chart([fps, failed], height=160, title="Frames per second and failures"),
        "latency": charts.line_chart([lat], height=160, title="Inference latency (p50, ms)"),
    }


def _histogram_charts(hists: dict[str, HistogramOut]) -> dict[str, str]:
    return {
        name: charts.histogram_chart(h.counts, h.edges, reference=h.reference, band=h.band, title=name)
        for name, h in sorted(hists.items())
    }


@router.get("/devices/{device}", response_class=HTMLResponse)
def device_page(
    request: Request,
    ctx: Ctx,
    device: str,
    who: Annotated[Principal, require("viewer")],
    range: Literal["6h", "24h", "7d", "30d"] = "6h",  # noqa: A002 - the query parameter's name
) -> HTMLResponse:
    detail = views.device_detail(ctx.store, device)
    if detail is None:
        raise HTTPException(404, f"no device {device!r}")
    until = time.time()
    since = until - RANGES[range]
    s = views.device_series(ctx.store, device, since, until)
    hists = views.device_histograms(ctx.store, device, since, until, None)
    alerts = q.alert_page(ctx.store, device=device, limit=20).items
    return render(
        request,
        "device.html",
        who=who,
        d=detail,
        range=range,
        ranges=list(RANGES),
        series=s,
        accuracy_chart=_accuracy_chart(s),
        ops=_ops_charts(s),
        histograms=_histogram_charts(hists.histograms),
        hist_reference=hists.reference,
        alerts=[views.alert_out(a) for a in alerts],
    )


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, ctx: Ctx, who: Annotated[Principal, require("viewer")]) -> HTMLResponse:
    fleet = ctx.fleet
    return render(
        request,
        "models.html",
        who=who,
        models=views.models(ctx.store),
        releases=views.releases(ctx.store, fleet)[:50],
        channels=views.channels(ctx.repo(), fleet),
    )


@router.get("/models/{sha256}", response_class=HTMLResponse)
def model_page(
    request: Request, ctx: Ctx, sha256: str, who: Annotated[Principal, require("viewer")]
) -> HTMLResponse:
    m = views.model_out(ctx.store, sha256)
    if m is None:
        raise HTTPException(404, f"no model {sha256[:80]!r}")
    serving = q.device_page(ctx.store, model=sha256, limit=MAX_PAGE)
    running = [views.device_summary(d, h) for d, h in serving.items]
    return render(request, "model.html", who=who, m=m, running=running, running_total=serving.total)


def _rollout_chart(r: RolloutDetail) -> str:
    canary = charts.LineSeries("canary", [(c.ts, c.canary_accuracy) for c in r.checks], "canary")
    control = charts.LineSeries("control", [(c.ts, c.control_accuracy) for c in r.checks], "control")
    markers = [charts.Marker(r.started_at, "canary start", "start")]
    markers += [
        charts.Marker(c.ts, c.decision, f"decision {c.decision}") for c in r.checks if c.decision != "wait"
    ]
    markers += [
        charts.Marker(e.ts, e.action.removeprefix("rollout."), "decision")
        for e in r.decisions
        if e.action != "rollout.start"
    ]
    return charts.line_chart(
        [canary, control],
        y_range=(0.0, 1.0),
        y_format=charts.percent,
        markers=markers,
        title="Canary against control",
    )


@router.get("/rollouts", response_class=HTMLResponse)
def rollouts_page(request: Request, ctx: Ctx, who: Annotated[Principal, require("viewer")]) -> HTMLResponse:
    return render(request, "rollouts.html", who=who, rollouts=views.rollouts(ctx.store, ctx.fleet))


@router.get("/rollouts/{rollout_id}", response_class=HTMLResponse)
def rollout_page(
    request: Request, ctx: Ctx, rollout_id: RowId, who: Annotated[Principal, require("viewer")]
) -> HTMLResponse:
    r = views.rollout_detail(ctx.store, rollout_id)
    if r is None:
        raise HTTPException(404, f"no rollout {rollout_id}")
    history = [x for x in views.rollouts(ctx.store, r.fleet) if x.id >= rollout_id][:20]
    return render(
        request,
        "rollout.html",
        who=who,
        r=r,
        chart=_rollout_chart(r),
        history=history,
        may_decide=who.may("operator"),
    )


@router.post("/rollouts/{rollout_id}/decide", response_class=HTMLResponse)
def rollout_decide(
    request: Request,
    ctx: Ctx,
    rollout_id: RowId,
    action: Annotated[Literal["promote", "abort"], Form()],
    reason: Annotated[str, Form(min_length=3, max_length=500)],
    who: Annotated[Principal, writer("operator")],
) -> Response:
    """The promote and abort buttons (a confirmation and a reason in the form)."""
    try:
        decide(ctx, rollout_id, action, reason, who)
    except HTTPException as exc:
        if exc.status_code != 409:
            raise
        return error_page(request, 409, str(exc.detail))
    return RedirectResponse(f"/rollouts/{rollout_id}", 303)


@router.get("/labelling", response_class=HTMLResponse)
def labelling_page(
    request: Request,
    ctx: Ctx,
    who: Annotated[Principal, require("viewer")],
    device: str | None = None,
) -> HTMLResponse:
    page = q.sample_page(ctx.store, status="unlabelled", device=device or None, limit=PAGE)
    samples = views.samples(ctx.store, page.items)
    classes: list[str] = []
    if samples and samples[0].model_sha256 and (m := ctx.store.manifest(samples[0].model_sha256)):
        classes = list(m.labels)
    return render(
        request,
        "labelling.html",
        who=who,
        samples=samples,
        total=page.total,
        classes=classes,
        progress=views.labelling_progress(ctx.store, ctx.fleet),
        device=device or "",
        may_label=who.may("labeller"),
    )


@router.get("/alerts", response_class=HTMLResponse)
def alerts_page(
    request: Request,
    ctx: Ctx,
    who: Annotated[Principal, require("viewer")],
    kind: str = "",
    severity: str = "",
    device: str = "",
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> HTMLResponse:
    since, until = time_range(None, None, views.MAX_RANGE_S, default_s=views.MAX_RANGE_S)
    rows = q.alert_page(
        ctx.store,
        kind=kind or None,
        severity=severity or None,
        device=device or None,
        since=since,
        until=until,
        limit=PAGE,
        offset=(page - 1) * PAGE,
    )
    params = {"kind": kind, "severity": severity, "device": device}
    undelivered = webhook_queue.delivery_page(ctx.store, states=("failed", "pending"), limit=20)
    return render(
        request,
        "alerts.html",
        who=who,
        alerts=[views.alert_out(a) for a in rows.items],
        total=rows.total,
        page=page,
        pages=max(1, -(-rows.total // PAGE)),
        params=params,
        deliveries=[views.webhook_delivery_out(r, ctx.webhooks) for r in undelivered.items],
        deliveries_total=undelivered.total,
    )


@router.get("/audit", response_class=HTMLResponse)
def audit_page(
    request: Request,
    ctx: Ctx,
    who: Annotated[Principal, require("viewer")],
    actor: str = "",
    action: str = "",
    subject: str = "",
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> HTMLResponse:
    rows = q.audit_page(
        ctx.store,
        actor=actor or None,
        action=action or None,
        subject=subject or None,
        limit=PAGE,
        offset=(page - 1) * PAGE,
    )
    params = {"actor": actor, "action": action, "subject": subject}
    return render(
        request,
        "audit.html",
        who=who,
        entries=[views.audit_out(e) for e in rows.items],
        total=rows.total,
        page=page,
        pages=max(1, -(-rows.total // PAGE)),
        params=params,
    )
