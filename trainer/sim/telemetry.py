"""Simulated device telemetry for evaluating the drift engine and the label-free accuracy estimate.

Frames are rendered with the built-in dataset's scene generator in a named *condition* (clean base
domains, an ImageNet-C corruption at a severity, or a domain shift such as night lighting), and run
through the package's real device artifact exactly as the agent does: ``Preprocessor`` ->
``input_statistics`` on the model-input-sized frame -> runtime backend -> ``to_probabilities`` with the
package temperature -> ``output_features``. Each frame's result and its ground truth (label, correct)
go into a :class:`FramePool`::

    pkg = load_package("pkg/v1")
    sim = Simulator(pkg)                                      # loads the int8 artifact once
    clean = sim.pool(Condition.clean(), frames=2000, seed=1)
    fog3 = sim.pool(Condition.corrupted("fog", 3), frames=500, seed=1)
    windows = fog3.windows(8, size=300, rng=np.random.default_rng(0))   # 8 one-minute windows
    windows[0].true_accuracy, windows[0].window.atc_above

Inference is the slow part (a few ms per frame), so each condition is rendered and inferred once and
windows are built by **resampling frames from the pool with replacement**. A window of 300 frames is a
60 s window at 5 fps (the agent's default ``window_seconds``). Resampled frames are independent scenes;
real cameras see correlated frames (the same object for several frames), which makes real windows
noisier than these. The pool's empirical distribution stands in for the condition's true one, so pools
should be several times larger than a window (a clean pool of 2,000 frames adds ~15% to the variance
of a 300-frame window's histograms relative to an infinite pool).

:meth:`FramePool.window` builds the window with the agent's own ``TelemetryAggregator``;
:meth:`FramePool.fast_window` builds the identical window with ``numpy.bincount`` on the bin indices the
aggregator's ``FixedHistogram`` assigned (a test checks they are equal), for benchmarks that need
hundreds of thousands of windows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from edge_agent import __version__ as agent_version
from edge_agent.backends import BackendOptions, load_backend
from edge_agent.package import ModelPackage
from edge_agent.postprocess import to_probabilities
from edge_agent.preprocess import Preprocessor
from edge_agent.protocol import FrameCounts, Histogram, ModelRef, TelemetryWindow
from edge_agent.reference import ReferenceStats
from edge_agent.telemetry.aggregator import FrameResult, TelemetryAggregator
from edge_agent.telemetry.features import InputStatistics, OutputFeatures, input_statistics, output_features
from edge_agent.telemetry.histogram import INPUT_FEATURES, OUTPUT_FEATURES, FixedHistogram
from trainer.data.corruptions import CORRUPTIONS, corrupt
from trainer.data.scenes import BASE_DOMAINS, Domain, render_frame

FEATURES: tuple[str, ...] = (*OUTPUT_FEATURES, *INPUT_FEATURES)
WINDOW_FRAMES = 300
"""Frames per simulated window: 60 s at 5 fps."""
FRAME_SIZE = (320, 240)
"""Rendered camera frame (width, height), as in the built-in dataset the models are trained on."""


@dataclass(frozen=True)
class Condition:
    """What the camera sees: base domains, optionally corrupted or shifted to other domain factors."""

    corruption: str | None = None
    severity: int = 0
    lighting: str | None = None
    background: str | None = None
    sensor: str | None = None

    def __post_init__(self) -> None:
        if self.corruption is not None and self.corruption not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {self.corruption!r}")
        if (self.corruption is None) != (self.severity == 0) or not 0 <= self.severity <= 5:
            raise ValueError("a corruption needs a severity 1..5, and a severity needs a corruption")
        Domain(self.lighting or "day", self.background or "belt", self.sensor or "clean")  # validates names

    @classmethod
    def clean(cls) -> Condition:
        return cls()

    @classmethod
    def corrupted(cls, name: str, severity: int) -> Condition:
        return cls(corruption=name, severity=severity)

    @classmethod
    def shifted(cls, **factors: str) -> Condition:
        """A domain shift, e.g. ``shifted(lighting="night")``; unnamed factors stay in the base domains."""
        return cls(**factors)  # type: ignore[arg-type]

    @property
    def name(self) -> str:
        parts = [
            f"{k}={v}"
            for k, v in (
                ("lighting", self.lighting),
                ("background", self.background),
                ("sensor", self.sensor),
            )
            if v
        ]
        if self.corruption:
            parts.append(f"{self.corruption}@{self.severity}")
        return "+".join(parts) or "clean"

    def domain(self, rng: np.random.Generator) -> Domain:
        """A base domain drawn uniformly (as the built-in dataset does), with this condition's overrides."""
        base = BASE_DOMAINS[int(rng.integers(len(BASE_DOMAINS)))]
        return Domain(
            self.lighting or base.lighting, self.background or base.background, self.sensor or base.sensor
        )

    def render(self, label: str, rng: np.random.Generator, size: tuple[int, int] = FRAME_SIZE) -> np.ndarray:
        """One BGR camera frame of an object of ``label`` in this condition."""
        frame = render_frame(label, self.domain(rng), rng, size)
        return corrupt(frame, self.corruption, self.severity, rng) if self.corruption else frame


@dataclass
class SimWindow:
    """A telemetry window with the ground truth a real fleet never has."""

    window: TelemetryWindow
    true_accuracy: float
    condition: str


@dataclass
class FramePool:
    """Per-frame results of one condition through the device artifact, with labels."""

    condition: Condition
    model: ModelRef
    edges: dict[str, list[float]]
    atc_threshold: float | None
    num_classes: int
    labels: np.ndarray
    top1: np.ndarray
    values: dict[str, np.ndarray]
    """Feature name -> per-frame value (the seven telemetry features)."""
    bins: dict[str, np.ndarray] = field(init=False)
    """Feature name -> per-frame bin index, exactly as the aggregator's ``FixedHistogram`` counts it."""

    def __post_init__(self) -> None:
        self.bins = {}
        for name in FEATURES:
            h = FixedHistogram(self.edges[name])
            self.bins[name] = np.fromiter(
                (h.bin_of(v) for v in self.values[name].tolist()), np.int32, len(self)
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def correct(self) -> np.ndarray:
        return self.top1 == self.labels

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    @property
    def atc(self) -> float | None:
        """ATC estimate over the whole pool."""
        if self.atc_threshold is None:
            return None
        return float((self.values["confidence"] > self.atc_threshold).mean())

    @property
    def average_confidence(self) -> float:
        return float(self.values["confidence"].mean())

    def subset(self, idx: np.ndarray, atc_threshold: float | None = None) -> FramePool:
        """Frames ``idx`` of this pool, optionally counted against another ATC threshold."""
        idx = np.asarray(idx)
        return FramePool(
            self.condition,
            self.model,
            self.edges,
            self.atc_threshold if atc_threshold is None else atc_threshold,
            self.num_classes,
            self.labels[idx],
            self.top1[idx],
            {k: v[idx] for k, v in self.values.items()},
        )

    def reference(self, idx: np.ndarray | None = None) -> ReferenceStats:
        """The drift reference of frames ``idx`` (default: all), computed as ``trainer.evaluation.reference.reference_stats`` does."""
        from trainer.evaluation.reference import atc_threshold, confidence_bin_accuracy

        idx = np.arange(len(self)) if idx is None else np.asarray(idx)
        w = self.window(idx) if len(idx) <= 2000 else self.fast_window(idx)
        n = w.frames.inferred
        conf, correct = self.values["confidence"][idx], self.correct[idx]
        return ReferenceStats(
            artifact=self.model.artifact or "unknown",
            images=n,
            histograms=w.histograms,
            class_prior=[w.class_counts.get(c, 0) / n for c in range(self.num_classes)],
            mean_confidence=float(w.confidence_mean or 0.0),
            accuracy=float(correct.mean()),
            atc_threshold=atc_threshold(conf, correct),
            confidence_bin_accuracy=confidence_bin_accuracy(conf, correct, self.edges["confidence"]),
        )

    def frame_result(self, i: int) -> FrameResult:
        """Frame ``i`` as the agent hands it to its aggregator (no latencies)."""
        v = {k: float(a[i]) for k, a in self.values.items()}
        out = OutputFeatures(int(self.top1[i]), v["confidence"], v["entropy"], v["margin"])
        inputs = InputStatistics(v["brightness"], v["contrast"], v["log_laplacian_var"], v["saturation"])
        return FrameResult(output=out, inputs=inputs, latency_ms={})

    def window(
        self,
        idx: Sequence[int] | np.ndarray,
        *,
        device: str = "sim",
        seq: int = 0,
        start: float = 0.0,
        seconds: float = 60.0,
    ) -> TelemetryWindow:
        """The window of frames ``idx`` built by the agent's ``TelemetryAggregator``."""
        agg = TelemetryAggregator(
            fleet="sim",
            device=device,
            session=1,
            model=self.model,
            agent_version=agent_version,
            edges=self.edges,
            now=start,
            window_seconds=seconds,
            first_seq=seq,
            atc_threshold=self.atc_threshold,
        )
        for i in np.asarray(idx).tolist():
            agg.add(self.frame_result(i))
        agg.add_counts(captured=len(idx))
        return agg.close(start + seconds)

    def fast_window(
        self, idx: np.ndarray, *, device: str = "sim", seq: int = 0, start: float = 0.0, seconds: float = 60.0
    ) -> TelemetryWindow:
        """The same window as :meth:`window` (latencies aside), vectorised."""
        n = len(idx)
        hists = {
            name: Histogram(
                edges=self.edges[name],
                counts=np.bincount(self.bins[name][idx], minlength=len(self.edges[name]) - 1).tolist(),
            )
            for name in FEATURES
        }
        classes = np.bincount(self.top1[idx])
        conf = self.values["confidence"][idx]
        return TelemetryWindow(
            fleet="sim",
            device=device,
            session=1,
            seq=seq,
            start=start,
            end=start + seconds,
            model=self.model,
            agent_version=agent_version,
            frames=FrameCounts(captured=n, inferred=n),
            class_counts={int(c): int(k) for c, k in enumerate(classes) if k},
            histograms=hists,
            # the aggregator adds confidences one by one; cumsum keeps that order (np.sum would not)
            confidence_mean=round(float(np.cumsum(conf)[-1]) / n, 6) if n else None,
            atc_above=int((conf > self.atc_threshold).sum()) if self.atc_threshold is not None else None,
        )

    def windows(
        self,
        count: int,
        rng: np.random.Generator,
        *,
        size: int = WINDOW_FRAMES,
        device: str = "sim",
        first_seq: int = 0,
    ) -> list[SimWindow]:
        """``count`` windows of ``size`` frames resampled with replacement, with their true accuracy."""
        correct = self.correct
        out = []
        for k in range(count):
            idx = rng.integers(0, len(self), size)
            w = self.fast_window(idx, device=device, seq=first_seq + k, start=60.0 * (first_seq + k))
            out.append(SimWindow(w, float(correct[idx].mean()), self.condition.name))
        return out


def _seed(condition: Condition, seed: int) -> list[int]:
    digest = hashlib.sha256(condition.name.encode()).digest()
    return [seed, int.from_bytes(digest[:4], "little")]


class Simulator:
    """Renders labelled frames in a condition and runs them through one artifact of a package."""

    def __init__(self, package: ModelPackage, artifact: str | None = None, threads: int = 1) -> None:
        m = package.manifest
        if m.reference is None:
            raise ValueError(f"{package}: no drift reference in model.json")
        self.package = package
        self.artifact = artifact or m.reference.artifact
        art = m.artifacts[self.artifact]
        self.preprocessor = Preprocessor(m.preprocess, art.input)
        self.backend = load_backend(package, self.artifact, BackendOptions(threads=threads))
        self.atc_threshold = m.reference.atc_threshold

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def infer(self, frame: np.ndarray) -> tuple[OutputFeatures, InputStatistics]:
        """One camera frame through the agent's per-frame code path."""
        m = self.package.manifest
        tensor, small = self.preprocessor(frame)
        inputs = input_statistics(small, m.preprocess.color)
        probs = to_probabilities(self.backend.run(tensor), m.output_kind, m.temperature)[0]
        (out,) = output_features(probs)
        return out, inputs

    def frames(self, condition: Condition, count: int, seed: int = 0) -> Iterator[tuple[np.ndarray, int]]:
        """``count`` (camera frame, label index) of ``condition``, classes uniform; deterministic per seed."""
        labels = self.package.manifest.labels
        base = _seed(condition, seed)
        for i in range(count):
            rng = np.random.default_rng([*base, i])
            label = int(rng.integers(len(labels)))
            yield condition.render(labels[label], rng), label

    def pool(self, condition: Condition, frames: int, seed: int = 0) -> FramePool:
        """Render and infer ``frames`` frames of ``condition`` (see :meth:`frames`)."""
        m = self.package.manifest
        labels, top1 = np.empty(frames, np.int64), np.empty(frames, np.int64)
        values = {name: np.empty(frames, np.float64) for name in FEATURES}
        for i, (frame, label) in enumerate(self.frames(condition, frames, seed)):
            out, inputs = self.infer(frame)
            labels[i], top1[i] = label, out.top1
            for name, v in (
                ("confidence", out.confidence),
                ("entropy", out.entropy),
                ("margin", out.margin),
                *inputs.as_dict().items(),
            ):
                values[name][i] = v
        edges = {k: list(v) for k, v in m.telemetry_edges.items()}
        return FramePool(
            condition,
            self.package.ref(self.artifact),
            edges,
            self.atc_threshold,
            len(m.labels),
            labels,
            top1,
            values,
        )
