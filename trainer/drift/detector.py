"""Drift detection on telemetry windows against a model's reference, per device and fleet-wide.

For every window and feature (the seven telemetry histograms plus the predicted-class prior):

1. a two-sample chi-square test against the reference histogram (sparse bins merged), with a p-value
   that holds for the one fixed reference every window is compared with
   (:func:`~trainer.drift.stats.reference_robust_pvalue`, ``reference_coverage``): plain two-sample
   p-values assume a fresh reference per window, so when the reference sample happens to sit off the
   true distribution a clean stream fails the same feature window after window (in
   ``tests/test_drift_streams.py``'s clean stream: 2 drift alarms per device-week and 162 flagged
   windows in 2 device-weeks with plain p-values, 0 and 2 with these);
2. an effect size, Jensen-Shannon divergence, that must exceed both a floor and the 99.9% quantile of
   what a window of that size shows by chance (so the threshold depends on the window size);
3. Benjamini-Hochberg across all features and all devices assessed in the same step.

Frames are not independent (a camera sees an object for several frames), so every key's windows are
tested as ``n / d`` independent observations, with the dispersion ``d`` estimated from its own
consecutive windows (median of the last 10 pairs; a key's first windows only learn it).

A window is *flagged* when at least ``min_features`` features pass both. A sequential detector
(one-sided CUSUM on the per-window score) accumulates weaker evidence. Each key (a device, or the
fleet) moves through ``ok -> warning -> drift`` and back with hysteresis: drift needs ``k_of_n``
flagged windows (or the CUSUM crossing its limit) and clears only after ``clear_after`` clean windows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge_agent.protocol import TelemetryWindow
from edge_agent.reference import ReferenceStats
from trainer.drift.stats import (
    benjamini_hochberg,
    chi2_homogeneity,
    js_divergence,
    null_js_threshold,
    psi,
    reference_robust_pvalue,
)

State = Literal["ok", "warning", "drift"]
CLASS_PRIOR = "class_prior"


class DriftConfig(BaseModel):
    """Every knob of the drift engine in one place."""

    model_config = ConfigDict(extra="forbid")
    features: tuple[str, ...] = (
        "confidence",
        "entropy",
        "margin",
        "brightness",
        "contrast",
        "log_laplacian_var",
        "saturation",
        CLASS_PRIOR,
    )
    fdr: float = Field(default=0.001, gt=0, lt=1)
    """Benjamini-Hochberg false discovery rate across features and devices in one step."""
    reference_coverage: float | None = Field(default=0.999, gt=0.5, lt=1)
    """p-values hold for any reference whose sampling error lies in this region of its own distribution
    (see :func:`~trainer.drift.stats.reference_robust_pvalue`); None: the plain two-sample p-value."""
    js_floor: float = Field(default=0.02, ge=0)
    """Minimum Jensen-Shannon divergence (bits) for a feature to count, whatever the p-value."""
    null_quantile: float = Field(default=0.999, gt=0.5, lt=1)
    min_window_frames: int = Field(default=30, ge=1)
    """Windows with fewer inferred frames are not assessed (too little evidence)."""
    min_features: int = Field(default=1, ge=1)
    k_of_n: tuple[int, int] = (2, 3)
    """Drift when this many of the last N assessed windows are flagged."""
    clear_after: int = Field(default=3, ge=1)
    """Consecutive clean windows that clear a warning or drift state."""
    cusum_slack: float = Field(default=0.5, ge=0)
    cusum_limit: float = Field(default=4.0, gt=0)
    design_effect: float | None = Field(default=None, ge=1)
    """Frames per independent observation. The tests assume independent frames, but a camera sees the
    same object for several frames: at 5 frames per scene, clean windows were flagged 81% of the time.
    None estimates it per key from consecutive windows (:func:`pair_dispersion`); a number fixes it."""
    dispersion_pairs: int = Field(default=10, ge=1)
    """Consecutive-window pairs whose median dispersion is the estimate (robust to one shift onset)."""
    min_dispersion_pairs: int = Field(default=3, ge=1)
    """Until a key has this many pairs its windows are assessed but cannot flag (learning)."""
    rebase_windows: int = Field(default=5, ge=1)
    """After a promotion, each device's first this many assessable windows under the new model become its
    own reference (``trainer/drift/rebase.py``); until then the device is ``rebasing``."""


TRAINING_REFERENCE = "training"
"""Label of a model's own reference from model.json (the other labels are ``device:<since>``)."""


@dataclass(frozen=True)
class KeyReference:
    """The reference one key is judged against, when it is not the model's training reference."""

    stats: ReferenceStats
    label: str
    """Reported with the key's transitions (e.g. ``device:1718000000``)."""
    correlated: bool = True
    """Built from the key's own windows, whose frames are as correlated as the windows it judges: its
    counts are scaled by the same dispersion (the training reference holds independent images)."""


@dataclass
class FeatureResult:
    feature: str
    statistic: float
    df: int
    p_value: float
    """Reference-robust p-value (the plain one when ``reference_coverage`` is None); BH uses it."""
    js: float
    threshold: float
    psi: float
    significant: bool = False

    @property
    def flagged(self) -> bool:
        return self.significant and self.js >= self.threshold


@dataclass
class WindowAssessment:
    """One window's tests (before multiple-testing correction, which needs the whole step)."""

    key: str
    frames: int
    features: dict[str, FeatureResult] = field(default_factory=dict)
    dispersion: float = 1.0
    """Frames per independent observation the tests assumed (see ``DriftConfig.design_effect``)."""
    learning: bool = False
    """The key's dispersion is not known yet: the window cannot flag."""
    reference: str = TRAINING_REFERENCE
    """Which reference the window was tested against (``training`` or ``device:<since>``)."""
    counts: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @property
    def flagged_features(self) -> list[str]:
        return [] if self.learning else [f for f, r in self.features.items() if r.flagged]

    @property
    def score(self) -> float:
        """Largest effect relative to its window-size threshold (1.0 = at the threshold)."""
        if self.learning:
            return 0.0
        ratios = [r.js / max(r.threshold, 1e-9) for r in self.features.values() if r.significant]
        return max(ratios, default=0.0)


def _reference_counts(ref: ReferenceStats, feature: str) -> list[int]:
    if feature == CLASS_PRIOR:
        return [int(round(p * ref.images)) for p in ref.class_prior]
    return ref.histograms[feature].counts


def _window_counts(window: TelemetryWindow, feature: str, num_classes: int) -> list[int]:
    if feature == CLASS_PRIOR:
        counts = [0] * num_classes
        for c, n in window.class_counts.items():
            if 0 <= c < num_classes:
                counts[c] += n
        return counts
    return window.histograms[feature].counts


def assess_window(
    key: str,
    window: TelemetryWindow,
    ref: ReferenceStats,
    cfg: DriftConfig,
    dispersion: float = 1.0,
    reference_dispersion: float = 1.0,
) -> WindowAssessment | None:
    """Per-feature tests of one window, its counts scaled to ``n / dispersion`` independent observations
    (the reference's to ``n / reference_dispersion``); None when it has too few frames to say anything."""
    n = window.frames.inferred
    if n < cfg.min_window_frames:
        return None
    out = WindowAssessment(key=key, frames=n, dispersion=dispersion)
    for feature in cfg.features:
        if feature != CLASS_PRIOR and (feature not in window.histograms or feature not in ref.histograms):
            continue
        ref_counts = _reference_counts(ref, feature)
        counts = _window_counts(window, feature, len(ref.class_prior))
        if len(counts) != len(ref_counts):
            raise ValueError(
                f"{key}: feature {feature} has {len(counts)} bins, the reference {len(ref_counts)}"
            )
        if sum(counts) == 0:
            continue  # e.g. input statistics skipped in this window
        out.counts[feature] = counts
        effective = np.asarray(counts, np.float64) / dispersion
        n_eff = float(effective.sum())
        ref_effective = np.asarray(ref_counts, np.float64) / reference_dispersion
        stat, df, p = chi2_homogeneity(effective, ref_effective)
        if cfg.reference_coverage is not None:
            p = reference_robust_pvalue(stat, df, n_eff, float(ref_effective.sum()), cfg.reference_coverage)
        out.features[feature] = FeatureResult(
            feature=feature,
            statistic=stat,
            df=df,
            p_value=p,
            js=js_divergence(np.asarray(counts), np.asarray(ref_counts)),
            threshold=max(
                cfg.js_floor, null_js_threshold(ref_counts, max(1, round(n_eff)), cfg.null_quantile)
            ),
            psi=psi(np.asarray(counts), np.asarray(ref_counts)),
        )
    return out


def pair_dispersion(
    previous: Mapping[str, Sequence[int]], current: Mapping[str, Sequence[int]]
) -> float | None:
    """Overdispersion of two consecutive windows of one key: pooled chi-square / df of their two-sample
    tests. About 1 when frames are independent draws from one distribution, about k when each scene is
    seen for k frames (the variance of a window's histogram grows k-fold)."""
    stat = df = 0.0
    for feature, counts in current.items():
        if feature in previous:
            s, d, _ = chi2_homogeneity(counts, previous[feature])
            stat, df = stat + s, df + d
    return stat / df if df else None


def apply_fdr(assessments: list[WindowAssessment], fdr: float) -> None:
    """Benjamini-Hochberg over every (key, feature) p-value of one step; sets ``significant``."""
    results = [r for a in assessments for r in a.features.values()]
    for r, rejected in zip(results, benjamini_hochberg([r.p_value for r in results], fdr)):
        r.significant = bool(rejected)


@dataclass
class Transition:
    """A state change of one key, for alerts."""

    key: str
    old: State
    new: State
    flagged_features: list[str]
    score: float
    cusum: float
    reference: str = TRAINING_REFERENCE
    """The reference the key was judged against when its state changed."""


class _KeyState:
    def __init__(self, n: int, pairs: int) -> None:
        self.state: State = "ok"
        self.recent: deque[bool] = deque(maxlen=n)
        self.clean_run = 0
        self.cusum = 0.0
        self.windows = 0
        self.previous: dict[str, list[int]] | None = None
        self.dispersions: deque[float] = deque(maxlen=pairs)

    def dispersion(self, cfg: DriftConfig) -> tuple[float, bool]:
        """(frames per independent observation, still learning it)."""
        if cfg.design_effect is not None:
            return cfg.design_effect, False
        if len(self.dispersions) < cfg.min_dispersion_pairs:
            return 1.0, True
        return max(1.0, float(np.median(self.dispersions))), False


class DriftMonitor:
    """Keeps the state machine of every key (device ids, ``fleet``) across steps."""

    def __init__(self, cfg: DriftConfig | None = None) -> None:
        self.cfg = cfg or DriftConfig()
        self._keys: dict[str, _KeyState] = {}

    def state(self, key: str) -> State:
        return self._keys[key].state if key in self._keys else "ok"

    def states(self) -> dict[str, State]:
        return {k: s.state for k, s in self._keys.items()}

    def _key(self, key: str) -> _KeyState:
        return self._keys.setdefault(key, _KeyState(self.cfg.k_of_n[1], self.cfg.dispersion_pairs))

    def reset(self, key: str) -> None:
        """Forget a key's state and evidence (its reference changes), keeping its learnt dispersion."""
        if key not in self._keys:
            return
        old = self._keys[key]
        fresh = self._keys[key] = _KeyState(self.cfg.k_of_n[1], self.cfg.dispersion_pairs)
        fresh.dispersions, fresh.previous = old.dispersions, old.previous

    def step(
        self,
        windows: Mapping[str, TelemetryWindow],
        reference: ReferenceStats,
        references: Mapping[str, KeyReference] | None = None,
        hold: Collection[str] = (),
    ) -> tuple[list[WindowAssessment], list[Transition]]:
        """Assess one step's windows (one per key, all of the same model) and update the states.

        ``references`` replaces the model's reference for some keys; the windows of keys in ``hold``
        only teach the key's dispersion (no test, no state change: the key is being rebased)."""
        references = references or {}
        assessments = []
        for k, w in windows.items():
            ks = self._key(k)
            dispersion, learning = ks.dispersion(self.cfg)
            own = references.get(k)
            ref_dispersion = dispersion if own is not None and own.correlated else 1.0
            a = assess_window(k, w, own.stats if own else reference, self.cfg, dispersion, ref_dispersion)
            if a is None:
                continue
            a.learning = learning
            a.reference = own.label if own else TRAINING_REFERENCE
            if ks.previous is not None and (d := pair_dispersion(ks.previous, a.counts)) is not None:
                ks.dispersions.append(d)
            ks.previous = a.counts
            if k not in hold:
                assessments.append(a)
        apply_fdr(assessments, self.cfg.fdr)
        transitions = [t for a in assessments if (t := self._update(a))]
        return assessments, transitions

    def _update(self, a: WindowAssessment) -> Transition | None:
        cfg = self.cfg
        ks = self._key(a.key)
        ks.windows += 1
        flagged = len(a.flagged_features) >= cfg.min_features
        ks.recent.append(flagged)
        ks.cusum = max(0.0, ks.cusum + min(a.score, 3.0) - (1.0 + cfg.cusum_slack))
        ks.clean_run = 0 if flagged else ks.clean_run + 1
        old = ks.state
        if sum(ks.recent) >= cfg.k_of_n[0] or ks.cusum >= cfg.cusum_limit:
            ks.state = "drift"
        elif flagged and old == "ok":
            ks.state = "warning"
        elif ks.clean_run >= cfg.clear_after:
            ks.state = "ok"
            ks.cusum = 0.0
        if ks.state != old:
            return Transition(a.key, old, ks.state, a.flagged_features, a.score, ks.cusum, a.reference)
        return None
