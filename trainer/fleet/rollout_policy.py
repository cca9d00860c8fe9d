"""Canary analysis: does the canary cohort (new model) do at least as well as it did, and as the control?

Pure logic. Units are telemetry windows (frames within a window are correlated, windows much less). The
effect is a difference in differences of a per-window label-free accuracy estimate::

    effect = (canary after - canary before) - (control after - control before)

where *before* is the look-back period on the champion and *after* the canary period. Each device is
compared with itself (the mean over a group's devices of after - before), which removes the differences
between devices (a shift may hit some devices and not others, a small fleet's random cohort is rarely
balanced, and pooling windows across unlike devices would bury the effect in their spread);
subtracting the control's change removes what happened to everyone meanwhile. The variance of a
window's estimate comes from the windows around their own device's mean, pooled. Without control
devices it falls back to canary after - before, without a before period to canary vs control.
A one-sided non-inferiority test (normal approximation), run only at a few fixed canary window counts
(:func:`decision_points`, Bonferroni across them), then decides: promote when the effect is
significantly above ``-margin``, roll back when it is significantly below ``-margin``; hard limits on
frame failures and p95 inference latency roll back at once; after ``max_windows`` still inconclusive,
roll back (inconclusive is not good enough to reach every device).

The per-window estimate is a parameter (``estimate``): pass
:func:`trainer.drift.accuracy.window_estimator` with both models' references to use calibrated confidence
(or the window regressor) from each window's own model reference; the default is ATC
(``atc_above / inferred``), which needs no reference. Audit labels are too few per canary window for
PPI here; the difference in differences already cancels a shared bias of the estimate.

A retrained candidate is meant to gain on the devices it was retrained for and to hold on the rest, so
with ``retrained_for`` the effect is estimated in each of the two strata and weighted by their share of
the devices: pooled, the devices that gained would look like noise (the larger the gain, the wider the
spread between devices and the less conclusive the test). Each stratum must also not be significantly
worse than ``-margin`` on its own (rolled back) and its estimate must be above ``-margin`` (else no
promotion, and a roll back at the last look): a gain on the drifted cameras cannot buy a loss on the
others.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
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
    max_wait_s: float = Field(default=3600.0, gt=0)
    """A canary that has not sent ``min_windows`` windows this long after its release (its devices
    crashed, went offline or never took it) is rolled back."""
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


WindowEstimate = Callable[[TelemetryWindow], "float | None"]
"""A per-window accuracy estimate (None when the window cannot be estimated)."""


def atc_window(w: TelemetryWindow) -> float | None:
    """ATC of one window (the default estimate: it needs no reference)."""
    if w.frames.inferred == 0 or w.atc_above is None:
        return None
    return w.atc_above / w.frames.inferred


def _p95(ws: Sequence[TelemetryWindow]) -> float | None:
    values = [
        w.latency_ms["inference"].p90
        for w in ws
        if "inference" in w.latency_ms and w.latency_ms["inference"].p90
    ]
    return float(np.percentile(values, 95)) if values else None


def _mean_var(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.var(ddof=1) / len(a)) if len(a) > 1 else 0.0


def _per_device(ws: Sequence[TelemetryWindow], acc: WindowEstimate) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for w in ws:
        if (a := acc(w)) is not None:
            out.setdefault(w.device, []).append(a)
    return out


def _pooled_window_variance(cells: Sequence[Sequence[float]]) -> float | None:
    """Variance of one window's estimate around its device's mean in the same period, pooled over cells."""
    ss = sum(float(((np.asarray(c) - np.mean(c)) ** 2).sum()) for c in cells if len(c) > 1)
    dof = sum(len(c) - 1 for c in cells if len(c) > 1)
    return ss / dof if dof else None


def _paired(
    after: dict[str, list[float]], before: dict[str, list[float]], s2: float
) -> tuple[float, float] | None:
    """Mean over devices of (after - before) and its variance: each device is compared with itself."""
    both = [d for d in after if d in before]
    if not both:
        return None
    deltas = [np.mean(after[d]) - np.mean(before[d]) for d in both]
    var = sum(s2 * (1 / len(after[d]) + 1 / len(before[d])) for d in both) / len(both) ** 2
    if len(both) >= 3:  # devices may also change differently from each other: take the larger estimate
        var = max(var, float(np.var(deltas, ddof=1)) / len(both))
    return float(np.mean(deltas)), var


def decision_points(cfg: RolloutConfig) -> list[int]:
    """Canary window counts at which the test is run: min_windows, doubling, up to max_windows. A test
    repeated at every new window would promote a too-weak candidate far more often than ``alpha``; with
    a few fixed looks, Bonferroni (``alpha / looks``) keeps the error at most ``alpha``."""
    points, n = [], cfg.min_windows
    while n < cfg.max_windows:
        points.append(n)
        n *= 2
    return [*points, cfg.max_windows]


@dataclass
class Effect:
    """An estimated accuracy effect (fraction), its variance, how it was compared and, when stratified,
    each stratum's own effect."""

    value: float
    var: float
    how: str
    strata: dict[str, Effect] = field(default_factory=dict)


def _effect(
    canary: Sequence[TelemetryWindow],
    control: Sequence[TelemetryWindow],
    canary_before: Sequence[TelemetryWindow],
    control_before: Sequence[TelemetryWindow],
    acc: WindowEstimate = atc_window,
) -> Effect | None:
    """The effect from the strongest comparison the windows support."""
    ca, co, cb, ob = (_per_device(ws, acc) for ws in (canary, control, canary_before, control_before))
    s2 = _pooled_window_variance([c for g in (ca, co, cb, ob) for c in g.values()])
    if s2 is not None and (c := _paired(ca, cb, s2)) is not None:
        if (o := _paired(co, ob, s2)) is not None:
            return Effect(c[0] - o[0], c[1] + o[1], "difference in differences")
        return Effect(c[0], c[1], "vs before")
    flat_ca = [a for c in ca.values() for a in c]
    flat_co = [a for c in co.values() for a in c]
    if len(flat_ca) >= 2 and len(flat_co) >= 2:
        (mc, vc), (mo, vo) = _mean_var(flat_ca), _mean_var(flat_co)
        return Effect(mc - mo, vc + vo, "vs control")
    return None


def _stratified_effect(
    canary: Sequence[TelemetryWindow],
    control: Sequence[TelemetryWindow],
    canary_before: Sequence[TelemetryWindow],
    control_before: Sequence[TelemetryWindow],
    acc: WindowEstimate,
    retrained_for: set[str],
) -> Effect | None:
    """The effect on the devices the candidate was retrained for and on the others, weighted by their
    share of the devices seen; unstratified when either stratum has no canary device to judge."""
    lists = (canary, control, canary_before, control_before)
    pooled = _effect(*lists, acc)
    if not retrained_for:
        return pooled
    parts: dict[str, tuple[Effect | None, int]] = {}
    for name, inside in (("retrained-for devices", True), ("other devices", False)):
        ca, co, cb, ob = ([w for w in ws if (w.device in retrained_for) == inside] for ws in lists)
        devices = {w.device for ws in (ca, co, cb, ob) for w in ws}
        parts[name] = (_effect(ca, co, cb, ob, acc) if ca else None, len(devices))
    if any(e is None for e, _ in parts.values()):
        return pooled
    total = sum(n for _, n in parts.values())
    strata = {name: e for name, (e, _) in parts.items() if e is not None}
    weights = {name: n / total for name, (_, n) in parts.items()}
    return Effect(
        sum(weights[k] * e.value for k, e in strata.items()),
        sum(weights[k] ** 2 * e.var for k, e in strata.items()),
        "weighted by device share: "
        + ", ".join(f"{k} {e.value * 100:+.1f} {e.how}" for k, e in strata.items()),
        strata,
    )


def compare_canary(
    canary: Sequence[TelemetryWindow],
    control: Sequence[TelemetryWindow],
    cfg: RolloutConfig,
    canary_before: Sequence[TelemetryWindow] = (),
    control_before: Sequence[TelemetryWindow] = (),
    estimate: WindowEstimate | None = None,
    retrained_for: Collection[str] = (),
) -> CanaryVerdict:
    """The decision for a canary, from its windows and the control group's, after and before it started;
    ``estimate`` gives each window's accuracy (default :func:`atc_window`); ``retrained_for`` names the
    devices whose field samples the candidate was retrained on (the effect is then stratified)."""
    acc = estimate or atc_window
    groups = {
        name: [a for w in ws if (a := acc(w)) is not None]
        for name, ws in (("ca", canary), ("co", control), ("cb", canary_before), ("ob", control_before))
    }
    ca, co = groups["ca"], groups["co"]
    v = CanaryVerdict("wait", canary_windows=len(ca), control_windows=len(co))
    v.canary_accuracy = float(np.mean(ca)) if ca else None
    v.control_accuracy = float(np.mean(co)) if co else None
    unhealthy = _health_rollback(canary, control, len(ca), cfg)
    if unhealthy:
        v.decision, v.reasons = "rollback", [unhealthy]
        return v
    looks = decision_points(cfg)
    at = max((n for n in looks if n <= len(ca)), default=0)
    scored = sorted((w for w in canary if acc(w) is not None), key=lambda w: w.end)[
        :at
    ]  # the same at every poll
    effect = (
        _stratified_effect(scored, control, canary_before, control_before, acc, set(retrained_for))
        if at
        else None
    )
    if len(ca) < cfg.min_windows or effect is None:
        v.reasons = [
            f"waiting for windows: canary {len(ca)}/{cfg.min_windows}, before {len(groups['cb'])}, "
            f"control {len(co)}"
        ]
        return v
    _sequential_test(v, effect, at=at, looks=len(looks), cfg=cfg)
    return v


def _health_rollback(
    canary: Sequence[TelemetryWindow], control: Sequence[TelemetryWindow], scored: int, cfg: RolloutConfig
) -> str | None:
    """Why the canary must roll back whatever its accuracy (failed frames, slow inference), or None."""
    frames = sum(w.frames.inferred + w.frames.failed for w in canary)
    failed = sum(w.frames.failed for w in canary)
    if frames and failed / frames > cfg.max_failure_rate:
        return f"frame failure rate {failed / frames:.1%} > {cfg.max_failure_rate:.1%}"
    lat_c, lat_o = _p95(canary), _p95(control)  # judged on min_windows: a swap's first window runs cold
    if (
        scored >= cfg.min_windows
        and lat_c is not None
        and lat_o is not None
        and lat_c > cfg.max_latency_ratio * lat_o
    ):
        return f"p95 inference {lat_c:.1f} ms > {cfg.max_latency_ratio:g} x control {lat_o:.1f} ms"
    return None


def _sequential_test(v: CanaryVerdict, effect: Effect, *, at: int, looks: int, cfg: RolloutConfig) -> None:
    """Non-inferiority at this decision point (alpha spent evenly over the looks): promote, roll back
    (worse beyond the margin overall or in a stratum, or inconclusive at the last look) or keep waiting;
    written into ``v``."""
    margin = cfg.margin_points / 100
    alpha = cfg.alpha / looks

    def p_values(e: Effect) -> tuple[float, float]:
        z = (e.value + margin) / max(float(np.sqrt(e.var)), 1e-4)
        return float(stats.norm.sf(z)), float(stats.norm.cdf(z))  # H0: effect <= -margin; >= -margin

    p_ni, p_worse = p_values(effect)
    v.p_noninferior = p_ni
    text = f"estimated accuracy effect {effect.value * 100:+.1f} points ({effect.how}, {at} canary windows)"
    worse_stratum = [(k, p) for k, e in effect.strata.items() if (p := p_values(e)[1]) < alpha]
    beyond = [k for k, e in effect.strata.items() if e.value < -margin]
    if worse_stratum:
        k, p = worse_stratum[0]
        v.decision, v.reasons = (
            "rollback",
            [f"{text}: worse by more than {cfg.margin_points:g} points on the {k}, p={p:.3g}"],
        )
    elif beyond:  # not shown worse yet, but never promoted on the others' gain
        v.decision = "rollback" if at >= cfg.max_windows else "wait"
        v.reasons = [f"{text}: the {beyond[0]} are below the {cfg.margin_points:g}-point margin"]
    elif p_ni < alpha:
        v.decision, v.reasons = (
            "promote",
            [f"{text}: non-inferior within {cfg.margin_points:g} points, p={p_ni:.3g}"],
        )
    elif p_worse < alpha:
        v.decision, v.reasons = (
            "rollback",
            [f"{text}: worse by more than {cfg.margin_points:g} points, p={p_worse:.3g}"],
        )
    elif at >= cfg.max_windows:
        v.decision, v.reasons = "rollback", [f"{text}: inconclusive after {at} windows, p={p_ni:.3g}"]
    else:
        v.reasons = [f"{text}: inconclusive so far, p={p_ni:.3g}"]
