"""Classification metrics on probability rows: accuracy, per-class P/R/F1, confusion, ECE, NLL (pure numpy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ECE_BINS = 15


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = number of samples of true class i predicted as j."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return cm


def precision_recall_f1(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 and support from a confusion matrix (0 where undefined)."""
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(0).astype(np.float64)
    support = cm.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1, support


def reliability(probs: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Equal-width confidence bins: per bin count, mean confidence and accuracy (for ECE and diagrams)."""
    conf = probs.max(1)
    correct = (probs.argmax(1) == y_true).astype(np.float64)
    # bin b holds confidences in (b/B, (b+1)/B]; confidence 0 falls in the first bin
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=conf, minlength=bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=bins)
    nz = count > 0
    return {
        "edges": [round(float(e), 6) for e in np.linspace(0, 1, bins + 1)],
        "count": count.astype(int).tolist(),
        "confidence": np.divide(conf_sum, count, out=np.zeros(bins), where=nz).tolist(),
        "accuracy": np.divide(acc_sum, count, out=np.zeros(bins), where=nz).tolist(),
    }


def ece(probs: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error with ``bins`` equal-width confidence bins (Guo et al. 2017)."""
    r = reliability(probs, y_true, bins)
    count = np.asarray(r["count"], np.float64)
    gap = np.abs(np.asarray(r["accuracy"]) - np.asarray(r["confidence"]))
    return float((count * gap).sum() / max(1.0, count.sum()))


def nll(probs: np.ndarray, y_true: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped at machine epsilon)."""
    p = np.asarray(probs, np.float64)[np.arange(len(y_true)), y_true]
    return float(-np.log(np.clip(p, np.finfo(np.float64).eps, 1.0)).mean())


def classification_report(probs: np.ndarray, y_true: np.ndarray, labels: Sequence[str]) -> dict[str, object]:
    """Accuracy, macro F1, per-class precision/recall/F1/support, confusion matrix, ECE and NLL."""
    y_true = np.asarray(y_true, np.int64)
    pred = probs.argmax(1)
    cm = confusion_matrix(y_true, pred, len(labels))
    p, r, f1, support = precision_recall_f1(cm)
    present = support > 0
    return {
        "images": int(len(y_true)),
        "accuracy": float((pred == y_true).mean()) if len(y_true) else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "ece": ece(probs, y_true),
        "nll": nll(probs, y_true),
        "mean_confidence": float(probs.max(1).mean()),
        "per_class": {
            lab: {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, lab in enumerate(labels)
        },
        "confusion": cm.tolist(),
    }
