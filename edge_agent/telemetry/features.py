"""Per-frame features: output confidence statistics and cheap input image statistics.

Input statistics are computed on the model-input-sized frame (already downscaled by preprocessing,
e.g. 224x224), never on the full camera frame, so they cost well under a millisecond. The trainer
imports :func:`input_statistics` to build reference histograms on exactly what devices see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

_EPS = 1e-12


@dataclass(frozen=True, slots=True)
class OutputFeatures:
    """Summary of one probability vector."""

    top1: int
    confidence: float
    entropy: float
    margin: float


def output_features(probs: np.ndarray) -> list[OutputFeatures]:
    """Top-1, max-softmax confidence, entropy (nats) and top-1/top-2 margin of each row of ``probs``."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = p[None, :]
    top1 = p.argmax(axis=1)
    if p.shape[1] >= 2:
        top2 = np.partition(p, -2, axis=1)[:, -2:]
        conf = top2[:, 1]
        margin = top2[:, 1] - top2[:, 0]
    else:
        conf = p[:, 0]
        margin = conf.copy()
    entropy = -(p * np.log(np.clip(p, _EPS, 1.0))).sum(axis=1)
    return [
        OutputFeatures(int(t), float(c), float(max(e, 0.0)), float(m))
        for t, c, e, m in zip(top1, conf, entropy, margin)
    ]


@dataclass(frozen=True, slots=True)
class InputStatistics:
    """Image statistics of the model-input-sized frame, each scaled to a fixed range."""

    brightness: float
    """Mean luma / 255."""
    contrast: float
    """RMS contrast: standard deviation of luma / 255."""
    log_laplacian_var: float
    """log10(1 + variance of the Laplacian of luma): low for blurred or dirty-lens frames."""
    saturation: float
    """Mean HSV saturation / 255: low for washed-out or grey scenes."""

    def as_dict(self) -> dict[str, float]:
        return {
            "brightness": self.brightness,
            "contrast": self.contrast,
            "log_laplacian_var": self.log_laplacian_var,
            "saturation": self.saturation,
        }


def input_statistics(image: np.ndarray, color: str = "RGB") -> InputStatistics:
    """Statistics of an HxWx3 uint8 frame in ``color`` order (``RGB`` or ``BGR``)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {image.shape} dtype {image.dtype}")
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY if color == "RGB" else cv2.COLOR_BGR2GRAY)
    mean, std = cv2.meanStdDev(gray)
    lap = cv2.Laplacian(gray, cv2.CV_32F)
    _, lap_std = cv2.meanStdDev(lap)
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV if color == "RGB" else cv2.COLOR_BGR2HSV)
    sat = cv2.mean(hsv)[1]
    return InputStatistics(
        brightness=float(mean[0, 0]) / 255.0,
        contrast=float(std[0, 0]) / 255.0,
        log_laplacian_var=math.log10(1.0 + float(lap_std[0, 0]) ** 2),
        saturation=float(sat) / 255.0,
    )
