"""Frames already in memory (benchmarks): every frame once per pass, ``passes`` times."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge_agent.sources.base import EndOfStream, FrameSource


class MemorySource(FrameSource):
    """A finite, non-live source over pre-decoded frames; no decode cost, so it isolates the pipeline."""

    live = False

    def __init__(self, frames: Sequence[np.ndarray], passes: int = 1, uri: str = "memory:") -> None:
        super().__init__(uri)
        if not frames:
            raise ValueError("MemorySource needs at least one frame")
        self._frames = frames
        self._total = len(frames) * passes
        self._n = 0

    def _open(self) -> None:
        pass

    def _grab(self) -> np.ndarray | None:
        if self._n >= self._total:
            raise EndOfStream(self.name)
        img = self._frames[self._n % len(self._frames)]
        self._n += 1
        return img
