"""Uncertainty: bootstrap intervals per cell and paired tests adapter vs base (numpy only).

    bootstrap_interval(statistic, arrays, resamples, seed, level) -> (low, high)
        percentile bootstrap over examples: `arrays` are per-example columns resampled together
        (rng = numpy.random.default_rng(seed), indices rng.integers(0, n, (resamples, n)), as
        scipy.stats.bootstrap draws them)
    mean_of(values) / ratio_of(numerators, denominators)   the cell statistics, vectorised over resamples
    mcnemar_exact(base_correct, other_correct) -> p        two-sided exact McNemar (binomial on the
                                                           discordant pairs), for accuracy
    paired_permutation(base, other, resamples, seed) -> p  two-sided sign-flip permutation test of the
                                                           mean paired difference (exact up to 2**16
                                                           sign patterns, else Monte Carlo), for ROUGE-L,
                                                           F1 and per-example loss; the p-value is
                                                           computed as scipy.stats.permutation_test does
    verdict(p, difference, higher_is_better, alpha) -> "better" | "worse" | "no significant difference"

Hand-written because the package depends on numpy only (scipy is a test dependency: the tests compare
these with scipy's bootstrap, binomtest and permutation_test).
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Optional, Sequence

import numpy as np

BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no significant difference"
EXACT_PERMUTATION_MAX_N = 16


def mean_of(values: np.ndarray) -> np.ndarray:
    return values.mean(axis=-1)


def ratio_of(numerators: np.ndarray, denominators: np.ndarray) -> np.ndarray:
    """sum(numerators) / sum(denominators): a token-weighted mean loss from per-example sums."""
    return numerators.sum(axis=-1) / denominators.sum(axis=-1)


def bootstrap_interval(statistic: Callable[..., np.ndarray], arrays: Sequence[Sequence[float]], resamples: int,
                       seed: int, level: float = 0.95) -> tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap interval of statistic(*arrays); (None, None) without examples."""
    cols = [np.asarray(a, dtype=np.float64) for a in arrays]
    n = len(cols[0])
    if n == 0:
        return None, None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, (resamples, n))
    stats = statistic(*(c[idx] for c in cols))
    alpha = (1 - level) / 2
    lo, hi = np.percentile(stats, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def mcnemar_exact(base_correct: Sequence[bool], other_correct: Sequence[bool]) -> float:
    """Two-sided exact McNemar test: of the pairs where exactly one model is right, is the split 50/50?"""
    a, b = np.asarray(base_correct, bool), np.asarray(other_correct, bool)
    only_base, only_other = int((a & ~b).sum()), int((~a & b).sum())
    n = only_base + only_other
    if n == 0:
        return 1.0
    k = min(only_base, only_other)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _p_two_sided(null: np.ndarray, observed: float, exact: bool) -> float:
    """scipy.stats.permutation_test's two-sided p-value: twice the smaller one-sided p, capped at 1,
    comparisons with a relative tolerance of 100 machine epsilons; +1 in both counts when randomised."""
    gamma = abs(np.finfo(np.float64).eps * 100 * observed)
    adj = 0 if exact else 1
    less = ((null <= observed + gamma).sum() + adj) / (len(null) + adj)
    greater = ((null >= observed - gamma).sum() + adj) / (len(null) + adj)
    return float(min(1.0, 2 * min(less, greater)))


def paired_permutation(base: Sequence[float], other: Sequence[float], resamples: int, seed: int) -> float:
    """Two-sided paired permutation (sign-flip) test of mean(other - base) = 0."""
    d = np.asarray(other, np.float64) - np.asarray(base, np.float64)
    n = len(d)
    if n == 0:
        return 1.0
    observed = float(d.mean())
    exact = n <= EXACT_PERMUTATION_MAX_N and 2 ** n <= resamples
    if exact:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    else:
        signs = np.where(np.random.default_rng(seed).random((resamples, n)) < 0.5, -1.0, 1.0)
    return _p_two_sided((signs * d).mean(axis=1), observed, exact)


def verdict(p: Optional[float], difference: Optional[float], higher_is_better: bool, alpha: float) -> str:
    if p is None or difference is None or p >= alpha or difference == 0:
        return NO_DIFFERENCE
    return BETTER if (difference > 0) == higher_is_better else WORSE
