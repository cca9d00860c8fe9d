"""The health window: after a hot swap, N telemetry windows decide between commit and rollback.

Pure logic over :class:`TelemetryWindow` messages (the agent loop feeds every closed window). A
window counts when it started after the swap. It fails when the new model caused frame failures
(inference errors, non-finite outputs, preprocessing errors), when its median inference latency is
over budget, or when its mean confidence collapsed below ``min_confidence_ratio`` times the mean
confidence of the model's own reference data (model.json ``reference``). A window with no frames
at all (camera idle) is inconclusive and does not count. The first failing window rolls back; N
passing windows commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edge_agent.protocol import TelemetryWindow

MODEL_FAILURE_EVENTS = ("inference_error", "non_finite_output", "preprocess_error")
"""Per-frame failures a model can cause (corrupt camera frames are not the model's fault)."""


@dataclass(frozen=True)
class HealthPolicy:
    """Limits a model on trial must stay within."""

    windows: int = 3
    max_model_failures: int = 0
    """Model-caused frame failures allowed per window."""
    latency_budget_ms: float | None = None
    min_confidence_ratio: float = 0.5
    reference_confidence: float | None = None
    """Mean max-softmax confidence on the model's reference data; None skips the confidence check."""


@dataclass(frozen=True)
class Verdict:
    decision: Literal["pending", "commit", "rollback"]
    windows: int
    reason: str | None = None
    detail: str = ""


def mean_confidence(window: TelemetryWindow) -> float | None:
    """The window's mean confidence: exact when reported, else from the confidence histogram's bin centres."""
    if window.confidence_mean is not None:
        return window.confidence_mean
    h = window.histograms.get("confidence")
    if h is None or not sum(h.counts):
        return None
    centres = [(a + b) / 2 for a, b in zip(h.edges[:-1], h.edges[1:])]
    return sum(c * n for c, n in zip(centres, h.counts)) / sum(h.counts)


class HealthWindow:
    """Judges the windows of one model on trial, swapped in at ``swapped_at`` (unix time)."""

    def __init__(self, policy: HealthPolicy, swapped_at: float) -> None:
        self.policy = policy
        self.swapped_at = swapped_at
        self.passed = 0
        self.verdict = Verdict("commit" if policy.windows <= 0 else "pending", 0)

    def add(self, window: TelemetryWindow) -> Verdict:
        """Account one closed window; returns the (possibly final) verdict."""
        if self.verdict.decision != "pending" or window.start < self.swapped_at:
            return self.verdict
        problem = self._check(window)
        if problem is not None:
            reason, detail = problem
            self.verdict = Verdict("rollback", self.passed + 1, reason, detail)
        elif window.frames.inferred > 0:
            self.passed += 1
            done = self.passed >= self.policy.windows
            self.verdict = Verdict("commit" if done else "pending", self.passed)
        return self.verdict

    def _check(self, w: TelemetryWindow) -> tuple[str, str] | None:
        p = self.policy
        failures = sum(w.events.get(e, 0) for e in MODEL_FAILURE_EVENTS)
        if failures > p.max_model_failures:
            kinds = {e: w.events[e] for e in MODEL_FAILURE_EVENTS if w.events.get(e)}
            return (
                "health_failures",
                f"window {w.seq}: {failures} frame failures {kinds} (allowed {p.max_model_failures})",
            )
        if w.frames.inferred == 0:
            return None
        lat = w.latency_ms.get("inference")
        if (
            p.latency_budget_ms is not None
            and lat is not None
            and lat.p50 is not None
            and lat.p50 > p.latency_budget_ms
        ):
            return (
                "health_latency",
                f"window {w.seq}: median inference {lat.p50:.1f} ms > budget {p.latency_budget_ms:.1f} ms",
            )
        conf = mean_confidence(w)
        if p.reference_confidence is not None and conf is not None:
            floor = p.min_confidence_ratio * p.reference_confidence
            if conf < floor:
                return "health_confidence", (
                    f"window {w.seq}: mean confidence {conf:.3f} collapsed below {floor:.3f} "
                    f"({p.min_confidence_ratio:g} x reference {p.reference_confidence:.3f})"
                )
        return None
