"""The drift baseline written into model.json: reference histograms, class prior and the ATC threshold.

:func:`reference_stats` runs held-out frames one at a time through the same code a device runs
(``Preprocessor`` -> ``input_statistics`` on the model-input-sized frame -> runtime backend ->
``to_probabilities`` with the package temperature -> ``output_features``) and counts them with the
agent's own :class:`~edge_agent.telemetry.aggregator.TelemetryAggregator` and the package's
``telemetry_edges``, so fleet windows and the reference are comparable bin for bin.

ATC (Garg et al., "Leveraging Unlabeled Data to Predict Out-of-Distribution Performance", ICLR 2022):
on labelled held-out data pick the threshold t on max-softmax confidence such that the share of samples
with confidence above t equals the accuracy; on unlabelled field data the share above t estimates
accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge_agent import __version__ as agent_version
from edge_agent.backends import BackendOptions, load_backend
from edge_agent.package import ModelPackage
from edge_agent.postprocess import to_probabilities
from edge_agent.preprocess import Preprocessor
from edge_agent.reference import ReferenceStats
from edge_agent.telemetry.aggregator import FrameResult, TelemetryAggregator
from edge_agent.telemetry.features import input_statistics, output_features
from edge_agent.telemetry.histogram import FixedHistogram


def atc_threshold(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Threshold t with ``mean(confidence > t) == mean(correct)`` (to within one sample)."""
    c = np.sort(np.asarray(confidence, np.float64))
    n = len(c)
    if n == 0:
        raise ValueError("ATC needs at least one sample")
    k = int(round(float(np.mean(correct)) * n))  # samples that must lie above t
    if k >= n:
        return float(np.nextafter(c[0], -np.inf))
    if k <= 0:
        return float(c[-1])
    return float((c[n - k - 1] + c[n - k]) / 2)


def confidence_bin_accuracy(
    confidence: np.ndarray, correct: np.ndarray, edges: Sequence[float], prior_weight: float = 2.0
) -> list[float]:
    """Accuracy per confidence bin (bins as the telemetry histogram counts them), each shrunk towards the
    bin's mid confidence with ``prior_weight`` pseudo-frames so that sparse or empty bins stay sensible.

    >>> confidence_bin_accuracy(np.array([0.1, 0.9, 0.95]), np.array([0, 1, 0]), [0.0, 0.5, 1.0], 0.0)
    [0.0, 0.5]
    """
    h = FixedHistogram(list(edges))
    idx = np.fromiter((h.bin_of(float(c)) for c in confidence), np.int64, len(confidence))
    bins = len(edges) - 1
    n = np.bincount(idx, minlength=bins).astype(np.float64)
    k = np.bincount(idx, weights=np.asarray(correct, np.float64), minlength=bins)
    e = np.asarray(edges, np.float64)
    mid = (e[:-1] + e[1:]) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = (k + prior_weight * mid) / (n + prior_weight)
    return [round(float(a), 6) for a in np.where(np.isfinite(acc), acc, mid)]


def reference_stats(
    package: ModelPackage,
    artifact: str,
    frames: Sequence[np.ndarray],
    labels: np.ndarray | None = None,
    threads: int = 1,
) -> tuple[ReferenceStats, np.ndarray]:
    """Reference statistics of ``artifact`` on held-out ``frames``; also returns the per-frame probabilities."""
    m = package.manifest
    art = m.artifacts[artifact]
    agg = TelemetryAggregator(
        fleet="reference",
        device="reference-set",  # not a device: the held-out set run through the aggregator
        session=0,
        model=package.ref(artifact),
        agent_version=agent_version,
        edges=m.telemetry_edges,
        now=0.0,
        window_seconds=None,
        window_frames=len(frames) + 1,
    )
    backend = load_backend(package, artifact, BackendOptions(threads=threads))
    pre = Preprocessor(m.preprocess, art.input)
    probs = []
    try:
        for frame in frames:  # one at a time, exactly as the agent's pipeline does
            tensor, small = pre(frame)
            inputs = input_statistics(small, m.preprocess.color)
            p = to_probabilities(backend.run(tensor), m.output_kind, m.temperature)[0]
            (features,) = output_features(p)
            agg.add(FrameResult(output=features, inputs=inputs, latency_ms={}))
            probs.append(p)
    finally:
        backend.close()
    window = agg.close(0.0)
    p = np.stack(probs)
    conf = p.max(1)
    prior = [window.class_counts.get(i, 0) / window.frames.inferred for i in range(len(m.labels))]
    accuracy = atc = bin_accuracy = None
    if labels is not None:
        correct = p.argmax(1) == np.asarray(labels)
        accuracy = float(correct.mean())
        atc = atc_threshold(conf, correct)
        bin_accuracy = confidence_bin_accuracy(conf, correct, m.telemetry_edges["confidence"])
    stats = ReferenceStats(
        artifact=artifact,
        images=len(frames),
        histograms=window.histograms,
        class_prior=prior,
        mean_confidence=float(window.confidence_mean if window.confidence_mean is not None else conf.mean()),
        accuracy=accuracy,
        atc_threshold=atc,
        confidence_bin_accuracy=bin_accuracy,
    )
    return stats, p
