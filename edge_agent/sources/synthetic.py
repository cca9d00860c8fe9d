"""``synthetic:``: generated frames for tests and demos, deterministic from a seed.

Query parameters: ``fps`` (0 = as fast as consumed, not live), ``width``, ``height``, ``frames``
(end after N), ``corrupt_every`` (every k-th grab yields an empty frame), ``seed``.
Example: ``synthetic:?fps=15&width=640&height=480&frames=300&corrupt_every=50``.
"""

from __future__ import annotations

import time

import cv2
import numpy as np

from edge_agent.sources.base import EndOfStream, FrameSource


class SyntheticSource(FrameSource):
    """Moving coloured shapes over a gradient: cheap, varied and reproducible."""

    def __init__(
        self,
        uri: str,
        *,
        fps: float = 30.0,
        width: int = 640,
        height: int = 480,
        frames: int | None = None,
        corrupt_every: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(uri)
        self.live = fps > 0
        self.period = 1.0 / fps if fps > 0 else 0.0
        self.width, self.height = width, height
        self.frames = frames
        self.corrupt_every = corrupt_every
        self._rng = np.random.default_rng(seed)
        self._n = 0
        self._next_due = 0.0
        yy, xx = np.mgrid[0:height, 0:width]
        self._base = np.stack(
            [
                (xx * 255 // max(1, width - 1)),
                (yy * 255 // max(1, height - 1)),
                ((xx + yy) * 127 // max(1, width + height)),
            ],
            axis=-1,
        ).astype(np.uint8)

    def _open(self) -> None:
        self._next_due = time.monotonic()

    def _grab(self) -> np.ndarray | None:
        if self.frames is not None and self._n >= self.frames:
            raise EndOfStream(self.name)
        if self.period:
            wait = self._next_due - time.monotonic()
            if wait > 0:
                self._wait(wait)
            self._next_due = max(self._next_due + self.period, time.monotonic() - self.period)
        self._n += 1
        if self.corrupt_every and self._n % self.corrupt_every == 0:
            return np.empty((0, 0, 3), dtype=np.uint8)
        img = self._base.copy()
        t = self._n
        cx = int((0.5 + 0.4 * np.sin(t / 17.0)) * self.width)
        cy = int((0.5 + 0.4 * np.cos(t / 23.0)) * self.height)
        color = tuple(int(c) for c in self._rng.integers(0, 256, 3))
        cv2.circle(img, (cx, cy), self.height // 6, color, -1)
        cv2.rectangle(img, (self.width - cx - 40, cy - 30), (self.width - cx + 40, cy + 30), color[::-1], -1)
        return img
