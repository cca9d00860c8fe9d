"""Temperature scaling (Guo et al., ICML 2017): one scalar T fitted on validation logits by NLL.

The negative log-likelihood of softmax(z / T) is convex in 1/T, hence unimodal in log T, so a
golden-section search over log T finds the optimum to any precision without gradients; dividing logits
by T never changes the argmax, so accuracy is untouched and only confidence is recalibrated.
"""

from __future__ import annotations

import math

import numpy as np

from trainer.evaluation.metrics import nll

T_MIN, T_MAX = 0.05, 20.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def fit_temperature(logits: np.ndarray, y_true: np.ndarray, tol: float = 1e-4) -> float:
    """The temperature minimising validation NLL, in [0.05, 20]."""
    if len(logits) == 0:
        raise ValueError("cannot fit a temperature on zero samples")
    y = np.asarray(y_true, np.int64)

    def loss(log_t: float) -> float:
        return nll(softmax(logits, math.exp(log_t)), y)

    a, b = math.log(T_MIN), math.log(T_MAX)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(c), loss(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = loss(d)
    return float(math.exp((a + b) / 2))
