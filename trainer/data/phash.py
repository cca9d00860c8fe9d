"""Perceptual hashes for near-duplicate screening: the same scene re-sent (or re-encoded, resized,
slightly brightened) hashes to within a few bits, where a cryptographic hash would differ completely.

Pure logic: an image in, a 64-bit difference hash (dHash: is each pixel of a 9x8 grey thumbnail
brighter than its right neighbour) out.
"""

from __future__ import annotations

import cv2
import numpy as np


def dhash(image: np.ndarray) -> int:
    """64-bit difference hash of a BGR or grey image."""
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    small = cv2.resize(grey, (9, 8), interpolation=cv2.INTER_AREA).astype(np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def hamming(a: int, b: int) -> int:
    """Bits that differ between two hashes."""
    return (a ^ b).bit_count()
