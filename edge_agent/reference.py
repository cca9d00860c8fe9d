"""The drift reference in model.json: what "normal" looks like for a model, shared by trainer and devices.

The trainer computes it on held-out data through the exact edge preprocessing and the int8 artifact
(so the histograms use the same bin edges and the same arithmetic as every device's telemetry). The
trainer's drift engine compares fleet windows against it; a device's update health window checks that a
new model's confidence has not collapsed against it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from edge_agent.protocol import Histogram


class ReferenceStats(BaseModel):
    """Reference statistics of one model on held-out data."""

    model_config = ConfigDict(extra="forbid")
    artifact: str
    """The artifact the statistics were computed with (normally the int8 one devices run)."""
    images: int = Field(ge=1)
    histograms: dict[str, Histogram]
    """Same names and edges as ``telemetry_edges``: confidence, entropy, margin, brightness, ..."""
    class_prior: list[float]
    """Share of each predicted class on the reference data (sums to 1)."""
    mean_confidence: float = Field(ge=0.0, le=1.0)
    accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    """Top-1 accuracy of the artifact on the reference data (labelled held-out set)."""
    atc_threshold: float | None = None
    """Average Thresholded Confidence (Garg et al., ICLR 2022): the confidence threshold t such that the
    share of reference predictions with confidence above t equals the reference accuracy. On new data the
    share above t estimates accuracy without labels."""
    atc_score: str = "max_softmax"
    """Score the ATC threshold applies to (max-softmax confidence after temperature scaling)."""
    confidence_bin_accuracy: list[float] | None = None
    """Top-1 accuracy of the reference frames in each bin of ``histograms["confidence"]`` (a reliability
    diagram; empty bins shrink to the bin's mid confidence). Turns each frame's confidence into a
    calibrated probability of being correct for the trainer's accuracy estimate; optional, so packages
    built before it still load."""
