"""The evaluation stage: metrics, runs on torch and every artifact, calibration, reference statistics, the gate, the model card and dataset checks."""

from trainer.evaluation.calibration import fit_temperature, softmax
from trainer.evaluation.card import write_card
from trainer.evaluation.data_check import check_dataset, phash
from trainer.evaluation.gate import GateRules, check_gate, mcnemar_worse_p
from trainer.evaluation.metrics import (
    classification_report,
    confusion_matrix,
    ece,
    nll,
    precision_recall_f1,
    reliability,
)
from trainer.evaluation.reference import (
    atc_threshold,
    confidence_bin_accuracy,
    reference_stats,
)
from trainer.evaluation.runners import (
    ArtifactRunner,
    Runner,
    TorchRunner,
    evaluate_package,
    report,
    robustness,
    stratified,
)

__all__ = [
    "ArtifactRunner",
    "atc_threshold",
    "check_dataset",
    "check_gate",
    "classification_report",
    "confidence_bin_accuracy",
    "confusion_matrix",
    "ece",
    "evaluate_package",
    "fit_temperature",
    "GateRules",
    "mcnemar_worse_p",
    "nll",
    "phash",
    "precision_recall_f1",
    "reference_stats",
    "reliability",
    "report",
    "robustness",
    "Runner",
    "softmax",
    "stratified",
    "TorchRunner",
    "write_card",
]
