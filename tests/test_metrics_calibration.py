"""Metrics agree with scikit-learn; temperature scaling fixes an over-confident model; ATC thresholds."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from trainer.drift.estimate import share_below
from trainer.evaluation.calibration import fit_temperature, softmax
from trainer.evaluation.metrics import (
    classification_report,
    confusion_matrix,
    ece,
    nll,
    precision_recall_f1,
    reliability,
)
from trainer.evaluation.reference import atc_threshold


def _random_case(seed: int, n: int = 300, k: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), y] += rng.uniform(0, 3)  # some signal, some errors
    if seed % 2:
        logits[:, k - 1] = -50  # one class is never predicted: zero-division paths
    return softmax(logits), y


@pytest.mark.parametrize("seed", range(6))
def test_metrics_agree_with_scikit_learn(seed: int) -> None:
    probs, y = _random_case(seed)
    k = probs.shape[1]
    pred = probs.argmax(1)
    labels = [f"c{i}" for i in range(k)]
    cm = confusion_matrix(y, pred, k)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y, pred, labels=range(k)))
    p, r, f1, support = precision_recall_f1(cm)
    sp, sr, sf, ss = skm.precision_recall_fscore_support(y, pred, labels=range(k), zero_division=0)
    np.testing.assert_allclose(p, sp)
    np.testing.assert_allclose(r, sr)
    np.testing.assert_allclose(f1, sf)
    np.testing.assert_array_equal(support, ss)
    rep = classification_report(probs, y, labels)
    assert rep["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert rep["macro_f1"] == pytest.approx(
        skm.f1_score(y, pred, labels=range(k), average="macro", zero_division=0)
    )
    assert rep["nll"] == pytest.approx(skm.log_loss(y, probs, labels=range(k)), rel=1e-6)
    assert rep["per_class"]["c0"]["support"] == int((y == 0).sum())


def test_ece_matches_a_direct_computation_and_edge_cases() -> None:
    probs, y = _random_case(3, n=500)
    conf, correct = probs.max(1), probs.argmax(1) == y
    want = 0.0
    for b in range(15):  # bins (b/15, (b+1)/15]
        m = (conf > b / 15) & (conf <= (b + 1) / 15)
        if m.any():
            want += m.mean() * abs(correct[m].mean() - conf[m].mean())
    assert ece(probs, y) == pytest.approx(want)
    r = reliability(probs, y)
    assert sum(r["count"]) == 500 and len(r["edges"]) == 16
    perfect = np.eye(4)[[0, 1, 2, 3]]
    assert ece(perfect, np.arange(4)) == 0.0
    assert nll(perfect, np.arange(4)) == pytest.approx(0.0, abs=1e-9)


def test_temperature_scaling_fixes_an_overconfident_model() -> None:
    rng = np.random.default_rng(0)
    n, k = 4000, 5
    y = rng.integers(0, k, n)
    true_logits = rng.normal(0, 1, (n, k))
    true_logits[np.arange(n), y] += 1.5
    # labels drawn from softmax(true_logits); the "model" reports logits 4x too large: over-confident
    y = np.array([rng.choice(k, p=p) for p in softmax(true_logits)])
    logits = 4.0 * true_logits
    val, test = slice(0, 2000), slice(2000, None)
    t = fit_temperature(logits[val], y[val])
    assert 3.3 < t < 4.8, t  # recovers the over-scaling
    before, after = ece(softmax(logits[test]), y[test]), ece(softmax(logits[test], t), y[test])
    assert before > 0.15 and after < 0.03 and after < before / 5, (before, after)
    assert nll(softmax(logits[test], t), y[test]) < nll(softmax(logits[test]), y[test])
    # argmax (accuracy) is unchanged by a temperature
    np.testing.assert_array_equal(softmax(logits, t).argmax(1), logits.argmax(1))
    # an under-confident model gets T < 1
    assert fit_temperature(0.3 * true_logits[val], y[val]) < 0.5
    with pytest.raises(ValueError):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int))


def test_atc_threshold_reproduces_the_accuracy_and_the_histogram_estimate_agrees() -> None:
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.2, 1.0, 1000)
    correct = rng.random(1000) < conf  # calibrated-ish
    t = atc_threshold(conf, correct)
    assert np.mean(conf > t) == pytest.approx(correct.mean(), abs=1e-3)
    assert np.mean(conf > atc_threshold(conf, np.ones(1000, bool))) == 1.0
    assert np.mean(conf > atc_threshold(conf, np.zeros(1000, bool))) == 0.0
    from edge_agent.protocol import Histogram

    edges = [round(x, 2) for x in np.linspace(0, 1, 21)]
    counts = np.histogram(conf, bins=edges)[0].tolist()
    below = share_below(Histogram(edges=edges, counts=counts), t)  # what the drift service computes
    assert below is not None and 1 - below == pytest.approx(np.mean(conf > t), abs=0.02)
