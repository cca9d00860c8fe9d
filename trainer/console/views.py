"""The console's read side: each API document assembled from the store (and the release repository).

Pure assembly over store queries; no HTTP here, so the pages and the REST API show the same numbers.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_agent.protocol import Status
from edge_agent.reference import ReferenceStats
from trainer.console.schemas import (
    AlertOut,
    ArtifactOut,
    AuditOut,
    ChannelOut,
    DeviceDetail,
    DeviceSummary,
    Estimate,
    FleetSummary,
    HistogramOut,
    HistogramsOut,
    LabelledPoint,
    ModelOut,
    ProgressOut,
    ReleaseOut,
    RolloutCheckOut,
    RolloutDetail,
    RolloutOut,
    SampleOut,
    SeriesOut,
    UpdateEventOut,
    WebhookDeliveryOut,
    WindowOut,
)
from trainer.drift.detector import TRAINING_REFERENCE
from trainer.drift.rebase import device_label
from trainer.fleet.labelling import audit_labels
from trainer.release.repository import ReleaseRepository
from trainer.store import Device, Store
from trainer.store import console_queries as q
from trainer.store.rollups import SeriesPoint, read_histograms, read_series
from trainer.store.schema import Alert, AuditEntry, DeviceHealthRecord
from trainer.store.webhook_queue import DeliveryRow

DAY = 86400.0
MAX_RANGE_S = 400 * DAY
"""The longest time range any request may ask for (roll-ups make it cheap; raw windows are bounded
separately by ``MAX_WINDOW_RANGE_S``)."""
MAX_WINDOW_RANGE_S = 7 * DAY


def _loads(text: str | None) -> dict[str, Any]:
    return json.loads(text) if text else {}


def last_seen(d: Device) -> float:
    """When the device last said something, by its own clock: its newest window's end or status time.
    Not the receive time, which a retained status replayed by the broker (a restarted trainer) moves
    to now for a device that has been offline for days."""
    own = max(d.last_window_end or 0.0, d.status_ts or 0.0)
    return own if own > 0 else d.last_seen


def device_summary(d: Device, h: DeviceHealthRecord | None) -> DeviceSummary:
    """A device row of the fleet page."""
    return DeviceSummary(
        device=d.device,
        fleet=d.fleet,
        state=d.state if d.state in ("online", "offline") else None,  # type: ignore[arg-type]
        last_seen=last_seen(d),
        status_ts=d.status_ts,
        last_window_end=d.last_window_end,
        agent_version=d.agent_version,
        model_name=d.model_name,
        model_version=d.model_version,
        model_sha256=d.model_sha256,
        drift_state=h.drift_state if h else None,
        reference=h.reference if h else None,
        estimated_accuracy=Estimate(
            value=h.estimated_accuracy if h else None,
            low=h.low if h else None,
            high=h.high if h else None,
            method=h.method if h else None,
            labels=h.labels if h else 0,
        ),
        frames_per_second=h.frames_per_second if h else None,
        confidence_mean=h.confidence_mean if h else None,
        health_updated_at=h.updated_at if h else None,
        artifact=h.artifact if h else None,
    )


def fleet_summaries(store: Store) -> list[FleetSummary]:
    out = []
    for fleet, n, online in q.fleets(store):
        counts = q.state_counts(store, fleet)
        out.append(
            FleetSummary(
                fleet=fleet, devices=n, online=online, by_state=counts["state"], by_drift=counts["drift"]
            )
        )
    return out


def device_detail(store: Store, device: str, now: float | None = None) -> DeviceDetail | None:
    """Everything the device page shows above its charts."""
    d = store.device(device)
    if d is None:
        return None
    now = time.time() if now is None else now
    base = device_summary(d, q.device_health(store, device))
    statuses = store.latest_status(d.fleet)
    status: Status | None = statuses.get(device)
    series = read_series(store, device, now - DAY, now)
    events: dict[str, int] = {}
    for p in series.points:
        for k, v in (p.events or {}).items():
            events[k] = events.get(k, 0) + int(v)
    # the newest assessed window says what runs now; the retained status is from the last connect,
    # which an update (no reconnect) does not renew
    artifact = base.artifact or (status.model.artifact if status and status.model else None)
    updates = [
        UpdateEventOut(
            ts=e.ts,
            state=e.state,
            reason=e.reason,
            release=e.release,
            model_sha256=e.model.sha256 if e.model else None,
        )
        for e in store.update_events(device=device)[-50:]
    ]
    open_alerts = q.alert_page(store, device=device, limit=1).total
    return DeviceDetail(
        **base.model_dump(exclude={"artifact"}),
        artifact=artifact,
        backend=status.backend.model_dump() if status and status.backend else None,
        events_24h=events,
        spool_evicted_24h=events.get("spool_evicted", 0),
        reconnects_24h=sum(v for k, v in events.items() if k.endswith("reconnects")),
        updates=updates,
        open_alerts=open_alerts,
    )


def _labelled_points(store: Store, device: str, points: Sequence[SeriesPoint]) -> list[LabelledPoint]:
    """True accuracy per chart bucket from the device's labelled audit samples (a uniform draw)."""
    if not points:
        return []
    out = []
    for sha in {p.model_sha256 for p in points}:
        manifest = store.manifest(sha)
        if manifest is None:
            continue
        got = audit_labels(
            store,
            model_sha256=sha,
            labels=manifest.labels,
            reference=manifest.reference,
            since=points[0].start,
            until=points[-1].end,
            device=device,
        ).get(device, [])
        for p in (p for p in points if p.model_sha256 == sha):
            mine = [a for a in got if p.start <= a.ts < p.end]
            if mine:
                w = sum(a.weight for a in mine)
                acc = sum(a.weight * a.correct for a in mine) / w if w else 0.0
                out.append(LabelledPoint(start=p.start, end=p.end, labels=len(mine), accuracy=acc))
    return sorted(out, key=lambda p: p.start)


def device_series(store: Store, device: str, since: float, until: float) -> SeriesOut:
    s = read_series(store, device, since, until)
    points = list(s.points)
    return SeriesOut(
        device=device,
        since=since,
        until=until,
        resolution=s.resolution,
        points=points,
        labelled=_labelled_points(store, device, points),
    )


def _band(
    reference: list[int] | None, n: int, z: float = 1.96
) -> tuple[list[float] | None, list[tuple[float, float]] | None]:
    """Reference proportions per bin and the range an observed share of ``n`` values would fall in if
    they came from the same distribution as the reference's own sample (95%, normal approximation of
    the difference of two proportions, so a reference made from few frames has a wider band)."""
    total = sum(reference) if reference else 0
    if not reference or n <= 0 or total <= 0:
        return None, None
    p = [c / total for c in reference]
    half = [z * math.sqrt(x * (1 - x) * (1 / n + 1 / total)) for x in p]
    return p, [(max(0.0, x - h), min(1.0, x + h)) for x, h in zip(p, half, strict=True)]


def _reference_of(store: Store, device: str, sha: str) -> tuple[ReferenceStats | None, str | None]:
    """The reference the device is judged against on model ``sha``: its own (rebased after a promotion,
    ``device:<since>``) when it has one, else the model's training reference."""
    d = store.device(device)
    if d is not None:
        own = [(r, st) for r, st in store.device_references(d.fleet, model_sha256=sha) if r.device == device]
        if own:
            rec, stats = own[-1]
            return stats, device_label(rec.since)
    manifest = store.manifest(sha)
    ref = manifest.reference if manifest else None
    return ref, TRAINING_REFERENCE if ref is not None else None


def device_histograms(
    store: Store, device: str, since: float, until: float, model_sha256: str | None
) -> HistogramsOut:
    """The device's histograms over the range on one model (default: the one it runs now) against the
    band of the reference it is judged by."""
    sha = model_sha256
    if sha is None:
        d = store.device(device)
        sha = d.model_sha256 if d else None
    if sha is None:
        return HistogramsOut(device=device, model_sha256=None, since=since, until=until, histograms={})
    hists = read_histograms(store, device, since, until, sha)
    ref, label = _reference_of(store, device, sha)
    out = {}
    for name, h in hists.items():
        r = ref.histograms.get(name) if ref else None
        same = r is not None and list(r.edges) == list(h.edges)
        p, band = _band(list(r.counts) if same and r else None, sum(h.counts))
        out[name] = HistogramOut(edges=list(h.edges), counts=list(h.counts), reference=p, band=band)
    return HistogramsOut(
        device=device, model_sha256=sha, since=since, until=until, reference=label, histograms=out
    )


def device_windows(
    store: Store, device: str, since: float, until: float, limit: int, offset: int
) -> tuple[list[WindowOut], int]:
    """Raw windows of a device (newest first), read from columns, not payloads."""
    page = q.window_page(store, device=device, since=since, until=until, limit=limit, offset=offset)
    return [WindowOut.model_validate(w, from_attributes=True) for w in page.items], page.total


def model_out(store: Store, sha: str, serving: dict[str, int] | None = None) -> ModelOut | None:
    rec = store.model(sha)
    if rec is None:
        return None
    m = store.manifest(sha)
    assert m is not None
    ev = m.evaluation
    heldout = ev.heldout_accuracy if ev else {}
    artifacts = [
        ArtifactOut(
            key=k,
            runtime=a.runtime,
            precision=a.precision,
            top1_agreement=a.top1_agreement,
            heldout_accuracy=heldout.get(k),
        )
        for k, a in m.artifacts.items()
    ]
    serving = q.serving_counts(store) if serving is None else serving
    return ModelOut(
        sha256=sha,
        name=rec.name,
        version=rec.version,
        registered_at=rec.registered_at,
        created=m.created,
        artifacts=artifacts,
        gate=ev.gate.model_dump() if ev else None,
        reference_accuracy=m.reference.accuracy if m.reference else None,
        devices=serving.get(sha, 0),
        has_card=card_path(store, sha) is not None,
    )


def models(store: Store) -> list[ModelOut]:
    serving = q.serving_counts(store)
    return [m for r in reversed(store.models()) if (m := model_out(store, r.sha256, serving)) is not None]


def card_path(store: Store, sha: str) -> Path | None:
    """The model card (card.html) in the registered package's directory, if it is there."""
    rec = store.model(sha)
    if rec is None or not rec.path:
        return None
    path = Path(rec.path) / "card.html"
    return path if path.is_file() else None


def releases(store: Store, fleet: str | None) -> list[ReleaseOut]:
    versions = {r.sha256: r.version for r in store.models()}
    rows = q.releases(store, fleet)
    return [
        ReleaseOut(
            id=r.id,
            fleet=r.fleet,
            channel=r.channel,
            model_sha256=r.model_sha256,
            model_version=versions.get(r.model_sha256),
            created_at=r.created_at,
            created_by=r.created_by,
            details=_loads(r.details),
        )
        for r in rows
    ]


def channels(repo: ReleaseRepository | None, fleet: str | None) -> list[ChannelOut]:
    """The current release of each (fleet, model, channel) in the signed repository."""
    if repo is None:
        return []
    out = []
    keys = {(r.fleet, r.model) for r in repo.releases() if fleet is None or r.fleet == fleet}
    for f, model in sorted(keys):
        for channel in ("stable", "canary"):
            rec = repo.current(channel, f, model)
            if rec is not None:
                out.append(
                    ChannelOut(
                        fleet=f,
                        model=model,
                        channel=channel,
                        release=rec.release,
                        version=rec.version,
                        package_sha256=rec.package_sha256,
                        published=float(rec.published),
                        cohort_share_bp=rec.cohort.share_bp if rec.cohort else None,
                    )
                )
    return out


def audit_out(e: AuditEntry) -> AuditOut:
    return AuditOut(
        id=e.id, ts=e.ts, actor=e.actor, action=e.action, subject=e.subject, details=_loads(e.details) or None
    )


def alert_out(a: Alert) -> AlertOut:
    return AlertOut(
        id=a.id,
        fleet=a.fleet,
        device=a.device,
        kind=a.kind,
        severity=a.severity,
        message=a.message,
        details=_loads(a.details) or None,
        created_at=a.created_at,
        resolved_at=a.resolved_at,
    )


def webhook_delivery_out(row: DeliveryRow, urls: Mapping[str, str]) -> WebhookDeliveryOut:
    """A delivery with its webhook's URL as ``urls`` shows it (none for a webhook not configured here)."""
    return WebhookDeliveryOut(url=urls.get(row.webhook), **vars(row))


def rollouts(store: Store, fleet: str | None) -> list[RolloutOut]:
    rel = {r.id: r for r in releases(store, fleet)}
    out = []
    for r in reversed(store.rollouts(fleet)):
        release = rel.get(r.release_id)
        out.append(
            RolloutOut(
                id=r.id,
                fleet=r.fleet,
                release_id=r.release_id,
                channel=release.channel if release else None,
                model_sha256=release.model_sha256 if release else None,
                model_version=release.model_version if release else None,
                cohort=r.cohort,
                state=r.state,
                started_at=r.started_at,
                updated_at=r.updated_at,
            )
        )
    return out


def rollout_detail(store: Store, rollout_id: int) -> RolloutDetail | None:
    row = next((r for r in rollouts(store, None) if r.id == rollout_id), None)
    if row is None:
        return None
    checks = [
        RolloutCheckOut(
            ts=c.ts,
            decision=c.decision,
            canary_accuracy=c.canary_accuracy,
            control_accuracy=c.control_accuracy,
            p_noninferior=c.p_noninferior,
            canary_windows=c.canary_windows,
            control_windows=c.control_windows,
            reasons=json.loads(c.reasons) if c.reasons else [],
        )
        for c in q.rollout_checks(store, rollout_id)
    ]
    decisions = [
        audit_out(e) for e in reversed(q.audit_page(store, subject=f"rollout/{rollout_id}", limit=100).items)
    ]
    champion = _champion_before(store, row)
    return RolloutDetail(
        **row.model_dump(),
        checks=checks,
        decisions=decisions,
        champion_sha256=champion.model_sha256 if champion else None,
        champion_version=champion.model_version if champion else None,
    )


def _champion_before(store: Store, row: RolloutOut) -> ReleaseOut | None:
    """The stable release that was current when a canary started: its control group's model."""
    stable = [
        r
        for r in releases(store, row.fleet)
        if r.channel == "stable" and r.created_at <= row.started_at and r.id < row.release_id
    ]
    return stable[0] if stable else None


def sample_out(item: dict[str, Any], labels: Sequence[str] | None) -> SampleOut:
    prov = item.get("provenance") or {}
    top = []
    for t in prov.get("top") or []:
        if isinstance(t, dict):
            top.append(t)
        elif isinstance(t, list | tuple) and len(t) == 2:
            idx, prob = t
            name = labels[idx] if labels and isinstance(idx, int) and 0 <= idx < len(labels) else str(idx)
            top.append({"index": idx, "label": name, "probability": prob})
    return SampleOut(
        id=item["id"],
        fleet=item["fleet"],
        device=item["device"],
        ts=item["ts"],
        model_sha256=item["model_sha256"],
        consent_policy=item["consent_policy"],
        sha256=item["sha256"],
        content_type=item["content_type"],
        reason=prov.get("reason"),
        top=top,
        provenance=prov,
        labels=item["labels"],
        flag=item["flag"],
    )


def samples(store: Store, ids: Sequence[int]) -> list[SampleOut]:
    items = q.sample_meta(store, ids)
    label_sets: dict[str, list[str] | None] = {}
    out = []
    for it in items:
        sha = it["model_sha256"]
        if sha not in label_sets:
            m = store.manifest(sha) if sha else None
            label_sets[sha] = list(m.labels) if m else None
        out.append(sample_out(it, label_sets[sha]))
    return out


def labelling_progress(store: Store, fleet: str | None) -> list[ProgressOut]:
    """Per device in drift (or warning): its samples, and how many are labelled or flagged: the progress
    of each drifted slice."""
    drifted = q.drift_states(store, fleet, ("drift", "warning"))
    counts = q.labelling_progress(store, list(drifted), None) if drifted else {}
    return [ProgressOut(device=d, drift_state=drifted[d], **counts[d]) for d in sorted(drifted)]
