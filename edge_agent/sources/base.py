"""The capture thread shared by every frame source.

A source implements three small methods (open, grab one frame, release); this base class runs them
on its own thread and handles what every camera needs:

* live sources (cameras, streams) keep only the freshest frame: an unconsumed frame is replaced by a
  newer one and counted as dropped, so inference never works on stale images;
* finite sources (an image folder, a video file) hand over every frame with backpressure and end
  with :class:`EndOfStream`;
* a lost source is released and reopened with exponential backoff and jitter;
* empty or undecodable frames are counted as captured and corrupt, and skipped (so every frame read
  is captured once, and then delivered, dropped or corrupt).
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from edge_agent.backoff import Backoff
from edge_agent.errors import EdgeFleetError

log = logging.getLogger(__name__)

_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s]*)@")
"""The userinfo of a URL: from ``//`` to the LAST ``@`` before the authority ends (the first ``/``), so a
raw ``@`` in a password (``rtsp://admin:p@ss@cam``) is redacted with the rest of it."""


def redact_credentials(text: str) -> str:
    """``text`` with every ``scheme://user:password@`` written as ``scheme://user:***@`` (for logs)."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['userinfo'].split(':', 1)[0]}:***@", text)


_MAX_CORRUPT_IN_A_ROW = 50
"""After this many corrupt frames in a row a live source is treated as lost and reopened."""


class EndOfStream(Exception):
    """A finite source has delivered its last frame."""


class SourceLost(EdgeFleetError):
    """The device or stream went away; the capture thread reopens it with backoff."""


@dataclass(slots=True)
class Frame:
    """One decoded frame (BGR uint8) and when and how fast it was captured."""

    image: np.ndarray
    index: int
    ts: float
    capture_ms: float


@dataclass(slots=True)
class SourceStats:
    """Cumulative counters since the source started."""

    captured: int = 0
    """Every frame read from the device, corrupt ones included."""
    dropped: int = 0
    """Live sources: frames replaced by a newer one before anyone took them."""
    corrupt: int = 0
    """Empty or undecodable frames (counted in ``captured`` too, never delivered)."""
    reconnects: int = 0
    open_failures: int = 0

    def minus(self, other: SourceStats) -> SourceStats:
        return SourceStats(*(getattr(self, f) - getattr(other, f) for f in self.__slots__))


class FrameSource(ABC):
    """Base class of all sources; subclasses implement :meth:`_open`, :meth:`_grab`, :meth:`_release`."""

    live: bool = True
    """Live sources keep only the freshest frame; others deliver every frame."""

    def __init__(self, uri: str, reconnect_min_s: float = 0.5, reconnect_max_s: float = 30.0) -> None:
        self.uri = uri
        self.name = redact_credentials(uri)
        """The URI as logs and errors show it (no password)."""
        self._backoff = Backoff(reconnect_min_s, reconnect_max_s)
        self._stats = SourceStats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mailbox: Frame | None = None
        self._mail_ready = threading.Condition(self._lock)
        self._queue: queue.Queue[Frame | None] = queue.Queue(maxsize=4)
        self._ended = False
        self._index = 0
        self.last_error: str | None = None

    # -- to implement ----------------------------------------------------------------------------
    @abstractmethod
    def _open(self) -> None:
        """Open the device/stream/file; raise SourceLost (or OSError) if it is not available."""

    @abstractmethod
    def _grab(self) -> np.ndarray | None:
        """The next frame; None if it was empty or corrupt; raise SourceLost or EndOfStream."""

    def _release(self) -> None:  # noqa: B027 - optional hook
        """Close the device/stream."""

    # -- public ----------------------------------------------------------------------------------
    def start(self) -> FrameSource:
        self._thread = threading.Thread(target=self._run, name=f"capture:{self.name}", daemon=True)
        self._thread.start()
        return self

    def read(self, timeout: float = 1.0) -> Frame | None:
        """The next frame, or None after ``timeout``; raises EndOfStream once a finite source is done."""
        if self.live:
            with self._mail_ready:
                if self._mailbox is None and not self._ended:
                    self._mail_ready.wait(timeout)
                frame, self._mailbox = self._mailbox, None
                if frame is None and self._ended:
                    raise EndOfStream(self.name)
                return frame
        if self._ended and self._queue.empty():
            raise EndOfStream(self.name)
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is None:
            self._ended = True
            raise EndOfStream(self.name)
        return item

    def stats(self) -> SourceStats:
        with self._lock:
            return SourceStats(
                self._stats.captured,
                self._stats.dropped,
                self._stats.corrupt,
                self._stats.reconnects,
                self._stats.open_failures,
            )

    def close(self) -> None:
        self._stop.set()
        with self._mail_ready:
            self._mail_ready.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._safe_release()

    # -- capture thread ----------------------------------------------------------------------------
    def _count(self, field: str, n: int = 1) -> None:
        with self._lock:
            setattr(self._stats, field, getattr(self._stats, field) + n)

    def _safe_release(self) -> None:
        try:
            self._release()
        except Exception:  # noqa: BLE001 - releasing a dead device must not kill the thread
            log.debug("release of %s failed", self.name, exc_info=True)

    def _deliver(self, frame: Frame) -> None:
        if self.live:
            with self._mail_ready:
                if self._mailbox is not None:
                    self._stats.dropped += 1
                self._mailbox = frame
                self._mail_ready.notify()
            return
        while not self._stop.is_set():
            try:
                self._queue.put(frame, timeout=0.2)
                return
            except queue.Full:
                continue

    def _finish(self) -> None:
        if self.live:
            with self._mail_ready:
                self._ended = True
                self._mail_ready.notify_all()
        else:
            while not self._stop.is_set():
                try:
                    self._queue.put(None, timeout=0.2)
                    return
                except queue.Full:
                    continue

    def _wait(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def _run(self) -> None:
        opened = False
        corrupt_in_a_row = 0
        while not self._stop.is_set():
            if not opened:
                try:
                    self._open()
                    opened = True
                    self._backoff.reset()
                    corrupt_in_a_row = 0
                    self.last_error = None
                except EndOfStream:
                    break
                except Exception as exc:  # noqa: BLE001 - any open failure is retried
                    self._count("open_failures")
                    self.last_error = redact_credentials(f"{type(exc).__name__}: {exc}")
                    delay = self._backoff.next()
                    log.warning(
                        "source %s unavailable (%s); retrying in %.1f s", self.name, self.last_error, delay
                    )
                    self._wait(delay)
                    continue
            t0 = time.perf_counter()
            try:
                image = self._grab()
            except EndOfStream:
                break
            except Exception as exc:  # noqa: BLE001 - SourceLost or a driver error: reopen
                self.last_error = redact_credentials(f"{type(exc).__name__}: {exc}")
                log.warning("source %s lost (%s); reconnecting", self.name, self.last_error)
                self._safe_release()
                opened = False
                self._count("reconnects")
                self._wait(self._backoff.next())
                continue
            self._count("captured")
            if (
                image is None
                or not isinstance(image, np.ndarray)
                or image.size == 0
                or image.ndim not in (2, 3)
            ):
                self._count("corrupt")
                corrupt_in_a_row += 1
                if self.live and corrupt_in_a_row >= _MAX_CORRUPT_IN_A_ROW:
                    log.warning(
                        "source %s: %d corrupt frames in a row; reopening", self.name, corrupt_in_a_row
                    )
                    self._safe_release()
                    opened = False
                    self._count("reconnects")
                continue
            corrupt_in_a_row = 0
            capture_ms = (time.perf_counter() - t0) * 1000.0
            self._deliver(Frame(image=image, index=self._index, ts=time.time(), capture_ms=capture_ms))
            self._index += 1
        self._safe_release()
        self._finish()
