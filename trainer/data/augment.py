"""Training augmentation on camera frames (before the edge preprocessing), deterministic per image and view.

Features are cached per (image, view) (see :mod:`trainer.model.features`), so augmentation draws a fixed
set of views per image instead of fresh ones every epoch; view ``v`` of an image is reproducible from
``(seed, image sha256, v)`` alone, independent of the rest of the dataset.
"""

from __future__ import annotations

import cv2
import numpy as np

AUGMENT_VERSION = "aug1"
"""Bump when :func:`augment` changes, so cached features of augmented views are recomputed."""


def view_rng(seed: int, sha256: str, view: int) -> np.random.Generator:
    return np.random.default_rng([seed, int(sha256[:15], 16), view])


def augment(frame: np.ndarray, rng: np.random.Generator, hflip: bool = True) -> np.ndarray:
    """Random crop (75-100% of the side), flip, small rotation, brightness/contrast/saturation jitter."""
    h, w = frame.shape[:2]
    s = rng.uniform(0.75, 1.0)
    ar = np.exp(rng.uniform(-0.1, 0.1))
    ch, cw = min(h, int(h * s / ar)), min(w, int(w * s * ar))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = cv2.resize(frame[y0 : y0 + ch, x0 : x0 + cw], (w, h), interpolation=cv2.INTER_LINEAR)
    if hflip and rng.random() < 0.5:
        out = out[:, ::-1]
    angle = rng.uniform(-12, 12)
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    out = cv2.warpAffine(out, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    alpha, beta = rng.uniform(0.75, 1.25), rng.uniform(-20, 20)
    out = cv2.convertScaleAbs(out, alpha=alpha, beta=beta)
    hsv = cv2.cvtColor(out, cv2.COLOR_BGR2HSV).astype(np.float32)
    hsv[..., 1] *= rng.uniform(0.75, 1.25)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-4, 4)) % 180
    return cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2BGR)
