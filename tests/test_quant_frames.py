"""Calibration views for int8: seeded, as many as asked, and covering dark, soft and noisy frames."""

from __future__ import annotations

import cv2
import numpy as np

from trainer.data.quant_frames import augmented_views


def _sources(n: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    out = []
    for _ in range(n):
        img = cv2.resize(
            rng.integers(0, 128, (12, 16, 3), dtype=np.uint8), (160, 120), interpolation=cv2.INTER_NEAREST
        )
        out.append(img + 64)  # mid-grey scenes of flat patches with sharp edges
    return out


def _sharpness(f: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(f, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var())


def test_views_are_reproducible_per_seed_and_differ_between_seeds() -> None:
    src = _sources()
    a, b, c = augmented_views(src, 24, 3), augmented_views(src, 24, 3), augmented_views(src, 24, 4)
    assert len(a) == 24 and all(f.shape == src[0].shape and f.dtype == np.uint8 for f in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sum(np.array_equal(x, y) for x, y in zip(a, c)) == 0


def test_views_cover_darker_brighter_noisier_and_softer_frames_than_the_sources() -> None:
    src = _sources()
    views = augmented_views(src, 200, 0)
    means = np.array([f.mean() for f in views])
    src_means = [f.mean() for f in src]
    assert means.min() < 0.7 * min(src_means), "no dark (dusk/night) views"
    assert means.max() > 1.15 * max(src_means), "no over-exposed views"
    # noise raises the Laplacian variance of flat patches, blur lowers that of sharp edges
    sharp = np.array([_sharpness(f) for f in views])
    src_sharp = [_sharpness(f) for f in src]
    assert sharp.max() > 4 * max(src_sharp), "no noisy views"
    assert sharp.min() < 0.5 * min(src_sharp), "no blurred views"
