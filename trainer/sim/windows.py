"""Realistic telemetry windows without a camera, for ingest tests and benchmarks.

Windows come out of the agent's own :class:`~edge_agent.telemetry.aggregator.TelemetryAggregator`, fed
with random frame results (confidences, input statistics, latencies) for a 1000-class model, so their
size and shape match what devices publish (~5 KB of JSON with seven feature and three latency
histograms). ``tiny_window`` is the smallest valid window (~300 bytes).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping

from edge_agent.protocol import FrameCounts, ModelRef, TelemetryWindow
from edge_agent.telemetry.aggregator import FrameResult, TelemetryAggregator
from edge_agent.telemetry.features import InputStatistics, OutputFeatures
from edge_agent.telemetry.histogram import default_edges

NUM_CLASSES = 1000


def model_ref(
    name: str = "efficientnet-lite0", version: str = "1.0.0", artifact: str | None = "tflite-int8"
) -> ModelRef:
    """A model reference whose sha256 is derived from name and version (stable across runs)."""
    sha = hashlib.sha256(f"{name}:{version}".encode()).hexdigest()
    return ModelRef(name=name, version=version, sha256=sha, artifact=artifact)


def windows(
    device: str,
    count: int,
    *,
    fleet: str = "t",
    session: int = 1,
    model: ModelRef | None = None,
    frames_per_window: int = 30,
    start: float = 1_700_000_000.0,
    seed: int = 0,
    first_seq: int = 0,
    window_s: float = 10.0,
    num_classes: int = NUM_CLASSES,
    edges: Mapping[str, list[float]] | None = None,
    confidence_beta: tuple[float, float] = (5.0, 2.0),
) -> list[TelemetryWindow]:
    """``count`` consecutive windows of one device session, ``window_s`` each, for a model of
    ``num_classes`` classes (histogram ``edges`` default to the agent's for that many)."""
    rng = random.Random(seed)
    agg = TelemetryAggregator(
        fleet=fleet,
        device=device,
        session=session,
        model=model or model_ref(),
        agent_version="0.1.0",
        edges=edges or default_edges(num_classes),
        now=start,
        window_seconds=window_s,
        atc_threshold=0.5,
        first_seq=first_seq,
    )
    out = []
    t = start
    for _ in range(count):
        for _ in range(frames_per_window):
            conf = rng.betavariate(*confidence_beta)
            agg.add(
                FrameResult(
                    output=OutputFeatures(
                        rng.randrange(num_classes), conf, rng.uniform(0, 4), conf * rng.random()
                    ),
                    inputs=InputStatistics(
                        rng.random(), rng.uniform(0, 0.4), rng.uniform(1, 4), rng.random()
                    ),
                    latency_ms={
                        "capture": rng.uniform(0.1, 3),
                        "preprocess": rng.uniform(0.5, 2),
                        "inference": rng.uniform(5, 30),
                    },
                )
            )
        agg.add_counts(captured=frames_per_window)
        t += window_s
        out.append(agg.close(t))
    return out


def tiny_window(
    device: str, seq: int, *, fleet: str = "t", session: int = 1, model: ModelRef | None = None
) -> TelemetryWindow:
    """The smallest valid window (no histograms): about 300 bytes on the wire."""
    t = 1_700_000_000.0 + 10.0 * seq
    return TelemetryWindow(
        fleet=fleet,
        device=device,
        session=session,
        seq=seq,
        start=t,
        end=t + 10.0,
        model=model or model_ref(),
        agent_version="0.1.0",
        frames=FrameCounts(captured=30, inferred=30),
        class_counts={7: 30},
        confidence_mean=0.8123,
        atc_above=27,
    )
