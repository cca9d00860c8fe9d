"""Real photographs shipped inside scikit-image, and camera-like frames cut from them.

No download: only images present in the installed package are used. They are the pretrained model's
calibration and check data and the demo's camera input.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

# Colour photographs of real scenes in skimage/data (files shipped in the wheel, not fetched).
PHOTO_FILES = {
    "chelsea": "chelsea.png",  # a tabby cat
    "coffee": "coffee.png",  # a cup of coffee on a saucer
    "astronaut": "astronaut.png",
    "rocket": "rocket.jpg",
    "camera": "camera.png",  # the cameraman (grey)
    "hubble_deep_field": "hubble_deep_field.jpg",
    "retina": "retina.jpg",
    "immunohistochemistry": "ihc.png",
    "brick": "brick.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "logo": "logo.png",
    "coins": "coins.png",
    "moon": "moon.png",
    "motorcycle": "motorcycle_left.png",
}


def skimage_data_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def load_photos(names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The shipped photographs as BGR uint8 frames, keyed by name (missing files are skipped)."""
    root = skimage_data_dir()
    out: dict[str, np.ndarray] = {}
    for name in names or list(PHOTO_FILES):
        path = root / PHOTO_FILES[name]
        img = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
        if img is not None:
            out[name] = img
    if not out:
        raise FileNotFoundError(f"no photographs found in {root}")
    return out


def camera_frames(
    photos: dict[str, np.ndarray], count: int, seed: int, min_scale: float = 0.45
) -> list[np.ndarray]:
    """``count`` camera-like frames: random crops (4:3), flips and mild exposure changes of the photos.

    Deterministic for a seed; different seeds give disjoint-looking frames, used to keep calibration
    and check data apart.
    """
    rng = np.random.default_rng(seed)
    names = sorted(photos)
    frames = []
    for i in range(count):
        img = photos[names[i % len(names)]]
        h, w = img.shape[:2]
        ch = int(min(h, w * 3 / 4) * rng.uniform(min_scale, 1.0))
        cw = min(w, int(ch * 4 / 3))
        y = int(rng.integers(0, h - ch + 1))
        x = int(rng.integers(0, w - cw + 1))
        f = img[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            f = f[:, ::-1]
        gain = rng.uniform(0.8, 1.2)
        f = cv2.convertScaleAbs(f, alpha=gain, beta=rng.uniform(-12, 12))
        frames.append(cv2.resize(f, (640, 480), interpolation=cv2.INTER_AREA))
    return frames
