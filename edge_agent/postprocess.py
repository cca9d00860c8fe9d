"""Runtime outputs to calibrated probabilities."""

from __future__ import annotations

import numpy as np


def to_probabilities(raw: np.ndarray, output_kind: str, temperature: float = 1.0) -> np.ndarray:
    """Rows of logits (softmax with ``temperature``) or probabilities (renormalised) -> probabilities.

    Non-finite outputs are returned as NaN rows, so callers can count them as failed frames.
    """
    x = np.asarray(raw, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    x = x.reshape(x.shape[0], -1)
    if output_kind == "logits":
        z = x / np.float32(temperature)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        p = e / e.sum(axis=1, keepdims=True)
    elif output_kind == "probabilities":
        p = np.clip(x, 0.0, None)
        p = p / p.sum(axis=1, keepdims=True)
    else:
        raise ValueError(f"unknown output kind {output_kind!r}")
    bad = ~np.isfinite(p).all(axis=1)
    if bad.any():
        p[bad] = np.nan
    return p


def top_k(probs: np.ndarray, k: int = 3) -> list[tuple[int, float]]:
    """Best ``k`` (class, probability) of one probability vector."""
    k = min(k, probs.shape[-1])
    idx = np.argpartition(probs, -k)[-k:]
    idx = idx[np.argsort(probs[idx])[::-1]]
    return [(int(i), round(float(probs[i]), 5)) for i in idx]
