"""AUROC, Mann-Whitney p-values and Benjamini-Hochberg against independent references."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats as st
import torch

from auditor.invert import (
    InvertParams,
    auroc,
    auroc_vector,
    benjamini_hochberg,
    evaluate,
    explain,
    mannwhitney,
)


def pair_auroc(a, y):
    pos, neg = a[y], a[~y]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    gt = int((pos[:, None] > neg[None, :]).sum())
    eq = int((pos[:, None] == neg[None, :]).sum())
    return (2 * gt + eq) / (2 * len(pos) * len(neg))


def tied_data(rng, N, K):
    A = np.round(np.maximum(rng.normal(size=(N, K)), 0), 1)  # zeros and ties
    A[:, 0] = rng.integers(0, 3, N)  # very heavy ties
    return A


# ------------------------------------------------------------------------------ AUROC


@pytest.mark.parametrize("sparse", [False, True])
def test_auroc_matrix_matches_pairwise(sparse):
    rng = np.random.default_rng(0)
    N, K, C = 150, 6, 9
    A = tied_data(rng, N, K).astype(np.float32)
    Y = rng.random((N, C)) < 0.2
    Y[:, 2] = False
    Y[:, 5] = True
    got = auroc(A, sp.csr_matrix(Y) if sparse else Y.astype(np.int32))
    assert got.shape == (K, C)
    for k in range(K):
        for c in range(C):
            ref = pair_auroc(A[:, k].astype(np.float64), Y[:, c])
            if math.isnan(ref):
                assert math.isnan(got[k, c])
            else:
                assert got[k, c] == pytest.approx(ref, abs=1e-12)


def test_auroc_chunked_and_torch_input():
    rng = np.random.default_rng(1)
    A = tied_data(rng, 80, 7)
    Y = rng.random((80, 4)) < 0.3
    full = auroc(A, Y)
    np.testing.assert_array_equal(auroc(torch.from_numpy(A), torch.from_numpy(Y), chunk_neurons=2), full)


def test_auroc_vector():
    rng = np.random.default_rng(2)
    for _ in range(30):
        n = int(rng.integers(2, 60))
        a = rng.integers(0, 5, n).astype(float)
        y = rng.random(n) < 0.4
        ref = pair_auroc(a, y)
        got = auroc_vector(a, y)
        if math.isnan(ref):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(ref, abs=1e-12)
    assert math.isnan(auroc_vector([1.0, 2.0], [True, True]))
    assert auroc_vector([1.0, 1.0, 1.0], [1, 0, 0]) == 0.5


def test_auroc_precision_at_large_n():
    """N = 10**6: rank sums near 1e12; AUROC still exact (compare a closed form)."""
    N = 1_000_000
    a = np.arange(N, dtype=np.float64)
    y = np.zeros(N, bool)
    y[::3] = True  # positives at 0, 3, 6, ...
    n1 = int(y.sum())
    n0 = N - n1
    # U = sum over positives of the number of negatives below it (exact integers)
    pos = np.flatnonzero(y)
    U = int((pos - np.arange(n1)).sum())
    assert auroc_vector(a, y) == U / (n1 * n0)


# ------------------------------------------------------------------------------ p-values


def _check_p(a, y, alt, rtol=1e-6):
    p, lp = mannwhitney(a, y, alt)
    ref = st.mannwhitneyu(a[y], a[~y], alternative=alt).pvalue
    assert p == pytest.approx(ref, rel=rtol, abs=0), (alt, p, ref)
    if ref > 0:
        assert lp == pytest.approx(math.log10(ref), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("alt", ["two-sided", "greater", "less"])
def test_mannwhitney_with_ties(alt):
    rng = np.random.default_rng(3)
    for _ in range(40):
        n = int(rng.integers(4, 200))
        a = rng.integers(0, 6, n).astype(float)
        y = rng.random(n) < rng.uniform(0.05, 0.6)
        if y.sum() == 0 or y.sum() == n:
            continue
        _check_p(a, y, alt)


@pytest.mark.parametrize("alt", ["two-sided", "greater", "less"])
def test_mannwhitney_exact_small(alt):
    """No ties and a sample of <= 8: scipy's method='auto' uses the exact distribution."""
    rng = np.random.default_rng(4)
    for n1, n2 in [(1, 1), (1, 7), (2, 2), (3, 5), (5, 5), (8, 8), (8, 30), (4, 200), (20, 3), (9, 9)]:
        for _ in range(5):
            a = rng.permutation(n1 + n2) * 0.37 + 1.0
            y = np.zeros(n1 + n2, bool)
            y[rng.choice(n1 + n2, n1, replace=False)] = True
            _check_p(a, y, alt, rtol=1e-9)
        # the most extreme arrangement
        a = np.arange(n1 + n2, dtype=float)
        y = np.zeros(n1 + n2, bool)
        y[-n1:] = True
        _check_p(a, y, alt, rtol=1e-9)


def test_mannwhitney_exact_one_small_sample_in_large_n():
    rng = np.random.default_rng(5)
    n = 3000
    a = rng.permutation(n).astype(float)
    for n1 in (1, 3, 8):
        y = np.zeros(n, bool)
        y[np.argsort(a)[-n1 - 5 : -5]] = True  # near the top
        for alt in ("two-sided", "greater", "less"):
            _check_p(a, y, alt, rtol=1e-8)


@pytest.mark.parametrize("alt", ["two-sided", "greater", "less"])
def test_mannwhitney_large_n(alt):
    rng = np.random.default_rng(6)
    n = 20000
    a = np.maximum(rng.normal(size=n), 0).astype(np.float32).astype(np.float64)
    y = rng.random(n) < 0.1 + 0.2 * (a > 1)
    _check_p(a, y, alt)


def test_mannwhitney_float32_like_reference():
    """Float32 inputs are ranked exactly; p agrees with scipy on the float64 values."""
    rng = np.random.default_rng(7)
    a = rng.normal(size=500).astype(np.float32)
    y = rng.random(500) < 0.3
    p, _ = mannwhitney(a, y)
    ref = st.mannwhitneyu(a[y].astype(np.float64), a[~y].astype(np.float64)).pvalue
    assert p == pytest.approx(ref, rel=1e-9)


def test_log10_p_finite_when_p_underflows():
    n = 50_000
    a = np.arange(n, dtype=np.float64)
    y = a >= n // 2  # perfect separation
    p, lp = mannwhitney(a, y, "greater")
    assert p == 0.0  # far below the smallest float64
    assert math.isfinite(lp) and lp < -300
    # independent value: z from the normal approximation, log10 of its tail with mpmath
    n1 = n0 = n // 2
    U = n1 * n0
    z = (U - n1 * n0 / 2 - 0.5) / math.sqrt(n1 * n0 / 12 * (n + 1))
    mpmath.mp.dps = 30
    ref = float(mpmath.log10(mpmath.erfc(mpmath.mpf(z) / mpmath.sqrt(2)) / 2))
    assert lp == pytest.approx(ref, rel=1e-9)
    p2, lp2 = mannwhitney(a, y, "two-sided")
    assert lp2 == pytest.approx(ref + math.log10(2), rel=1e-9)
    pl, lpl = mannwhitney(a, y, "less")
    assert pl == 1.0 and lpl == 0.0


def test_mannwhitney_degenerate():
    p, lp = mannwhitney([1.0, 2.0, 3.0], [True, True, True])
    assert math.isnan(p) and math.isnan(lp)
    p, lp = mannwhitney([2.0, 2.0, 2.0, 2.0], [True, False, True, False])
    assert p == st.mannwhitneyu([2.0, 2.0], [2.0, 2.0]).pvalue == 1.0


def test_explain_p_values_match_scipy():
    rng = np.random.default_rng(8)
    N, K, C = 400, 5, 12
    A = tied_data(rng, N, K)
    Y = rng.random((N, C)) < 0.15
    names = [f"c{i}" for i in range(C)]
    for alt in ("two-sided", "greater"):
        res = explain(A, Y, names, InvertParams(length=2, beam=3, alternative=alt))
        for r in res:
            for f in r.formulas:
                y = evaluate(f.ast, Y, names)
                ref = st.mannwhitneyu(A[y, r.index], A[~y, r.index], alternative=alt).pvalue
                assert f.p_value == pytest.approx(ref, rel=1e-6)


# ------------------------------------------------------------------------------ BH


def test_benjamini_hochberg_hand_example():
    p = [0.01, 0.04, 0.03, 0.005, np.nan]
    # m = 4; sorted 0.005, 0.01, 0.03, 0.04 -> *4/rank = 0.02, 0.02, 0.04, 0.04 -> running min
    expected = [0.02, 0.04, 0.04, 0.02, np.nan]
    np.testing.assert_allclose(benjamini_hochberg(p), expected, rtol=1e-15)


def test_benjamini_hochberg_properties():
    rng = np.random.default_rng(9)
    p = rng.random(200) ** 3
    p[::17] = np.nan
    q = benjamini_hochberg(p)
    ok = ~np.isnan(p)
    assert np.array_equal(np.isnan(q), ~ok)
    assert np.all(q[ok] >= p[ok]) and np.all(q[ok] <= 1)
    np.testing.assert_allclose(q[ok], st.false_discovery_control(p[ok]), rtol=1e-12)
    assert benjamini_hochberg([]).shape == (0,)
    assert benjamini_hochberg([0.9, 0.95]).tolist() == [0.95, 0.95]


# ------------------------------------------------------------------------------ ranks


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int64])
def test_ranks_match_scipy_rankdata(dtype):
    from auditor.invert._ranks import rank2_numpy, rank2_torch

    rng = np.random.default_rng(10)
    for trial in range(12):
        k, n = int(rng.integers(1, 5)), int(rng.integers(1, 300))
        x = rng.normal(size=(k, n)) * [1.0, 1e-30, 1e10][trial % 3]
        if trial % 2:
            x = np.round(x)
        if trial % 3 == 0:
            x[:, : n // 2] = -0.0  # -0.0 and 0.0 are one value
            x[:, n // 2 :: 3] = 0.0
        if trial % 4 == 0:
            x[0, 0], x[-1, -1] = np.inf, -np.inf
        with np.errstate(over="ignore", invalid="ignore"):
            x = np.clip(np.round(x), -1e9, 1e9).astype(dtype) if dtype == np.int64 else x.astype(dtype)
        ref = st.rankdata(x.astype(np.float64), axis=1) * 2
        tie_ref = np.array([float(sum(c**3 - c for c in np.unique(r, return_counts=True)[1].astype(float)))
                            for r in x.astype(np.float64)])
        r2, tie = rank2_numpy(x)
        np.testing.assert_array_equal(r2, ref)
        np.testing.assert_array_equal(tie, tie_ref)
        r2t, tiet = rank2_torch(torch.from_numpy(x))
        np.testing.assert_array_equal(r2t.numpy(), ref)
        np.testing.assert_array_equal(tiet.numpy(), tie_ref)


def test_float64_not_float32_exact_ranked_exactly():
    from auditor.invert._ranks import rank2_numpy

    x = np.array([[1.0, 1.0 + 2**-40, 1.0 - 2**-40, 1.0]])  # equal as float32, distinct as float64
    np.testing.assert_array_equal(rank2_numpy(x)[0], st.rankdata(x, axis=1) * 2)


def test_pack_bits_torch_matches_numpy():
    from auditor.invert._search import pack_bits_torch

    rng = np.random.default_rng(12)
    for n in (1, 7, 8, 9, 64, 333):
        x = rng.random((2, 3, n)) < 0.4
        np.testing.assert_array_equal(pack_bits_torch(torch.from_numpy(x)).numpy(), np.packbits(x, axis=-1))
