"""Prediction-powered accuracy: a label-free estimate corrected by a few uniformly drawn labels.

Prediction-powered inference (PPI; Angelopoulos, Bates, Fannjiang, Jordan, Zrnic, Science 2023) with
power tuning (PPI++; Angelopoulos, Duchi, Zrnic 2023), for a mean. Over a range of windows the device
inferred N frames; each has a label-free prediction f(x) of being correct (its calibrated confidence,
plus the window regressor's correction when there is one), known from the telemetry histograms alone.
n audit frames (drawn uniformly by the device, ``Sample.reason == "audit"``) were labelled, so their
correctness Y is known. The estimate of the accuracy is::

    theta = lambda * mean_N f  +  mean_n (Y - lambda * f)

The second term (the *rectifier*) removes the label-free estimate's bias, whatever it is: a confidently
wrong model cannot hide from it. ``lambda`` (power tuning) is fitted from the data, clipped to [0, 1]:
0 is the labels alone, 1 is classic PPI. Its variance is
``lambda^2 Var(f) / N + Var(Y - lambda f) / n``; the interval is the **normal approximation**
``theta +- z * se`` (z = 1.96 for 95%). Two pseudo-labels (one right, one wrong, at the mean f) are added
to the variance estimate only, so a handful of all-correct labels does not give a zero-width interval.

Audit frames of windows with different sizes or audit counts have different inclusion probabilities;
each label is weighted by 1 / inclusion (a Hajek weighted mean; the variance uses Kish's effective n).
Frames chosen for low confidence must never enter: their Y is not a random draw.

>>> audit = [AuditLabel(ts=0.0, correct=c, score=0.9) for c in [True] * 14 + [False] * 6]
>>> est = ppi_mean(0.9, 0.01, 3000, audit)
>>> round(est.estimate, 3), est.labels          # 70% of the audit frames were right, f said 90%
(0.7, 20)
>>> est.low < 0.7 < est.high
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AuditLabel:
    """One labelled audit frame: when, whether the model's top-1 was right, its label-free score."""

    ts: float
    correct: bool
    score: float
    """The label-free prediction f(x) that this frame is correct (e.g. its calibrated confidence)."""
    weight: float = 1.0
    """1 / inclusion probability (uniform audits of equal windows: all equal)."""


@dataclass(frozen=True)
class PPIEstimate:
    """A prediction-powered accuracy estimate with its normal-approximation interval."""

    estimate: float
    low: float
    high: float
    se: float
    labels: int
    lam: float
    """Power-tuning weight on the label-free predictions (0: labels only, 1: classic PPI)."""
    label_free: float
    """mean_N f: the label-free estimate the labels corrected."""


def ppi_mean(
    f_mean: float,
    f_var: float,
    frames: int,
    audit: Sequence[AuditLabel],
    *,
    z: float = 1.96,
    lam: float | None = None,
) -> PPIEstimate | None:
    """PPI++ estimate of the mean of Y from ``frames`` unlabelled predictions (their mean ``f_mean`` and
    variance ``f_var``) and the labelled ``audit`` frames; None without labels."""
    if not audit:
        return None
    y = np.array([a.correct for a in audit], np.float64)
    f = np.array([a.score for a in audit], np.float64)
    w = np.array([a.weight for a in audit], np.float64)
    w = w / w.sum()
    n = len(audit)
    n_eff = 1.0 / float((w**2).sum())
    N = max(frames, 1)
    fy, ff = float(w @ y), float(w @ f)
    if lam is None:  # PPI++: the lambda that minimises the variance, estimated (clipped to [0, 1])
        cov = float(w @ ((y - fy) * (f - ff)))
        var_f = (f_var + float(w @ (f - ff) ** 2)) / 2
        lam = float(np.clip(cov / ((1 + n_eff / N) * var_f), 0.0, 1.0)) if var_f > 1e-12 else 0.0
    theta = lam * f_mean + fy - lam * ff
    # variance of the rectifier, with one right and one wrong pseudo-label at the mean score
    r = np.concatenate([y - lam * f, [1 - lam * ff, -lam * ff]])
    wr = np.concatenate([w * n_eff, [1.0, 1.0]])
    r_mean = float(wr @ r / wr.sum())
    var_r = float(wr @ (r - r_mean) ** 2 / (wr.sum() - 1))
    se = float(np.sqrt(lam**2 * f_var / N + var_r / n_eff))
    est = float(np.clip(theta, 0.0, 1.0))
    return PPIEstimate(est, max(0.0, theta - z * se), min(1.0, theta + z * se), se, n, lam, float(f_mean))
