"""DeLong AUROC variance and interval against brute-force and bootstrap references."""

from __future__ import annotations

import numpy as np
import pytest

from auditor.delong import delong, delong_ci


def _brute(a: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """AUROC and DeLong variance from explicit pairwise comparisons (the 1988 definition)."""
    pos, neg = a[y], a[~y]
    psi = (pos[:, None] > neg[None, :]).astype(float) + 0.5 * (pos[:, None] == neg[None, :])
    auc = psi.mean()
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return auc, v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg)


@pytest.mark.parametrize("ties", [False, True])
def test_matches_pairwise_definition(ties):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(150, 5))
    if ties:
        a = np.round(a, 1)  # many ties: mid-ranks must count them half
    y = rng.random(150) < 0.3
    a[y, :3] += np.array([0.3, 1.0, 2.0])
    auc, var = delong(a, y)
    for k in range(a.shape[1]):
        ref_auc, ref_var = _brute(a[:, k], y)
        assert auc[k] == pytest.approx(ref_auc, abs=1e-12)
        assert var[k] == pytest.approx(ref_var, rel=1e-9)


def test_agrees_with_bootstrap_variance():
    rng = np.random.default_rng(7)
    n = 400
    y = rng.random(n) < 0.25
    a = rng.normal(size=n) + 0.8 * y
    _, var = delong(a, y)
    boots = []
    for _ in range(2000):
        idx = rng.integers(0, n, n)
        yy = y[idx]
        if yy.all() or not yy.any():
            continue
        boots.append(_brute(a[idx], yy)[0])
    assert float(var[0]) == pytest.approx(np.var(boots, ddof=1), rel=0.15)


def test_interval_covers_the_true_auroc_about_95_percent():
    # binormal model with shift d: true AUROC = Phi(d / sqrt(2))
    from scipy.stats import norm

    rng = np.random.default_rng(3)
    d, n, reps = 1.0, 200, 400
    truth = norm.cdf(d / np.sqrt(2))
    a = rng.normal(size=(n, reps))
    y = rng.random(n) < 0.3
    a[y] += d
    _, lo, hi = delong_ci(a, y)
    coverage = np.mean((lo <= truth) & (truth <= hi))
    assert 0.91 <= coverage <= 0.985


def test_degenerate_labels_give_nan():
    auc, var = delong(np.arange(10.0), np.zeros(10, dtype=bool))
    assert np.isnan(auc).all() and np.isnan(var).all()
    with pytest.raises(ValueError):
        delong(np.zeros((5, 2)), np.zeros(4, dtype=bool))
