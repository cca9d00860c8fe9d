"""Drift detection on telemetry windows against a model's reference, per device and fleet-wide.

For every window and feature (the seven telemetry histograms plus the predicted-class prior):

1. a two-sample chi-square test against the reference histogram (sparse bins merged);
2. an effect size, Jensen-Shannon divergence, that must exceed both a floor and the 99.9% quantile of
   what a window of that size shows by chance (so the threshold depends on the window size);
3. Benjamini-Hochberg across all features and all devices assessed in the same step.

A window is *flagged* when at least ``min_features`` features pass both. A sequential detector
(one-sided CUSUM on the per-window score) accumulates weaker evidence. Each key (a device, or the
fleet) moves through ``ok -> warning -> drift`` and back with hysteresis: drift needs ``k_of_n``
flagged windows (or the CUSUM crossing its limit) and clears only after ``clear_after`` clean windows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge_agent.protocol import TelemetryWindow
from edge_agent.reference import ReferenceStats
from trainer.drift.stats import benjamini_hochberg, chi2_homogeneity, js_divergence, null_js_threshold, psi

State = Literal["ok", "warning", "drift"]
CLASS_PRIOR = "class_prior"


class DriftConfig(BaseModel):
    """Every knob of the drift engine in one place."""

    model_config = ConfigDict(extra="forbid")
    features: tuple[str, ...] = (
        "confidence", "entropy", "margin", "brightness", "contrast", "log_laplacian_var", "saturation", CLASS_PRIOR,
    )  # fmt: skip
    fdr: float = Field(default=0.001, gt=0, lt=1)
    """Benjamini-Hochberg false discovery rate across features and devices in one step."""
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


@dataclass
class FeatureResult:
    feature: str
    statistic: float
    df: int
    p_value: float
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

    @property
    def flagged_features(self) -> list[str]:
        return [f for f, r in self.features.items() if r.flagged]

    @property
    def score(self) -> float:
        """Largest effect relative to its window-size threshold (1.0 = at the threshold)."""
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


def assess_window(key: str, window: TelemetryWindow, ref: ReferenceStats, cfg: DriftConfig) -> WindowAssessment | None:
    """Per-feature tests of one window; None when it has too few frames to say anything."""
    n = window.frames.inferred
    if n < cfg.min_window_frames:
        return None
    out = WindowAssessment(key=key, frames=n)
    for feature in cfg.features:
        if feature != CLASS_PRIOR and (feature not in window.histograms or feature not in ref.histograms):
            continue
        ref_counts = _reference_counts(ref, feature)
        counts = _window_counts(window, feature, len(ref.class_prior))
        if len(counts) != len(ref_counts):
            raise ValueError(f"{key}: feature {feature} has {len(counts)} bins, the reference {len(ref_counts)}")
        if sum(counts) == 0:
            continue  # e.g. input statistics skipped in this window
        stat, df, p = chi2_homogeneity(counts, ref_counts)
        out.features[feature] = FeatureResult(
            feature=feature,
            statistic=stat,
            df=df,
            p_value=p,
            js=js_divergence(np.asarray(counts), np.asarray(ref_counts)),
            threshold=max(cfg.js_floor, null_js_threshold(ref_counts, sum(counts), cfg.null_quantile)),
            psi=psi(np.asarray(counts), np.asarray(ref_counts)),
        )
    return out


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


class _KeyState:
    def __init__(self, n: int) -> None:
        self.state: State = "ok"
        self.recent: deque[bool] = deque(maxlen=n)
        self.clean_run = 0
        self.cusum = 0.0
        self.windows = 0


class DriftMonitor:
    """Keeps the state machine of every key (device ids, ``fleet``) across steps."""

    def __init__(self, cfg: DriftConfig | None = None) -> None:
        self.cfg = cfg or DriftConfig()
        self._keys: dict[str, _KeyState] = {}

    def state(self, key: str) -> State:
        return self._keys[key].state if key in self._keys else "ok"

    def states(self) -> dict[str, State]:
        return {k: s.state for k, s in self._keys.items()}

    def step(self, windows: Mapping[str, TelemetryWindow], reference: ReferenceStats) -> tuple[list[WindowAssessment], list[Transition]]:
        """Assess one step's windows (one per key, all of the same model) and update the states."""
        assessments = [a for k, w in windows.items() if (a := assess_window(k, w, reference, self.cfg))]
        apply_fdr(assessments, self.cfg.fdr)
        transitions = [t for a in assessments if (t := self._update(a))]
        return assessments, transitions

    def _update(self, a: WindowAssessment) -> Transition | None:
        cfg = self.cfg
        ks = self._keys.setdefault(a.key, _KeyState(cfg.k_of_n[1]))
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
            return Transition(a.key, old, ks.state, a.flagged_features, a.score, ks.cusum)
        return None
