"""Which frames a device may send for labelling: few, the informative ones, and only when opted in.

Pure policy, no I/O. Per telemetry window the selector keeps the ``per_window`` lowest-confidence frames
below ``low_confidence``; while the trainer has flagged drift on this device (``drift_until``) it keeps a
uniform reservoir sample of all frames instead, because under drift the frames that matter are not
necessarily low-confidence. A token bucket caps samples per hour across windows.

Audit samples (``audit_per_window``, off by default) are a separate uniform reservoir sample of the
window's frames, whatever their confidence: the trainer's prediction-powered accuracy estimate needs
labels drawn at random from what the device sees, which the low-confidence frames are not. Each audit
frame carries its inclusion probability (audit frames sent / frames offered in the window), so the
trainer can weight windows of different sizes. Audit frames are served first from the hourly bucket; if
the cap cuts them, the ones kept are still a uniform subset (the reservoir keys are random).
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

T = TypeVar("T")


class SamplingSettings(BaseModel):
    """Opt-in sampling of privacy-filtered frames (off by default: no image ever leaves the device)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    consent: str | None = None
    """The consent/licence policy under which frames may leave this device (required when enabled);
    stored with every sample as provenance."""
    per_window: int = Field(default=2, ge=1, le=50)
    max_per_hour: int = Field(default=20, ge=1, le=3600)
    audit_per_window: int = Field(default=0, ge=0, le=20)
    """Frames per window drawn uniformly at random (reason ``audit``) for the unbiased accuracy estimate;
    0 disables them. Counted against ``max_per_hour`` like every other sample."""
    low_confidence: float = Field(default=0.5, gt=0.0, le=1.0)
    max_side: int = Field(default=320, ge=64, le=1920)
    jpeg_quality: int = Field(default=85, ge=30, le=100)

    @model_validator(mode="after")
    def _consent_required(self) -> SamplingSettings:
        if self.enabled and not self.consent:
            raise ValueError("sampling.enabled needs sampling.consent (the policy images are sent under)")
        return self


@dataclass(order=True)
class _Entry(Generic[T]):
    key: float
    seq: int
    item: T = field(compare=False)


@dataclass(frozen=True)
class Chosen(Generic[T]):
    """A frame picked for labelling: why, the caller's item, and (audit frames) the probability that
    any given frame of the window was picked this way."""

    reason: str
    item: T
    inclusion: float | None = None


class SampleSelector(Generic[T]):
    """Candidates per window and an hourly cap; ``T`` is whatever the caller keeps per frame."""

    def __init__(self, settings: SamplingSettings, now: float, rng: random.Random | None = None) -> None:
        self.s = settings
        self._rng = rng or random.Random()
        self._heap: list[_Entry[T]] = []
        self._audit: list[_Entry[T]] = []
        self._seen = 0
        self._seq = 0
        self._tokens = float(settings.max_per_hour)
        self._last = now
        self.drift_until = 0.0
        self.capped = 0

    def drift_mode(self, now: float) -> bool:
        return now < self.drift_until

    def offer(self, confidence: float, item: T, now: float) -> None:
        """Consider one inferred frame."""
        if not self.s.enabled:
            return
        self._seq += 1
        self._seen += 1
        if self.s.audit_per_window:
            self._push(self._audit, self.s.audit_per_window, _Entry(-self._rng.random(), self._seq, item))
        if self.drift_mode(now):
            key = self._rng.random()  # reservoir: keep the k smallest random keys = a uniform sample
        elif confidence < self.s.low_confidence:
            key = confidence
        else:
            return
        self._push(self._heap, self.s.per_window, _Entry(-key, self._seq, item))

    @staticmethod
    def _push(heap: list[_Entry[T]], size: int, entry: _Entry[T]) -> None:
        """Keep the ``size`` smallest keys (max-heap on key: the root is the worst kept candidate)."""
        if len(heap) < size:
            heapq.heappush(heap, entry)
        elif entry > heap[0]:
            heapq.heapreplace(heap, entry)

    def choose(self, now: float) -> list[Chosen[T]]:
        """The window's chosen frames, audit frames first, then best first, within the hourly cap; resets."""
        self._tokens = min(
            self.s.max_per_hour, self._tokens + (now - self._last) * self.s.max_per_hour / 3600.0
        )
        self._last = now
        reason = "drift" if self.drift_mode(now) else "low_confidence"
        audit = [e.item for e in sorted(self._audit, reverse=True)]  # random keys: any prefix is uniform
        taken = {e.seq for e in self._audit}
        other = [e.item for e in sorted(self._heap, reverse=True) if e.seq not in taken]
        seen = self._seen
        self._heap.clear()
        self._audit.clear()
        self._seen = 0
        allowed = int(self._tokens)
        self.capped += max(0, len(audit) + len(other) - allowed)
        audit = audit[:allowed]
        other = other[: allowed - len(audit)]
        self._tokens -= len(audit) + len(other)
        inclusion = len(audit) / seen if seen else None
        return [Chosen("audit", item, inclusion) for item in audit] + [Chosen(reason, item) for item in other]
