"""Staged rollout: canary release to a cohort, canary vs control analysis, promotion or roll-forward.

The cohort is signed into the canary release (``edge_agent.updater.cohort``): devices with
``update.channel: auto`` in it take the candidate, the rest keep the champion and are the control
group. Each poll compares the cohort's windows on the candidate with the control group's windows on
the champion since the canary started (:func:`~trainer.fleet.rollout_policy.compare_canary`). A canary
device reporting ``rolled_back`` (its own health window failed, or it crashed mid-trial) aborts the
rollout. People can promote or abort at any time (``edgefleet rollout promote | abort``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from edge_agent.package import ModelPackage
from edge_agent.protocol import TelemetryWindow
from edge_agent.updater.cohort import Cohort, in_cohort
from trainer.drift.accuracy import window_estimator
from trainer.errors import RolloutDecided
from trainer.fleet.rollout_policy import CanaryVerdict, RolloutConfig, compare_canary
from trainer.release.hints import HintPublisher
from trainer.release.repository import ReleaseRecord, ReleaseRepository
from trainer.store import Store
from trainer.store.console_queries import claim_rollout, record_rollout_check, reopen_rollout

log = logging.getLogger(__name__)


@dataclass
class ActiveRollout:
    rollout_id: int
    release: ReleaseRecord
    candidate_sha256: str
    champion_sha256: str
    cohort: Cohort
    started: float
    version: str
    retrained_for: frozenset[str] = frozenset()
    """Devices whose field samples the candidate was retrained on (the analysis is stratified by them)."""


@dataclass
class RolloutOutcome:
    decision: Literal["promote", "rollback"]
    reasons: list[str]
    release: ReleaseRecord
    verdict: CanaryVerdict | None = None


class RolloutManager:
    """Runs at most one canary at a time for one model of one fleet."""

    def __init__(
        self,
        store: Store,
        repo: ReleaseRepository,
        publisher: HintPublisher | None,
        *,
        fleet: str,
        model: str,
        cfg: RolloutConfig,
        repo_url: str | None = None,
        lookback_s: float = 120.0,
    ) -> None:
        self.store, self.repo, self.publisher = store, repo, publisher
        self.fleet, self.model, self.cfg, self.repo_url = fleet, model, cfg, repo_url
        self.active: ActiveRollout | None = None
        self.lookback_s = lookback_s
        """The "before" period of the canary analysis: the champion's windows this long before the canary."""

    def _announce(self, rec: ReleaseRecord) -> None:
        if self.publisher is not None:
            self.publisher.hint(rec.hint(self.repo_url))

    def release_stable(self, package: ModelPackage, actor: str = "trainer") -> ReleaseRecord:
        """Publish a model to every device (the first release of a fleet)."""
        self.store.register_package(package, actor=actor)
        rec = self.repo.publish(package.root, channel="stable", fleet=self.fleet)
        rid = self.store.record_release(
            fleet=self.fleet,
            channel="stable",
            model_sha256=package.sha256,
            actor=actor,
            details={"release": rec.release, "version": package.manifest.version},
        )
        self.store.record_rollout(release_id=rid, fleet=self.fleet, actor=actor, state="done", cohort="all")
        self._announce(rec)
        return rec

    def start_canary(
        self,
        package: ModelPackage,
        champion_sha256: str,
        actor: str = "trainer",
        retrained_for: Collection[str] = (),
    ) -> ActiveRollout:
        """Publish ``package`` on the canary channel to the configured share of the fleet; ``retrained_for``
        names the devices whose field samples it was retrained on."""
        if self.active is not None:
            raise RuntimeError(f"a canary ({self.active.version}) is already running")
        cohort = Cohort.of_share(self.cfg.canary_share, self.fleet)
        self.store.register_package(package, actor=actor)
        rec = self.repo.publish(package.root, channel="canary", fleet=self.fleet, cohort=cohort)
        rid = self.store.record_release(
            fleet=self.fleet,
            channel="canary",
            model_sha256=package.sha256,
            actor=actor,
            details={
                "release": rec.release,
                "version": package.manifest.version,
                "cohort_bp": cohort.share_bp,
                "retrained_for": sorted(retrained_for),
            },
        )
        roll = self.store.record_rollout(
            release_id=rid, fleet=self.fleet, actor=actor, cohort=f"canary:{cohort.share_bp}bp"
        )
        self.active = ActiveRollout(
            roll,
            rec,
            package.sha256,
            champion_sha256,
            cohort,
            time.time(),
            package.manifest.version,
            frozenset(retrained_for),
        )
        self._announce(rec)
        return self.active

    def cohort_devices(self, devices: list[str]) -> list[str]:
        return [d for d in devices if self.active and in_cohort(d, self.active.cohort)]

    def poll(self, now: float) -> RolloutOutcome | None:
        """Decide on the running canary if the evidence allows; returns what was done."""
        a = self.active
        if a is None:
            return None
        by_hand = self._decided_elsewhere(a)
        if by_hand is not None:
            return by_hand
        try:
            return self._decide(a, now)
        except RolloutDecided:  # a person decided between this poll's first look and now
            return self._decided_elsewhere(a)

    def _decide(self, a: ActiveRollout, now: float) -> RolloutOutcome | None:
        """Roll back on a crashed canary device, else on the analysis (kept as a rollout check)."""
        crashed = [
            e
            for e in self.store.update_events(since=a.started, state="rolled_back")
            if e.release == a.release.release
        ]
        if crashed:
            devices = sorted({e.device for e in crashed})
            return self.rollback(
                f"canary device(s) rolled back on their own: {', '.join(devices)}", actor="trainer"
            )
        verdict = self._verdict(a)
        record_rollout_check(self.store, a.rollout_id, now, _check_fields(verdict))
        if verdict.decision == "promote":
            return self.promote("; ".join(verdict.reasons), actor="trainer", verdict=verdict)
        if verdict.decision == "rollback":
            return self.rollback("; ".join(verdict.reasons), actor="trainer", verdict=verdict)
        if verdict.canary_windows < self.cfg.min_windows and now - a.started > self.cfg.max_wait_s:
            return self.rollback(
                f"only {verdict.canary_windows} canary window(s) {now - a.started:.0f} s after the "
                "release: the canary devices are silent",
                actor="trainer",
                verdict=verdict,
            )
        return None

    def _verdict(self, a: ActiveRollout) -> CanaryVerdict:
        """The canary cohort on the candidate against the control group on the champion, since the start
        (and before it, for each group's own baseline)."""

        def split(ws: list[TelemetryWindow]) -> tuple[list[TelemetryWindow], list[TelemetryWindow]]:
            return [w for w in ws if in_cohort(w.device, a.cohort)], [
                w for w in ws if not in_cohort(w.device, a.cohort)
            ]

        canary, _ = split(
            self.store.windows(fleet=self.fleet, model_sha256=a.candidate_sha256, since=a.started)
        )
        _, control = split(
            self.store.windows(fleet=self.fleet, model_sha256=a.champion_sha256, since=a.started)
        )
        canary_before, control_before = split(
            self.store.windows(
                fleet=self.fleet,
                model_sha256=a.champion_sha256,
                since=a.started - self.lookback_s,
                until=a.started,
            )
        )
        # each window is estimated against its own model's reference (ATC-NE where the reference allows,
        # else ATC): the candidate and the champion have different thresholds and reliability curves
        refs = {}
        for sha in (a.candidate_sha256, a.champion_sha256):
            m = self.store.manifest(sha)
            refs[sha] = m.reference if m is not None else None
        estimate = window_estimator(refs)
        return compare_canary(
            canary,
            control,
            self.cfg,
            canary_before,
            control_before,
            estimate=estimate,
            retrained_for=a.retrained_for,
        )

    def _decided_elsewhere(self, a: ActiveRollout) -> RolloutOutcome | None:
        """A person promoted or aborted this canary (``edgefleet rollout``) since the last poll."""
        row = next((r for r in self.store.rollouts(self.fleet) if r.id == a.rollout_id), None)
        if row is None or row.state == "active":
            return None
        self.active = None
        channel = "stable" if row.state == "promoted" else "canary"
        rec = self.repo.current(channel, self.fleet, self.model) or a.release
        decision: Literal["promote", "rollback"] = "promote" if row.state == "promoted" else "rollback"
        return RolloutOutcome(decision, [f"{row.state} by hand (edgefleet rollout)"], rec)

    def _claim(self, a: ActiveRollout, state: str, actor: str, reason: str) -> None:
        """Take the decision on ``a`` (RolloutDecided if someone else took it first)."""
        if not claim_rollout(self.store, a.rollout_id, state, actor=actor, reason=reason):
            raise RolloutDecided(f"rollout {a.rollout_id} ({a.version}) was already decided")

    def promote(self, reason: str, *, actor: str, verdict: CanaryVerdict | None = None) -> RolloutOutcome:
        """Make the canary's model stable for every device (RolloutDecided if it was decided already)."""
        a = self._require_active()
        self._claim(a, "promoted", actor, reason)
        try:
            rec = self.repo.promote(self.fleet, self.model)
        except Exception as exc:
            reopen_rollout(self.store, a.rollout_id, actor=actor, why=f"{type(exc).__name__}: {exc}")
            raise
        rid = self.store.record_release(
            fleet=self.fleet,
            channel="stable",
            model_sha256=a.candidate_sha256,
            actor=actor,
            details={"release": rec.release, "promoted_from": a.release.release},
        )
        self.store.record_rollout(release_id=rid, fleet=self.fleet, actor=actor, state="done", cohort="all")
        self._announce(rec)
        self.active = None
        return RolloutOutcome("promote", [reason], rec, verdict)

    def rollback(self, reason: str, *, actor: str, verdict: CanaryVerdict | None = None) -> RolloutOutcome:
        """Roll the canary cohort forward onto the champion's artifact (a new, higher release)."""
        a = self._require_active()
        self._claim(a, "rolled_back", actor, reason)
        champion = max(
            (
                r
                for r in self.repo.releases()
                if r.fleet == self.fleet and r.model == self.model and r.package_sha256 == a.champion_sha256
            ),
            key=lambda r: r.release,
            default=None,
        )
        try:
            rec = self.repo.rollback(
                self.fleet, self.model, "canary", to_release=champion.release if champion else None
            )
        except Exception as exc:
            reopen_rollout(self.store, a.rollout_id, actor=actor, why=f"{type(exc).__name__}: {exc}")
            raise
        self._announce(rec)
        self.active = None
        return RolloutOutcome("rollback", [reason], rec, verdict)

    def _require_active(self) -> ActiveRollout:
        if self.active is None:
            raise RuntimeError("no canary is running")
        return self.active


def _check_fields(v: CanaryVerdict) -> dict[str, object]:
    """A verdict as a ``rollout_checks`` row."""
    return {
        "decision": v.decision,
        "canary_accuracy": v.canary_accuracy,
        "control_accuracy": v.control_accuracy,
        "p_noninferior": v.p_noninferior,
        "canary_windows": v.canary_windows,
        "control_windows": v.control_windows,
        "reasons": v.reasons,
    }


def decide_by_hand(
    store: Store,
    repo: ReleaseRepository,
    publisher: HintPublisher | None,
    *,
    fleet: str,
    model: str,
    action: Literal["promote", "abort"],
    reason: str,
    actor: str,
    rollout_id: int | None = None,
) -> RolloutOutcome:
    """A person's promote or abort of the fleet's running canary (``edgefleet rollout``, the console).

    RolloutDecided when there is no running canary (or not ``rollout_id``), or another decision won;
    the service notices the decision at its next poll."""
    active = [
        r for r in store.rollouts(fleet) if r.state == "active" and (r.cohort or "").startswith("canary")
    ]
    if rollout_id is not None:
        active = [r for r in active if r.id == rollout_id]
    if not active:
        raise RolloutDecided(
            f"rollout {rollout_id} is not a running canary"
            if rollout_id
            else f"no canary is running in {fleet}"
        )
    canary, stable = repo.current("canary", fleet, model), repo.current("stable", fleet, model)
    if canary is None or stable is None or canary.cohort is None:
        raise RolloutDecided(f"the repository has no canary release with a cohort for {model} in {fleet}")
    mgr = RolloutManager(store, repo, publisher, fleet=fleet, model=model, cfg=RolloutConfig())
    row = active[-1]
    mgr.active = ActiveRollout(
        row.id,
        canary,
        canary.package_sha256,
        stable.package_sha256,
        canary.cohort,
        row.started_at,
        canary.version,
    )
    return mgr.promote(reason, actor=actor) if action == "promote" else mgr.rollback(reason, actor=actor)
