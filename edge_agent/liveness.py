"""When the agent's frame loop counts as alive for systemd's watchdog, and the STATUS line it shows.

The agent's main loop (the thread that consumes inferred frames) calls :meth:`AgentLiveness.tick` on
every pass, and WATCHDOG=1 is sent from there (at most every half interval) only while the loop is
alive, which is either:

* **frames were inferred** since the last pass: capture, preprocessing, inference and the loop all
  move; or
* **the source is down and reconnecting**: it lost its stream or failed to open (``last_error`` is set
  until an open succeeds) and its attempts still come at its backoff's pace, one failure within the
  last ``reconnect_max_s`` + :data:`OPEN_GRACE_S`. An unplugged camera or an RTSP server that is down
  leaves the pipeline nothing to do, and restarting the agent would not bring the camera back.

Anything else is stuck and the pings stop: a camera read or an inference that never returns, a loop
blocked on the spool, a reconnect attempt that never ends. systemd then kills and restarts the agent
after ``WatchdogSec``. A stalled stream that is still connected is not "down" yet: OpenCV interrupts an
FFmpeg read after 30 s (V4L2 after 10 s) and the source then reconnects, so the unit's ``WatchdogSec``
must exceed twice that (deploy/systemd/edgefleet-agent@.service uses 90 s).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from edge_agent.pipeline import LoadedModel
from edge_agent.sd_notify import Notifier
from edge_agent.sources.base import FrameSource

OPEN_GRACE_S = 60.0
"""How long one reconnect attempt may take on top of the backoff (OpenCV's FFmpeg open times out at 30 s)."""

STATUS_EVERY_S = 10.0
"""The STATUS line is refreshed at least this often (and with each ping)."""


class AgentLiveness:
    """Tells systemd the agent is ready, alive (from its frame loop) and stopping, with a STATUS line."""

    def __init__(
        self,
        notifier: Notifier,
        source: FrameSource,
        serving: Callable[[], LoadedModel],
        *,
        reconnect_max_s: float,
    ) -> None:
        """``serving()``: the model being served (read at each status line: an update swaps it)."""
        self.notifier = notifier
        self.source = source
        self.serving = serving
        self.reconnect_max_s = reconnect_max_s
        self._attempts = -1
        self._attempt_at = -math.inf
        self._frames = 0
        self._since = -math.inf
        self._last_frame: float | None = None
        self._status_due = -math.inf

    def ready(self, now: float) -> None:
        """READY=1: the model is loaded and the loop is about to run."""
        self._since = now
        self._status_due = now + STATUS_EVERY_S
        self.notifier.ready(f"{self._model()}: waiting for the first frame from {self.source.name}")

    def tick(self, inferred: int, now: float) -> None:
        """One pass of the loop that consumed ``inferred`` frames (``now``: a monotonic clock)."""
        if not self.notifier.enabled:
            return
        self._frames += inferred
        if inferred:
            self._last_frame = now
        if (inferred or self._reconnecting(now)) and self.notifier.watchdog_due(now):
            self.notifier.ping(self._status(now), now)
        elif now >= self._status_due:
            self.notifier.status(self._status(now))
        else:
            return
        self._frames, self._since, self._status_due = 0, now, now + STATUS_EVERY_S

    def stopping(self) -> None:
        self.notifier.stopping(f"{self._model()}: stopping (last window, spool flush)")

    def _model(self) -> str:
        m = self.serving()
        return f"{m.package.manifest.name} {m.package.manifest.version} ({m.artifact})"

    def _reconnecting(self, now: float) -> bool:
        """The source is down and still trying (a new failed attempt within the backoff's bound)."""
        if self.source.last_error is None:
            return False
        stats = self.source.stats()
        attempts = stats.open_failures + stats.reconnects
        if attempts != self._attempts:
            self._attempts, self._attempt_at = attempts, now
        return now - self._attempt_at <= self.reconnect_max_s + OPEN_GRACE_S

    def _status(self, now: float) -> str:
        error = self.source.last_error
        if error is not None:
            return f"{self._model()}: source {self.source.name} down ({error}), reconnecting"
        if self._frames:
            return f"{self._model()}: {self._frames / max(now - self._since, 1e-3):.1f} fps"
        if self._last_frame is None:
            return f"{self._model()}: waiting for the first frame from {self.source.name}"
        return f"{self._model()}: no frame inferred for {now - self._last_frame:.0f} s"
