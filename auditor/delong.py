"""Analytic confidence intervals for AUROC (DeLong et al., 1988), vectorised over neurons.

For scores ``a`` (N images × K neurons) and one binary label ``y`` (an artifact
concept), the AUROC of every column and its DeLong variance

    var = s10² / m + s01² / n

where m, n are the numbers of positive and negative images, and s10², s01² the sample
variances of the structural components: for positive image i, V10_i = the share of
negatives it out-scores (ties count half); for negative image j, V01_j = the share of
positives that out-score it. Both come from mid-ranks, so the cost is one sort per
column (Sun & Xu, 2014, "Fast implementation of DeLong's algorithm").

The interval is AUROC ± z·√var, clipped to [0, 1]. It is the large-sample
interval; the report pairs it with a bootstrap interval for flagged neurons.
Pure numpy/scipy: no torch.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm, rankdata


def delong(a: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and its DeLong variance for every column of ``a`` against labels ``y``.

    ``a``: (N,) or (N, K) scores (a vector is one column); ``y``: (N,) booleans.
    Returns two (K,) arrays
    (NaN where ``y`` has no positive or no negative).
    """
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    y = np.asarray(y, dtype=bool)
    if y.shape[0] != a.shape[0]:
        raise ValueError(f"labels have {y.shape[0]} rows, scores {a.shape[0]}")
    m, n = int(y.sum()), int((~y).sum())
    K = a.shape[1]
    if m == 0 or n == 0:
        return np.full(K, np.nan), np.full(K, np.nan)
    pos, neg = a[y], a[~y]
    r_all = rankdata(a, axis=0)
    r_pos = rankdata(pos, axis=0)
    r_neg = rankdata(neg, axis=0)
    v10 = (r_all[y] - r_pos) / n  # (m, K): share of negatives below each positive
    v01 = 1.0 - (r_all[~y] - r_neg) / m  # (n, K): share of positives above each negative
    auc = v10.mean(axis=0)
    s10 = v10.var(axis=0, ddof=1) if m > 1 else np.zeros(K)
    s01 = v01.var(axis=0, ddof=1) if n > 1 else np.zeros(K)
    var = s10 / m + s01 / n
    return auc, var


def delong_ci(a: np.ndarray, y: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(auroc, low, high)`` per column: the DeLong interval at ``level``, clipped to [0, 1]."""
    auc, var = delong(a, y)
    z = float(norm.ppf(0.5 + level / 2))
    half = z * np.sqrt(np.maximum(var, 0.0))
    return auc, np.clip(auc - half, 0.0, 1.0), np.clip(auc + half, 0.0, 1.0)
