"""When to retrain: drift that persists or an estimated accuracy drop, enough new labels, a cooldown.

Pure logic: the service passes in what it observed and acts on the decision.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class RetrainPolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    drift_windows: tuple[int, int] = (2, 3)
    """Drift persists when a device was in drift in K of its last N assessed windows."""
    accuracy_drop_points: float = Field(default=8.0, gt=0)
    """...or when its estimated accuracy (PPI++ with audit labels, else label-free) is this many points
    below the reference accuracy, and (when it has an interval) the interval's top is below it too."""
    min_labels: int = Field(default=60, ge=1)
    """Labelled field samples (since the champion was trained) needed before retraining."""
    cooldown_s: float = Field(default=600.0, ge=0)
    """Minimum time between two retraining runs (successful or not)."""


@dataclass(frozen=True)
class DeviceHealth:
    """What the service knows about one device running the champion."""

    recent_drift: tuple[bool, ...]
    """Whether each of the device's most recent assessed windows was in the drift state (oldest first)."""
    estimated_accuracy: float | None
    """Accuracy estimate over its recent windows (:func:`trainer.drift.accuracy.estimate_device_accuracy`)."""
    interval: tuple[float, float] | None = None
    """95% interval of the estimate (normal approximation; only with audit labels)."""
    method: str = "atc"
    """How it was estimated: ``ppi++``, ``regressor``, ``calibrated``, ``atc``, ``average_confidence``."""
    labels: int = 0
    """Audit labels the estimate used (PPI++)."""


@dataclass(frozen=True)
class RetrainDecision:
    retrain: bool
    reason: str
    triggered_by: tuple[str, ...] = ()


def decide_retrain(
    devices: Mapping[str, DeviceHealth],
    reference_accuracy: float | None,
    labels_available: int,
    now: float,
    last_run: float | None,
    cfg: RetrainPolicyConfig,
) -> RetrainDecision:
    """Whether to start a retraining run now, and why (or why not yet)."""
    k, n = cfg.drift_windows
    drifting = sorted(d for d, h in devices.items() if sum(h.recent_drift[-n:]) >= k)
    dropped = sorted(
        d
        for d, h in devices.items()
        if reference_accuracy is not None
        and h.estimated_accuracy is not None
        and (reference_accuracy - h.estimated_accuracy) * 100 >= cfg.accuracy_drop_points
        and (h.interval is None or h.interval[1] < reference_accuracy)  # a drop the labels support
    )
    triggered = tuple(sorted(set(drifting) | set(dropped)))
    if not triggered:
        return RetrainDecision(False, "no persistent drift or accuracy drop")
    why = []
    if drifting:
        why.append(f"drift in {k} of the last {n} windows on {', '.join(drifting)}")
    if dropped:
        why.append(f"estimated accuracy down >= {cfg.accuracy_drop_points:g} points on {', '.join(dropped)}")
    if labels_available < cfg.min_labels:
        return RetrainDecision(
            False, f"waiting for labels: {labels_available}/{cfg.min_labels} ({'; '.join(why)})", triggered
        )
    if last_run is not None and now - last_run < cfg.cooldown_s:
        return RetrainDecision(
            False, f"cooldown: {cfg.cooldown_s - (now - last_run):.0f} s left ({'; '.join(why)})", triggered
        )
    return RetrainDecision(True, "; ".join(why), triggered)
