"""Measuring the drift engine and the accuracy estimates on simulated streams (tests and benchmarks).

Every function takes :class:`~trainer.sim.telemetry.FramePool` objects (frames already run through the
device artifact) and builds windows by resampling them, so the numbers are cheap to measure at scale:

* :func:`false_alarms` runs a fleet of clean devices through :class:`DriftMonitor` for many steps and
  counts entries into ``drift`` (the rate per device-week is what operators feel);
* :func:`detection_delays` starts each trial with clean windows, switches the stream to a shifted
  condition at a window boundary and records after how many shifted windows the state is ``drift``;
* :func:`estimation_errors` compares ATC, ATC-NE and average confidence with the true accuracy, per
  condition (all of a pool's frames: the stream's accuracy) and per window.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from edge_agent.protocol import TelemetryWindow
from edge_agent.reference import ReferenceStats
from trainer.drift.detector import DriftConfig, DriftMonitor
from trainer.drift.estimate import estimate_accuracy
from trainer.sim.telemetry import WINDOW_FRAMES, FramePool

WINDOWS_PER_DEVICE_WEEK = 7 * 24 * 60
"""One-minute windows in a week (10,080)."""


def draw_frames(
    rng: np.random.Generator, pool_size: int, windows: int, window_frames: int, frames_per_scene: int = 1
) -> np.ndarray:
    """Frame indices (``windows`` x ``window_frames``): scenes drawn with replacement, each seen for
    ``frames_per_scene`` consecutive frames (1: every frame a new scene; 5: an object stays 1 s at 5 fps)."""
    scenes = -(-window_frames // frames_per_scene)
    idx = rng.integers(0, pool_size, (windows, scenes))
    return np.repeat(idx, frames_per_scene, axis=1)[:, :window_frames]


@dataclass
class FalseAlarms:
    """Clean-stream behaviour of the engine over ``windows`` device windows."""

    devices: int
    steps: int
    windows: int
    drift_entries: int
    warning_entries: int
    flagged_windows: int
    window_frames: int

    @property
    def device_weeks(self) -> float:
        return self.windows / WINDOWS_PER_DEVICE_WEEK

    @property
    def per_device_week(self) -> float:
        return self.drift_entries / self.device_weeks

    @property
    def flagged_rate(self) -> float:
        return self.flagged_windows / self.windows

    def as_dict(self) -> dict[str, float]:
        return {
            **asdict(self),
            "device_weeks": self.device_weeks,
            "per_device_week": self.per_device_week,
            "flagged_rate": self.flagged_rate,
        }


def false_alarms(
    pool: FramePool,
    reference: ReferenceStats,
    *,
    devices: int,
    steps: int,
    cfg: DriftConfig | None = None,
    rng: np.random.Generator,
    window_frames: int = WINDOW_FRAMES,
    frames_per_scene: int = 1,
) -> FalseAlarms:
    """``devices`` clean devices assessed together (BH across them) for ``steps`` windows each."""
    monitor = DriftMonitor(cfg)
    drift = warn = flagged = 0
    names = [f"cam{i:04d}" for i in range(devices)]
    for step in range(steps):
        idx = draw_frames(rng, len(pool), devices, window_frames, frames_per_scene)
        windows = {d: pool.fast_window(idx[i], device=d, seq=step) for i, d in enumerate(names)}
        assessments, transitions = monitor.step(windows, reference)
        flagged += sum(len(a.flagged_features) >= monitor.cfg.min_features for a in assessments)
        drift += sum(t.new == "drift" for t in transitions)
        warn += sum(t.new == "warning" for t in transitions)
    return FalseAlarms(devices, steps, devices * steps, drift, warn, flagged, window_frames)


@dataclass
class Detection:
    """Delays (shifted windows until ``drift``; None = not within ``max_windows``) over trials."""

    condition: str
    delays: list[int | None]
    max_windows: int

    @property
    def rate_within(self) -> dict[int, float]:
        """Share of trials detected within k windows, for k = 1..max_windows."""
        n = len(self.delays)
        return {
            k: sum(d is not None and d <= k for d in self.delays) / n for k in range(1, self.max_windows + 1)
        }

    @property
    def median_delay(self) -> float | None:
        found = [d for d in self.delays if d is not None]
        if len(found) * 2 < len(self.delays):
            return None  # most trials never detected
        return float(np.median([d if d is not None else self.max_windows + 1 for d in self.delays]))


def detection_delays(
    clean: FramePool,
    shifted: FramePool,
    reference: ReferenceStats,
    *,
    trials: int,
    cfg: DriftConfig | None = None,
    rng: np.random.Generator,
    warmup: int = 5,
    max_windows: int = 6,
    window_frames: int = WINDOW_FRAMES,
    frames_per_scene: int = 1,
) -> Detection:
    """Each trial: ``warmup`` clean windows (the device has been running: its dispersion is learnt), then
    shifted ones until ``drift`` (or ``max_windows``)."""
    delays: list[int | None] = []
    for _ in range(trials):
        monitor = DriftMonitor(cfg)
        for k, idx in enumerate(draw_frames(rng, len(clean), warmup, window_frames, frames_per_scene)):
            monitor.step({"cam": clean.fast_window(idx, device="cam", seq=k)}, reference)
        delay = None
        for k in range(1, max_windows + 1):
            (idx,) = draw_frames(rng, len(shifted), 1, window_frames, frames_per_scene)
            w = shifted.fast_window(idx, device="cam", seq=warmup + k)
            monitor.step({"cam": w}, reference)
            if monitor.state("cam") == "drift":
                delay = k
                break
        delays.append(delay)
    return Detection(shifted.condition.name, delays, max_windows)


ESTIMATES: tuple[str, ...] = ("atc", "atc_ne", "average_confidence")


@dataclass
class EstimationError:
    """Label-free estimates against the true accuracy of one condition: over all of its frames (the
    stream's accuracy) and the mean absolute error over single windows."""

    condition: str
    frames: int
    accuracy: float
    stream: dict[str, float | None]
    """Estimate name (:data:`ESTIMATES`) -> estimate over all frames."""
    window_mae: dict[str, float | None]
    """Estimate name -> mean |estimate - true accuracy| over single windows."""

    def error(self, name: str) -> float | None:
        v = self.stream[name]
        return None if v is None else v - self.accuracy


def _estimates(windows: list[TelemetryWindow], reference: ReferenceStats) -> dict[str, float | None]:
    est = estimate_accuracy(windows, reference)
    return {"atc": est.atc, "atc_ne": est.atc_ne, "average_confidence": est.average_confidence}


def estimation_errors(
    pool: FramePool,
    reference: ReferenceStats,
    *,
    windows: int,
    rng: np.random.Generator,
    window_frames: int = WINDOW_FRAMES,
) -> EstimationError:
    """Estimates over all of the pool's frames and over ``windows`` resampled windows."""
    errs: dict[str, list[float]] = {k: [] for k in ESTIMATES}
    for s in pool.windows(windows, rng, size=window_frames):
        for k, v in _estimates([s.window], reference).items():
            if v is not None:
                errs[k].append(abs(v - s.true_accuracy))
    whole = pool.fast_window(np.arange(len(pool)))
    return EstimationError(
        condition=pool.condition.name,
        frames=len(pool),
        accuracy=pool.accuracy,
        stream=_estimates([whole], reference),
        window_mae={k: float(np.mean(v)) if v else None for k, v in errs.items()},
    )


def mae_points(errors: Mapping[str, EstimationError]) -> dict[str, float | None]:
    """Mean absolute error in accuracy points over conditions: stream level (``atc``...) and per window
    (``window_atc``...)."""
    e = list(errors.values())
    out: dict[str, float | None] = {"conditions": len(e)}
    for k in ESTIMATES:
        stream = [abs(err) for x in e if (err := x.error(k)) is not None]
        window = [v for x in e if (v := x.window_mae[k]) is not None]
        out[k] = 100 * float(np.mean(stream)) if stream else None
        out[f"window_{k}"] = 100 * float(np.mean(window)) if window else None
    return out
