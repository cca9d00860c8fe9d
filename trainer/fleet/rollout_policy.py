"""Canary analysis: does the canary cohort (new model) do at least as well as the control group?

Pure logic. Units are telemetry windows (frames within a window are correlated, windows much less),
compared with Welch's t-test as a one-sided non-inferiority test on the label-free accuracy estimate
(ATC), plus hard limits on frame failures and p95 inference latency. After ``min_windows`` canary
windows: promote when the canary is non-inferior; roll back when it is significantly worse or a hard
limit is broken; keep waiting otherwise, until ``max_windows``, then roll back (inconclusive is not
good enough to reach every device).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats

from edge_agent.protocol import TelemetryWindow


class RolloutConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    canary_share: float = Field(default=0.3, gt=0, lt=1)
    min_windows: int = Field(default=4, ge=2)
    """Canary windows (over all canary devices) before a decision."""
    max_windows: int = Field(default=40, ge=2)
    margin_points: float = Field(default=3.0, ge=0)
    """Non-inferiority margin on the estimated accuracy, in points."""
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    max_failure_rate: float = Field(default=0.01, ge=0)
    max_latency_ratio: float = Field(default=1.5, gt=1)
    """Canary p95 inference latency may be at most this times the control's."""


@dataclass
class CanaryVerdict:
    decision: Literal["wait", "promote", "rollback"]
    reasons: list[str] = field(default_factory=list)
    canary_accuracy: float | None = None
    control_accuracy: float | None = None
    p_noninferior: float | None = None
    canary_windows: int = 0
    control_windows: int = 0


def _acc(w: TelemetryWindow) -> float | None:
    if w.frames.inferred == 0 or w.atc_above is None:
        return None
    return w.atc_above / w.frames.inferred


def _p95(ws: Sequence[TelemetryWindow]) -> float | None:
    values = [w.latency_ms["inference"].p90 for w in ws if "inference" in w.latency_ms and w.latency_ms["inference"].p90]
    return float(np.percentile(values, 95)) if values else None


def compare_canary(canary: Sequence[TelemetryWindow], control: Sequence[TelemetryWindow], cfg: RolloutConfig) -> CanaryVerdict:
    """The decision for a canary given its windows and the control group's windows of the same period."""
    ca = [a for w in canary if (a := _acc(w)) is not None]
    co = [a for w in control if (a := _acc(w)) is not None]
    v = CanaryVerdict("wait", canary_windows=len(ca), control_windows=len(co))
    v.canary_accuracy = float(np.mean(ca)) if ca else None
    v.control_accuracy = float(np.mean(co)) if co else None
    frames = sum(w.frames.inferred + w.frames.failed for w in canary)
    failed = sum(w.frames.failed for w in canary)
    if frames and failed / frames > cfg.max_failure_rate:
        v.decision, v.reasons = "rollback", [f"frame failure rate {failed / frames:.1%} > {cfg.max_failure_rate:.1%}"]
        return v
    lat_c, lat_o = _p95(canary), _p95(control)
    if lat_c is not None and lat_o is not None and lat_c > cfg.max_latency_ratio * lat_o:
        v.decision, v.reasons = "rollback", [f"p95 inference {lat_c:.1f} ms > {cfg.max_latency_ratio:g} x control {lat_o:.1f} ms"]
        return v
    if len(ca) < cfg.min_windows or len(co) < 2:
        v.reasons = [f"waiting for windows: canary {len(ca)}/{cfg.min_windows}, control {len(co)}/2"]
        return v
    margin = cfg.margin_points / 100
    # H0: canary <= control - margin. Shifting the canary by +margin turns it into a one-sided t-test.
    p_ni = float(stats.ttest_ind(np.asarray(ca) + margin, co, equal_var=False, alternative="greater").pvalue)
    p_worse = float(stats.ttest_ind(ca, co, equal_var=False, alternative="less").pvalue)
    v.p_noninferior = p_ni
    diff = (v.canary_accuracy - v.control_accuracy) * 100  # type: ignore[operator]
    if p_ni < cfg.alpha:
        v.decision = "promote"
        v.reasons = [f"estimated accuracy {v.canary_accuracy:.1%} vs control {v.control_accuracy:.1%} "
                     f"({diff:+.1f} points; non-inferior within {cfg.margin_points:g} points, p={p_ni:.3g})"]  # fmt: skip
    elif p_worse < cfg.alpha and diff < -cfg.margin_points:
        v.decision = "rollback"
        v.reasons = [f"estimated accuracy {diff:+.1f} points vs control (p={p_worse:.3g})"]
    elif len(ca) >= cfg.max_windows:
        v.decision = "rollback"
        v.reasons = [f"inconclusive after {len(ca)} canary windows ({diff:+.1f} points, p={p_ni:.3g})"]
    else:
        v.reasons = [f"inconclusive so far ({diff:+.1f} points, p={p_ni:.3g})"]
    return v
