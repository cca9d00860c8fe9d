"""Privacy filter for frames that leave the device: downscale, blur faces, re-encode without metadata.

Faces are found with the frontal-face Haar cascade that OpenCV ships and pixelated beyond recognition
(with a margin), on the already downscaled image. The JPEG is encoded from raw pixels, so it carries no
EXIF or other metadata of the camera's original file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np


@dataclass(frozen=True)
class FilteredImage:
    jpeg: bytes
    width: int
    height: int
    faces: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.jpeg).hexdigest()


@lru_cache(maxsize=1)
def _face_cascade() -> cv2.CascadeClassifier:
    path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"  # type: ignore[attr-defined]
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"cannot load the face cascade {path}")
    return cascade


def detect_faces(image_bgr: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Face boxes (x, y, w, h) in an image."""
    gray = cv2.equalizeHist(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY))
    found = _face_cascade().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=4, minSize=(16, 16))
    return [tuple(int(v) for v in box) for box in found]  # type: ignore[misc]


def _pixelate(region: np.ndarray, blocks: int = 6) -> np.ndarray:
    h, w = region.shape[:2]
    small = cv2.resize(region, (blocks, max(1, blocks * h // max(w, 1))), interpolation=cv2.INTER_AREA)
    return cv2.GaussianBlur(
        cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST), (0, 0), max(w, h) / 12
    )


def privacy_filter(image_bgr: np.ndarray, max_side: int = 320, quality: int = 85) -> FilteredImage:
    """Downscale to ``max_side``, pixelate every detected face (20% margin), encode a bare JPEG."""
    h, w = image_bgr.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    img = cv2.resize(
        image_bgr, (max(1, int(w * scale)), max(1, int(h * scale))), interpolation=cv2.INTER_AREA
    )
    faces = detect_faces(img)
    for x, y, fw, fh in faces:
        mx, my = int(fw * 0.2), int(fh * 0.2)
        x0, y0 = max(0, x - mx), max(0, y - my)
        x1, y1 = min(img.shape[1], x + fw + mx), min(img.shape[0], y + fh + my)
        img[y0:y1, x0:x1] = _pixelate(img[y0:y1, x0:x1])
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return FilteredImage(jpeg=buf.tobytes(), width=img.shape[1], height=img.shape[0], faces=len(faces))
