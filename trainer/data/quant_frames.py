"""Calibration frames for int8 quantization: seeded, augmented views of the frames a package's data offers.

int8 ranges are set by the calibration frames, so they must cover what a camera sends: dark and bright
scenes, soft focus, sensor noise, near and far. Issue 9 measured retrained candidates losing 3-7 points
in int8 on night frames whose activations sat at the bottom of ranges set by bright ones. Each view here
is a random crop (scale) of a source frame with one of: nothing, a lighting change, a blur, or sensor
noise (:mod:`trainer.data.corruptions` at severities 1-3), chosen and drawn from ``seed`` alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from trainer.data.corruptions import corrupt

BLURS = ("defocus_blur", "motion_blur")
NOISES = ("gaussian_noise", "shot_noise")


def _crop(frame: np.ndarray, rng: np.random.Generator, min_scale: float) -> np.ndarray:
    """A random crop keeping the frame's aspect ratio, ``min_scale``..1 of its side, resized back."""
    h, w = frame.shape[:2]
    s = rng.uniform(min_scale, 1.0)
    ch, cw = max(8, int(h * s)), max(8, int(w * s))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = frame[y : y + ch, x : x + cw]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return cv2.resize(np.ascontiguousarray(out), (w, h), interpolation=cv2.INTER_AREA)


def _light(frame: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dusk/night (gain 0.2-0.6, lifted blacks), or over-exposure (gain 1.2-1.6), with a gamma change."""
    gain = rng.uniform(0.2, 0.6) if rng.random() < 0.7 else rng.uniform(1.2, 1.6)
    gamma = rng.uniform(0.8, 1.25)
    f = (frame.astype(np.float32) / 255.0) ** gamma * gain * 255.0 + rng.uniform(0, 10)
    return np.clip(f, 0, 255).astype(np.uint8)


def _shrink(frame: np.ndarray, max_side: int) -> np.ndarray:
    """The frame scaled down so its longer side is at most ``max_side`` (models take 128-224 px)."""
    h, w = frame.shape[:2]
    if max(h, w) <= max_side:
        return frame
    s = max_side / max(h, w)
    return cv2.resize(frame, (max(8, round(w * s)), max(8, round(h * s))), interpolation=cv2.INTER_AREA)


def augmented_views(
    frames: Sequence[np.ndarray], count: int, seed: int, min_scale: float = 0.5, max_side: int = 640
) -> list[np.ndarray]:
    """``count`` views of ``frames`` (round robin): crop, then 1/4 each plain, light, blur, noise.
    Views are at most ``max_side`` pixels wide or high (camera frames are 640x480): smaller views
    cost less to corrupt (320 px: 4x less), but 640 is what bench/int8_search.py measured."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        f = _crop(_shrink(frames[i % len(frames)], max_side), rng, min_scale)
        kind = int(rng.integers(0, 4))
        if kind == 1:
            f = _light(f, rng)
        elif kind == 2:
            f = corrupt(f, BLURS[int(rng.integers(0, 2))], int(rng.integers(1, 4)), rng)
        elif kind == 3:
            f = corrupt(f, NOISES[int(rng.integers(0, 2))], int(rng.integers(1, 4)), rng)
        out.append(f)
    return out
