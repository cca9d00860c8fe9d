"""Drift monitoring over stored telemetry: time slots -> per-model steps -> device and fleet states.

Windows are processed by time slot (``slot_s`` seconds of window *end* time: a window is complete when
it ends) once the slot is ``grace_s`` old (the publish and ingest latency), so every device's window of
that period is assessed in the same step (Benjamini-Hochberg runs across devices) together with the
fleet-wide merge. A window that arrives after its slot was assessed (spooled through an outage) is
stored but not assessed: drift is about the present. Each model has its own monitor
against its own reference from model.json. The service keeps, per device, the recent drift states and
the label-free accuracy estimate that the retraining policy reads.

After a promotion (:meth:`DriftService.rebase`) each device of the new model is ``rebasing``: its first
``DriftConfig.rebase_windows`` windows under the model (ended after the promotion, enough frames) only
teach its dispersion, and their exact merge becomes its own reference (``trainer/drift/rebase.py``),
stored so a restarted service judges it the same way. Held rather than judged against the training
reference meanwhile, because that reference (the new training mix) is what made unshifted devices warn
after a promotion. The fleet-wide merge is always judged against the training reference.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from edge_agent.protocol import TelemetryWindow
from edge_agent.reference import ReferenceStats
from edge_agent.telemetry.merge import merge_to_window
from trainer.drift.detector import TRAINING_REFERENCE, DriftConfig, DriftMonitor, KeyReference, Transition
from trainer.drift.labelfree import AccuracyRegressor
from trainer.drift.rebase import DeviceReference, differences, reference_from_windows
from trainer.fleet.retrain_policy import DeviceHealth
from trainer.store import Store
from trainer.store.console_queries import HealthRow
from trainer.store.store import DeviceActivity

log = logging.getLogger(__name__)
FLEET_KEY = "fleet"


@dataclass
class DriftEvent:
    """A state change of a device (or of the fleet) for one model."""

    slot_start: float
    model_sha256: str
    transition: Transition


@dataclass
class _DeviceTrack:
    states: deque[bool] = field(default_factory=lambda: deque(maxlen=12))
    windows: deque[TelemetryWindow] = field(default_factory=lambda: deque(maxlen=6))


REBASING = "rebasing"
"""A device's state between a promotion and its own reference (see the module docstring)."""


class DriftService:
    """Feeds stored windows to per-model drift monitors, slot by slot."""

    def __init__(
        self,
        store: Store,
        fleet: str,
        cfg: DriftConfig | None = None,
        *,
        slot_s: float = 60.0,
        grace_s: float = 15.0,
        start: float = 0.0,
    ) -> None:
        self.store = store
        self.fleet = fleet
        self.cfg = cfg or DriftConfig()
        self.slot_s = slot_s
        self.grace_s = grace_s
        self.next_slot = math.floor(start / slot_s) * slot_s if start else None
        self.monitors: dict[str, DriftMonitor] = {}
        self._references: dict[str, ReferenceStats | None] = {}
        self.tracks: dict[str, dict[str, _DeviceTrack]] = defaultdict(lambda: defaultdict(_DeviceTrack))
        self.assessed = 0
        self.rebased: list[DeviceReference] = []
        """Device references made since the last :meth:`take_rebased` (the service alerts on them)."""
        self._rebases: dict[str, tuple[float, int]] = {
            r.model_sha256: (r.since, r.windows) for r in store.rebases(fleet)
        }
        self._device_refs: dict[str, dict[str, DeviceReference]] = defaultdict(dict)
        for rec, stats in store.device_references(fleet):
            differs = json.loads(rec.details or "{}").get("differs", {})
            self._device_refs[rec.model_sha256][rec.device] = DeviceReference(
                rec.device, rec.model_sha256, rec.since, rec.windows, stats, differs
            )

    # -- per-device references ---------------------------------------------------------------------
    def rebase(self, sha: str, since: float, windows: int | None = None) -> None:
        """Model ``sha`` was promoted at ``since``: rebase every device on its first windows under it."""
        n = windows or self.cfg.rebase_windows
        self.store.start_rebase(fleet=self.fleet, model_sha256=sha, since=since, windows=n)
        self._rebases[sha] = (since, n)
        self._device_refs.pop(sha, None)
        monitor = self.monitors.get(sha)
        for d, t in self.tracks.get(sha, {}).items():  # canary devices: judged against the training mix
            t.states.clear()
            if monitor is not None:
                monitor.reset(d)

    def reference_of(self, sha: str, device: str) -> str:
        """``training``, ``rebasing`` or the device reference's label (``device:<since>``)."""
        own = self._device_refs.get(sha, {}).get(device)
        if own is not None:
            return own.label
        return REBASING if sha in self._rebases and device != FLEET_KEY else TRAINING_REFERENCE

    def artifact_of(self, sha: str, device: str) -> str | None:
        """The artifact of the device's newest tracked window on model ``sha`` (None before one)."""
        t = self.tracks.get(sha, {}).get(device)
        return t.windows[-1].model.artifact if t is not None and t.windows else None

    def state(self, sha: str, device: str) -> str:
        """ok / warning / drift of a device on model ``sha``, or ``rebasing``."""
        if self.reference_of(sha, device) == REBASING:
            return REBASING
        monitor = self.monitors.get(sha)
        return monitor.state(device) if monitor is not None else "ok"

    def device_references(self, sha: str) -> dict[str, DeviceReference]:
        return dict(self._device_refs.get(sha, {}))

    def take_rebased(self) -> list[DeviceReference]:
        out, self.rebased = self.rebased, []
        return out

    def _collect(self, sha: str, device: str, ref: ReferenceStats, until: float) -> DeviceReference | None:
        """The device's own reference once it has sent enough windows under ``sha`` since the rebase."""
        since, n = self._rebases[sha]
        ws = [
            w
            for w in self.store.windows(device=device, model_sha256=sha, since=since, until=until, ended=True)
            if w.frames.inferred >= self.cfg.min_window_frames
        ]
        if len(ws) < n:
            return None
        stats = reference_from_windows(ws[:n], ref)
        own = DeviceReference(device, sha, since, n, stats, differences(stats, ref, self.cfg.js_floor))
        self.store.add_device_reference(
            fleet=self.fleet,
            device=device,
            model_sha256=sha,
            since=since,
            windows=n,
            reference=stats,
            details={"differs": own.differs, "windows": [[w.session, w.seq] for w in ws[:n]]},
        )
        self._device_refs[sha][device] = own
        monitor = self.monitors.get(sha)
        if monitor is not None:
            monitor.reset(device)
        self.rebased.append(own)
        return own

    def _reference(self, sha: str) -> ReferenceStats | None:
        if sha not in self._references:
            manifest = self.store.manifest(sha)
            self._references[sha] = manifest.reference if manifest else None
            if self._references[sha] is None:
                log.warning("model %s has no reference statistics: its windows are not assessed", sha[:12])
        return self._references[sha]

    def poll(self, now: float) -> list[DriftEvent]:
        """Assess every slot that has closed since the last call."""
        events: list[DriftEvent] = []
        if self.next_slot is None:
            first = self.store.windows(fleet=self.fleet, limit=1)
            if not first:
                return events
            self.next_slot = math.floor(first[0].end / self.slot_s) * self.slot_s
        while self.next_slot + self.slot_s + self.grace_s <= now:
            start = self.next_slot
            windows = self.store.windows(fleet=self.fleet, since=start, until=start + self.slot_s, ended=True)
            self.next_slot = start + self.slot_s  # a slot is assessed once, even if it cannot be
            try:
                events += self._slot(start, windows)
            except Exception:  # noqa: BLE001 - one bad slot must not stop drift monitoring
                log.exception("drift: slot %.0f could not be assessed", start)
        return events

    def _slot(self, start: float, windows: Iterable[TelemetryWindow]) -> list[DriftEvent]:
        by_model: dict[str, dict[str, list[TelemetryWindow]]] = defaultdict(lambda: defaultdict(list))
        for w in windows:
            by_model[w.model.sha256][w.device].append(w)
        events = []
        for sha, per_device in by_model.items():
            ref = self._reference(sha)
            if ref is None:
                continue
            step = {}
            for d, ws in per_device.items():
                try:
                    step[d] = merge_to_window(ws, d)
                except ValueError as exc:  # e.g. histogram edges that differ between its windows
                    log.warning("slot %.0f, %s: windows not assessed: %s", start, d, exc)
            step = {d: w for d, w in step.items() if self._matches(w, ref, start)}
            if len(step) > 1:
                try:
                    step[FLEET_KEY] = merge_to_window(list(step.values()), FLEET_KEY)
                except ValueError as exc:
                    log.warning("slot %.0f: no fleet-wide window: %s", start, exc)
            monitor = self.monitors.setdefault(sha, DriftMonitor(self.cfg))
            own: dict[str, KeyReference] = {}
            hold: set[str] = set()
            if sha in self._rebases:
                for d in step:
                    if d == FLEET_KEY:
                        continue
                    dev = self._device_refs[sha].get(d)
                    if dev is None:
                        hold.add(d)  # this slot's window may complete the reference: judged from the next
                        self._collect(sha, d, ref, start + self.slot_s)
                    else:
                        own[d] = dev.key_reference()
            try:
                assessments, transitions = monitor.step(step, ref, own, hold)
            except ValueError as exc:  # bins that do not match the reference: a bad window, not a crash
                log.warning("slot %.0f, model %s: %s", start, sha[:12], exc)
                continue
            self.assessed += len(assessments)
            assessed = {a.key for a in assessments}
            for d, w in step.items():
                if d == FLEET_KEY:
                    continue
                if d in hold:  # rebasing: no drift evidence, but the accuracy estimate still counts
                    if w.frames.inferred >= self.cfg.min_window_frames:
                        self.tracks[sha][d].windows.append(w)
                    continue
                if d not in assessed:  # too few frames: no evidence either way
                    continue
                t = self.tracks[sha][d]
                t.states.append(monitor.state(d) == "drift")
                t.windows.append(w)
            events += [DriftEvent(start, sha, t) for t in transitions]
        return events

    @staticmethod
    def _matches(w: TelemetryWindow, ref: ReferenceStats, start: float) -> bool:
        """A window whose histograms use other bins than the reference is skipped, not the whole slot."""
        bad = [
            f for f, h in w.histograms.items() if f in ref.histograms and h.edges != ref.histograms[f].edges
        ]
        if bad:
            log.warning(
                "slot %.0f, %s: histogram bins differ from the reference for %s: not assessed",
                start,
                w.device,
                ", ".join(bad),
            )
        return not bad

    def health(
        self, sha: str, recent: int = 3, regressor: AccuracyRegressor | None = None
    ) -> dict[str, DeviceHealth]:
        """Recent drift states and accuracy estimates of every device running model ``sha``: PPI++ over
        the best label-free estimate of its last ``recent`` windows (the window ``regressor`` when one
        was fitted for the model), with the labelled audit samples it sent during them (the label-free
        estimate alone, without an interval, when it has none)."""
        from trainer.drift.accuracy import estimate_device_accuracy
        from trainer.fleet.labelling import audit_labels

        manifest = self.store.manifest(sha)
        ref = manifest.reference if manifest else None
        ranges = {d: list(t.windows)[-recent:] for d, t in self.tracks.get(sha, {}).items()}
        starts = [w.start for ws in ranges.values() for w in ws]
        audit = (
            audit_labels(
                self.store, model_sha256=sha, labels=manifest.labels, reference=ref, since=min(starts)
            )
            if manifest is not None and starts
            else {}
        )
        out = {}
        for d, t in self.tracks.get(sha, {}).items():
            ws = ranges[d]
            mine = [a for a in audit.get(d, []) if ws and ws[0].start <= a.ts < ws[-1].end]
            est = estimate_device_accuracy(ws, ref, mine, regressor)
            out[d] = DeviceHealth(tuple(t.states), est.estimate, est.interval, est.method, est.labels)
        return out

    def health_rows(
        self, sha: str, activity: Mapping[str, DeviceActivity]
    ) -> tuple[dict[str, DeviceHealth], dict[str, HealthRow]]:
        """:meth:`health` on model ``sha`` and the row the store keeps per device (the console, metrics
        and Home Assistant read those), with the frame rate and confidence of ``activity``."""
        health = self.health(sha)
        rows = {}
        for device, h in health.items():
            act = activity.get(device)
            rows[device] = HealthRow(
                model_sha256=sha,
                drift_state=self.state(sha, device),
                reference=self.reference_of(sha, device),
                estimated_accuracy=h.estimated_accuracy,
                low=h.interval[0] if h.interval else None,
                high=h.interval[1] if h.interval else None,
                method=h.method,
                labels=h.labels,
                frames_per_second=act.frames_per_second if act else None,
                confidence_mean=act.confidence_mean if act else None,
                artifact=self.artifact_of(sha, device),
            )
        return health, rows
