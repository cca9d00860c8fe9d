"""Drift detection and accuracy estimation on telemetry windows (pure: numbers in, numbers out; no runtime, no I/O)."""

from trainer.drift.accuracy import audit_label, estimate_device_accuracy, window_estimator, with_prior
from trainer.drift.detector import (
    TRAINING_REFERENCE,
    DriftConfig,
    DriftMonitor,
    KeyReference,
    Transition,
    assess_window,
)
from trainer.drift.estimate import entropy_threshold, estimate_accuracy, share_below
from trainer.drift.labelfree import (
    FEATURES,
    AccuracyRegressor,
    MergedWindows,
    calibrated_confidence,
    fit_regressor,
    window_features,
)
from trainer.drift.ppi import AuditLabel, ppi_mean
from trainer.drift.rebase import DeviceReference, device_label, differences, reference_from_windows
from trainer.drift.stats import (
    benjamini_hochberg,
    chi2_homogeneity,
    js_divergence,
    null_js_threshold,
    reference_robust_pvalue,
)

__all__ = [
    "AccuracyRegressor",
    "assess_window",
    "audit_label",
    "AuditLabel",
    "benjamini_hochberg",
    "calibrated_confidence",
    "chi2_homogeneity",
    "device_label",
    "DeviceReference",
    "differences",
    "DriftConfig",
    "DriftMonitor",
    "entropy_threshold",
    "estimate_accuracy",
    "estimate_device_accuracy",
    "FEATURES",
    "fit_regressor",
    "js_divergence",
    "KeyReference",
    "MergedWindows",
    "null_js_threshold",
    "ppi_mean",
    "reference_from_windows",
    "reference_robust_pvalue",
    "share_below",
    "TRAINING_REFERENCE",
    "Transition",
    "window_estimator",
    "window_features",
    "with_prior",
]
