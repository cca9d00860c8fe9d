"""OpenCV VideoCapture sources: V4L2 cameras, RTSP/HTTP streams and video files."""

from __future__ import annotations

import time

import cv2
import numpy as np

from edge_agent.sources.base import EndOfStream, FrameSource, SourceLost


class VideoCaptureSource(FrameSource):
    """``camera:N``, ``rtsp://``, ``http(s)://`` (live, reconnecting) and ``file:PATH`` (finite or looped)."""

    def __init__(
        self,
        uri: str,
        target: str | int,
        *,
        is_file: bool = False,
        loop: bool = False,
        realtime: bool = False,
        width: int | None = None,
        height: int | None = None,
        fps: float | None = None,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
    ) -> None:
        super().__init__(uri, reconnect_min_s, reconnect_max_s)
        self.target = target
        self.is_file = is_file
        self.loop = loop
        self.live = (not is_file) or realtime
        self.realtime = realtime
        self.width, self.height, self.fps = width, height, fps
        self._cap: cv2.VideoCapture | None = None
        self._next_due = 0.0
        self._period = 0.0

    def _open(self) -> None:
        if isinstance(self.target, int):
            cap = cv2.VideoCapture(self.target, cv2.CAP_V4L2)
        elif self.is_file:
            cap = cv2.VideoCapture(self.target)
        else:
            cap = cv2.VideoCapture(self.target, cv2.CAP_FFMPEG)
        if not cap.isOpened():
            cap.release()
            raise SourceLost(f"cannot open {self.name}")
        if self.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        if self.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        if self.fps and not self.is_file:
            cap.set(cv2.CAP_PROP_FPS, self.fps)
        if isinstance(self.target, int):
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the driver queue would otherwise serve stale frames
        file_fps = cap.get(cv2.CAP_PROP_FPS) if self.is_file else 0.0
        self._period = 1.0 / (self.fps or file_fps or 25.0) if self.realtime else 0.0
        self._next_due = time.monotonic()
        self._cap = cap

    def _grab(self) -> np.ndarray | None:
        assert self._cap is not None
        if self._period:
            wait = self._next_due - time.monotonic()
            if wait > 0:
                self._wait(wait)
            self._next_due = max(self._next_due + self._period, time.monotonic() - self._period)
        ok = self._cap.grab()
        if not ok:
            if self.is_file:
                if self.loop and self._cap.get(cv2.CAP_PROP_POS_FRAMES) > 0:
                    self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    return self._grab()
                raise EndOfStream(self.name)
            raise SourceLost(f"{self.name}: no frame (device or stream gone)")
        ok, image = self._cap.retrieve()
        return image if ok else None

    def _release(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
