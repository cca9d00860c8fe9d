"""``dir:PATH``: every image of a folder once, in name order; then the source ends."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edge_agent.errors import SourceError
from edge_agent.image_header import ImageHeaderError, check_image_size
from edge_agent.sources.base import EndOfStream, FrameSource

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}


class DirectorySource(FrameSource):
    """A finite source; unreadable or corrupt files are counted as corrupt frames and skipped."""

    live = False

    def __init__(self, uri: str, path: Path) -> None:
        super().__init__(uri)
        if not path.is_dir():
            raise SourceError(f"{uri}: {path} is not a directory")
        self.files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        self._pos = 0
        self.current_file: Path | None = None

    def _open(self) -> None:
        pass

    def _grab(self) -> np.ndarray | None:
        if self._pos >= len(self.files):
            raise EndOfStream(self.name)
        self.current_file = self.files[self._pos]
        self._pos += 1
        try:
            data = np.fromfile(self.current_file, dtype=np.uint8)
        except OSError:
            return None
        if data.size == 0:
            return None
        try:
            check_image_size(data.tobytes())
            return cv2.imdecode(data, cv2.IMREAD_COLOR)
        except (ImageHeaderError, cv2.error):  # counted as a corrupt frame, like undecodable bytes
            return None
