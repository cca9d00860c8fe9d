"""Label-free accuracy estimates from telemetry windows.

ATC (Average Thresholded Confidence, Garg et al., ICLR 2022): the share of frames whose calibrated
max-softmax confidence exceeds the threshold t fitted on labelled held-out data (where that share
equals accuracy). Devices count the frames above t exactly (``atc_above``). The plain average
confidence (``confidence_mean``) is reported beside it as the baseline it improves on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from edge_agent.protocol import TelemetryWindow


@dataclass(frozen=True)
class AccuracyEstimate:
    frames: int
    atc: float | None
    average_confidence: float | None


def estimate_accuracy(windows: Iterable[TelemetryWindow]) -> AccuracyEstimate:
    """Frame-weighted ATC and average-confidence estimates over one or more windows of one model."""
    frames = above = 0
    conf_sum = 0.0
    has_atc = True
    for w in windows:
        n = w.frames.inferred
        if n == 0:
            continue
        frames += n
        if w.confidence_mean is not None:
            conf_sum += w.confidence_mean * n
        if w.atc_above is None:
            has_atc = False
        else:
            above += w.atc_above
    if frames == 0:
        return AccuracyEstimate(0, None, None)
    return AccuracyEstimate(frames, above / frames if has_atc else None, conf_sum / frames)

