"""Statistics on fixed-edge histograms: homogeneity tests, divergences, null thresholds, FDR control."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from scipy.special import chdtrc, chndtr
from scipy.stats import chi2

_EPS = 1e-12


def merge_sparse_bins(
    a: np.ndarray, b: np.ndarray, min_expected: float = 5.0
) -> tuple[np.ndarray, np.ndarray]:
    """Merge adjacent bins until every merged bin's expected count (under homogeneity) is >= min_expected.

    The chi-square approximation needs it; merging neighbours keeps the ordinal structure of the feature.
    """
    a_l, b_l = np.asarray(a, np.float64).tolist(), np.asarray(b, np.float64).tolist()
    sa, sb = sum(a_l), sum(b_l)
    if sa + sb == 0:
        return np.zeros(1), np.zeros(1)
    share = min(sa, sb) / (sa + sb)
    ma: list[float] = []
    mb: list[float] = []
    ca = cb = 0.0
    for x, y in zip(a_l, b_l):  # plain floats: ~10x faster than numpy scalars for 20 bins
        ca += x
        cb += y
        if (ca + cb) * share >= min_expected:
            ma.append(ca)
            mb.append(cb)
            ca = cb = 0.0
    if ca or cb or not ma:
        if ma:
            ma[-1] += ca
            mb[-1] += cb
        else:
            ma.append(ca)
            mb.append(cb)
    return np.array(ma), np.array(mb)


def chi2_homogeneity(
    window: Sequence[float] | np.ndarray, reference: Sequence[float] | np.ndarray
) -> tuple[float, int, float]:
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
    stat = float(
        (((a - ea) ** 2) / np.maximum(ea, _EPS)).sum() + (((b - eb) ** 2) / np.maximum(eb, _EPS)).sum()
    )
    df = k - 1
    return stat, df, float(chdtrc(df, stat))


def reference_robust_pvalue(
    stat: float, df: int, n_window: float, n_reference: float, coverage: float = 0.999
) -> float:
    """P-value of a window-vs-reference chi-square statistic that holds for the *fixed* reference in use.

    The two-sample p-value is calibrated over draws of both the window and the reference. But one
    reference serves every window of every device, so its own sampling error is a fixed offset that
    all windows share: after an unlucky reference draw the same feature fails window after window.
    In whitened coordinates the statistic is ``X = |d + e|^2 / (v_r + v_w)`` with reference offset
    ``|d|^2 / v_r = C ~ chi2(df)`` and window noise ``e``, so given C,
    ``X / (1 - rho) ~ noncentral chi2(df, C * rho / (1 - rho))`` with ``rho = n_w / (n_w + n_r)``.
    This p-value takes the least favourable C within the reference's ``coverage`` region (its
    ``coverage`` quantile): for any reference whose error lies in that region the false-alarm rate is at
    most the nominal one. It is never below the plain two-sample p-value, and tends to it as the
    reference grows (rho -> 0).
    """
    if df <= 0 or n_window <= 0:
        return 1.0
    if n_reference <= 0:
        return 1.0
    rho = n_window / (n_window + n_reference)
    nc = _chi2_quantile(coverage, df) * rho / (1.0 - rho)
    # Beyond the coverage region the conditional tail is lighter than the marginal one: never go below it.
    return max(float(1.0 - chndtr(stat / (1.0 - rho), df, nc)), float(chdtrc(df, stat)))


@lru_cache(maxsize=1024)
def _chi2_quantile(q: float, df: int) -> float:
    return float(chi2.ppf(q, df))


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


def null_js_threshold(
    reference: Sequence[int], n: int, q: float = 0.999, draws: int = 2000, seed: int = 0
) -> float:
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
