"""Statistics on fixed-edge histograms: homogeneity tests, divergences, null thresholds, FDR control."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from scipy.stats import chi2

_EPS = 1e-12


def merge_sparse_bins(a: np.ndarray, b: np.ndarray, min_expected: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """Merge adjacent bins until every merged bin's expected count (under homogeneity) is >= min_expected.

    The chi-square approximation needs it; merging neighbours keeps the ordinal structure of the feature.
    """
    total = a.sum() + b.sum()
    if total == 0:
        return a[:1] * 0, b[:1] * 0
    col = a + b
    share = min(a.sum(), b.sum()) / total
    groups: list[list[int]] = []
    cur: list[int] = []
    acc = 0.0
    for i, c in enumerate(col):
        cur.append(i)
        acc += c
        if acc * share >= min_expected:
            groups.append(cur)
            cur, acc = [], 0.0
    if cur:
        if groups:
            groups[-1].extend(cur)
        else:
            groups.append(cur)
    ma = np.array([a[g].sum() for g in groups], dtype=np.float64)
    mb = np.array([b[g].sum() for g in groups], dtype=np.float64)
    return ma, mb


def chi2_homogeneity(window: Sequence[int], reference: Sequence[int]) -> tuple[float, int, float]:
    """Chi-square test that two histograms come from one distribution: (statistic, df, p-value).

    A two-sample test (2xK contingency table), so the reference's own sampling noise is accounted for.
    """
    a, b = merge_sparse_bins(np.asarray(window, np.float64), np.asarray(reference, np.float64))
    k = len(a)
    na, nb = a.sum(), b.sum()
    if k < 2 or na == 0 or nb == 0:
        return 0.0, 0, 1.0
    col = a + b
    n = na + nb
    ea, eb = col * na / n, col * nb / n
    stat = float((((a - ea) ** 2) / np.maximum(ea, _EPS)).sum() + (((b - eb) ** 2) / np.maximum(eb, _EPS)).sum())
    df = k - 1
    return stat, df, float(chi2.sf(stat, df))


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint) of two count or probability vectors."""
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    p = p / max(p.sum(), _EPS)
    q = q / max(q.sum(), _EPS)
    m = (p + q) / 2

    def kl(x: np.ndarray) -> float:
        mask = x > 0
        return float((x[mask] * np.log2(x[mask] / m[mask])).sum())

    return 0.5 * kl(p) + 0.5 * kl(q)


def psi(window: np.ndarray, reference: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index (reported beside JS; the classic monitoring number)."""
    p = np.asarray(window, np.float64) / max(float(np.sum(window)), _EPS) + eps
    q = np.asarray(reference, np.float64) / max(float(np.sum(reference)), _EPS) + eps
    return float(((p - q) * np.log(p / q)).sum())


@lru_cache(maxsize=4096)
def _null_js_quantile(ref_key: tuple[int, ...], n: int, q: float, draws: int, seed: int) -> float:
    ref = np.asarray(ref_key, np.float64)
    p = ref / ref.sum()
    rng = np.random.default_rng(seed)
    samples = rng.multinomial(n, p, size=draws)
    # The reference is itself a sample: resample it too, so the null covers both sampling noises.
    refs = rng.multinomial(int(ref.sum()), p, size=draws)
    values = np.array([js_divergence(s, r) for s, r in zip(samples, refs)])
    return float(np.quantile(values, q))


def null_js_threshold(reference: Sequence[int], n: int, q: float = 0.999, draws: int = 2000, seed: int = 0) -> float:
    """The ``q`` quantile of JS divergence between a size-``n`` window and the reference when nothing drifted.

    This is what makes the effect-size threshold depend on the window size: small windows differ from
    the reference by chance far more than large ones. Window sizes are bucketed (powers of 2^(1/4)) so
    the Monte Carlo runs once per bucket.
    """
    if n <= 0:
        return math.inf
    bucket = int(round(2 ** (round(4 * math.log2(n)) / 4)))
    return _null_js_quantile(tuple(int(c) for c in reference), max(1, bucket), q, draws, seed)


def benjamini_hochberg(pvalues: Sequence[float], alpha: float) -> np.ndarray:
    """Boolean mask of hypotheses rejected at false discovery rate ``alpha`` (Benjamini-Hochberg 1995)."""
    p = np.asarray(pvalues, np.float64)
    m = len(p)
    if m == 0:
        return np.zeros(0, dtype=bool)
    order = np.argsort(p)
    thresholds = alpha * (np.arange(1, m + 1) / m)
    passed = p[order] <= thresholds
    rejected = np.zeros(m, dtype=bool)
    if passed.any():
        k = int(np.max(np.nonzero(passed)[0]))
        rejected[order[: k + 1]] = True
    return rejected
