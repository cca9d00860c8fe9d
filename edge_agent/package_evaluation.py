"""The evaluation block of model.json: what the trainer measured before it released the model.

Part of the package contract (docs/model-package.md): the trainer writes it, the release tooling,
console and model card read it, and :func:`edge_agent.package.load_package` validates it, so a package
whose evaluation is missing the device artifact's test report or the gate decision does not load.
Blocks carry more fields than are named here (robustness tables, training history); those pass through.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    """A block whose named fields are checked and whose other fields pass through unchanged."""

    model_config = ConfigDict(extra="allow")


class SliceScore(_Open):
    """Accuracy on the test images of one slice (e.g. ``lighting=night``)."""

    accuracy: float
    images: int = Field(ge=0)


class ReportScores(_Open):
    """What a gate reads of a model's test report: accuracy, calibration, size and slices."""

    accuracy: float
    ece: float
    images: int = Field(ge=0)
    slices: dict[str, dict[str, SliceScore]] = Field(default_factory=dict)
    """Slice key (``lighting``) -> value (``night``) -> score."""


class ClassScores(BaseModel):
    precision: float
    recall: float
    f1: float
    support: int = Field(ge=0)


class ModelReport(ReportScores):
    """One model's (torch or an artifact's) full report on the test split."""

    macro_f1: float
    nll: float
    mean_confidence: float
    per_class: dict[str, ClassScores]
    confusion: list[list[int]]


class RuleResult(BaseModel):
    """One gate rule's verdict and why, e.g. ``max_int8_drop[onnx-int8]: 91.0% vs torch fp32 ...``."""

    rule: str
    passed: bool
    detail: str


class GateRecord(_Open):
    """The gate's decision as written into model.json, with the rules and paired counts it used."""

    passed: bool
    rules: list[RuleResult]
    rules_config: dict[str, Any] = Field(default_factory=dict)
    discordant: dict[str, tuple[int, int]] = Field(default_factory=dict)
    """Paired counts (images lost, images gained) per comparison (``overall``, ``int8[KEY]``, ...)."""


class Evaluation(_Open):
    """model.json's ``evaluation``: test reports per model, held-out accuracy, the gate decision."""

    device_artifact: str
    """The artifact devices run; its report is what the gate and the drift reference use."""
    models: dict[str, ModelReport]
    heldout_accuracy: dict[str, float]
    """Model key (``torch-fp32``, ``onnx-int8``, ...) -> accuracy on validation + test."""
    gate: GateRecord
    champion: dict[str, Any] | None = None
    """The champion's report on the same test images, when the candidate was gated against one."""
    dataset: dict[str, Any] = Field(default_factory=dict)
    calibration: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    timings_s: dict[str, float] = Field(default_factory=dict)
    robustness: dict[str, Any] | None = None
    """Accuracy per corruption and severity for each model (absent when robustness was switched off)."""
    reference_data: dict[str, Any] | None = None
    """Which held-out images and artifact the drift reference was computed from."""

    def device_report(self) -> ModelReport:
        """The device artifact's test report (its presence is checked on load)."""
        return self.models[self.device_artifact]
