"""Per-device references after a promotion: each device is judged against its own normal under the new model.

A model's reference in model.json describes its training mix. A device whose normal differs from that
mix (a camera that is always dark at night) stays in ``drift`` against it for good, even after a model
retrained on its frames handles it well; and the retrained model's reference (which holds some of those
frames) can make unshifted devices look off. So on promotion every device is *rebased*: its first
``DriftConfig.rebase_windows`` assessable windows under the new model are merged exactly (histograms
merge by adding counts) into a reference of its own, and from then on its windows are tested against
that (the fleet-wide merge still against the training reference). A later change of the device is a
change against its own normal and is detected as before.

The rebased reference is not silent about what it absorbs: :func:`differences` names the features on
which the device's normal differs from the training reference (Jensen-Shannon divergence at or above
``js_floor``), and the service reports them with the ``reference_rebased`` alert.

    ref = reference_from_windows(first_windows, training=manifest.reference)
    dev = DeviceReference("cam3", sha, since, len(first_windows), ref, differences(ref, manifest.reference))
    dev.key_reference()   # what DriftMonitor.step takes for that device
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from edge_agent.protocol import Histogram, TelemetryWindow
from edge_agent.reference import ReferenceStats
from edge_agent.telemetry.merge import merge_windows
from trainer.drift.detector import CLASS_PRIOR, KeyReference, _reference_counts
from trainer.drift.stats import js_divergence


def device_label(since: float) -> str:
    """How drift states and alerts name a device's own reference: ``device:<since, unix seconds>``."""
    return f"device:{since:.0f}"


def reference_from_windows(windows: Sequence[TelemetryWindow], training: ReferenceStats) -> ReferenceStats:
    """The exact merge of ``windows`` as a reference with the training reference's features and bins."""
    if not windows:
        raise ValueError("a reference needs at least one window")
    s = merge_windows(windows)
    n = s.frames.inferred
    if n <= 0:
        raise ValueError("the windows hold no inferred frames")
    hists: dict[str, Histogram] = {}
    for name, ref_h in training.histograms.items():
        h = s.histograms.get(name)
        if h is None:
            continue
        if list(h.edges) != list(ref_h.edges):
            raise ValueError(f"{name}: the windows' bins differ from the training reference's")
        hists[name] = Histogram(edges=h.edges, counts=list(h.counts))
    classes = len(training.class_prior)
    prior = [s.class_counts.get(c, 0) / n for c in range(classes)]
    conf = sum((w.confidence_mean or 0.0) * w.frames.inferred for w in windows) / n
    # What belongs to the model (artifact, ATC threshold, calibration) stays; the distributions are the device's.
    return training.model_copy(
        update={
            "images": n,
            "histograms": hists,
            "class_prior": prior,
            "mean_confidence": min(1.0, max(0.0, conf)),
            "accuracy": None,  # no labels: the device's own frames
        }
    )


def differences(device: ReferenceStats, training: ReferenceStats, js_floor: float = 0.02) -> dict[str, float]:
    """Features (and the class prior) whose device distribution differs from the training one by at least
    ``js_floor`` bits of Jensen-Shannon divergence: what the rebased reference takes as this device's normal."""
    out = {}
    for name in [*training.histograms, CLASS_PRIOR]:
        if name != CLASS_PRIOR and name not in device.histograms:
            continue
        js = js_divergence(
            np.asarray(_reference_counts(device, name)), np.asarray(_reference_counts(training, name))
        )
        if js >= js_floor:
            out[name] = round(js, 4)
    return out


@dataclass(frozen=True)
class DeviceReference:
    """One device's own reference for one model, from its first windows after ``since`` (a promotion)."""

    device: str
    model_sha256: str
    since: float
    windows: int
    stats: ReferenceStats
    differs: dict[str, float] = field(default_factory=dict)
    """Feature -> JS divergence (bits) from the training reference, for features at or above the floor."""

    @property
    def label(self) -> str:
        return device_label(self.since)

    def key_reference(self) -> KeyReference:
        return KeyReference(self.stats, self.label, correlated=True)
