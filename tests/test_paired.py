"""Paired with/without-artifact statistics against scipy and by hand."""

import numpy as np
import pytest
from scipy import stats

from auditor.errors import DataError
from auditor.paired import STAT_KEYS, neuron_paired, paired_effects, paired_effects_by_artifact, wilcoxon_pvalues


def _data():
    # rows 0-5 clean, rows 6-11 their artifact copies (pair i: (i, i + 6)).
    clean = np.array([[1.0, 2.0, 5.0, 0.0],
                      [2.0, 2.0, 5.0, 1.0],
                      [3.0, 2.0, 5.0, 2.0],
                      [4.0, 2.0, 5.0, 3.0],
                      [5.0, 2.0, 5.0, 4.0],
                      [6.0, 2.0, 5.0, 5.0]])
    with_art = clean.copy()
    with_art[:, 0] += np.array([1.0, 2.0, 0.5, 3.0, -0.5, 1.5])  # mostly rises
    with_art[:, 1] += np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # constant on clean images, rises
    # column 2: no change at all; column 3: falls
    with_art[:, 3] -= np.array([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    A = np.vstack([clean, with_art])
    pairs = np.stack([np.arange(6), np.arange(6) + 6], axis=1)
    return A, pairs


def test_against_scipy_and_hand_computed():
    A, pairs = _data()
    out = paired_effects(A, pairs)
    assert set(out) == set(STAT_KEYS)
    D = A[pairs[:, 1]] - A[pairs[:, 0]]
    assert out["n_pairs"].tolist() == [6, 6, 6, 6]
    sd0 = A[:6, 0].std()  # population SD over the clean images
    assert out["mean_diff_sd"][0] == pytest.approx(D[:, 0].mean() / sd0)
    assert out["mean_diff_sd"][3] == pytest.approx(D[:, 3].mean() / A[:6, 3].std())
    assert out["frac_rise"].tolist() == pytest.approx([5 / 6, 1.0, 0.0, 0.0])
    for k in (0, 3):
        assert out["wilcoxon_p"][k] == pytest.approx(stats.wilcoxon(D[:, k]).pvalue)
    assert out["wilcoxon_p"][2] == 1.0  # all differences zero
    assert out["mean_diff_sd"][2] == 0.0


def test_sd_zero_guard():
    A, pairs = _data()
    out = paired_effects(A, pairs)
    # column 1 is constant on the clean images: scale by the SD over clean + artifact rows instead
    both = A[:, 1].std()
    assert both > 0
    assert out["mean_diff_sd"][1] == pytest.approx(1.0 / both)
    assert np.isfinite(out["mean_diff_sd"]).all() and np.isfinite(out["wilcoxon_p"]).all()
    # a neuron dead everywhere: effect 0, p 1
    dead = paired_effects(np.zeros((4, 1)), np.array([[0, 2], [1, 3]]))
    assert dead["mean_diff_sd"].tolist() == [0.0] and dead["wilcoxon_p"].tolist() == [1.0]
    # rounding noise on a constant column is not a tiny SD that blows the effect up
    A2 = np.full((4, 1), 0.1)
    A2[2:] += 0.3
    eff = paired_effects(A2, np.array([[0, 2], [1, 3]]))["mean_diff_sd"][0]
    assert eff == pytest.approx(0.3 / A2.std())


def test_clean_rows_argument_and_vs_scipy_random():
    rng = np.random.default_rng(0)
    N, K, M = 80, 7, 30
    A = rng.normal(size=(N, K))
    A[M:2 * M] = A[:M] + rng.normal(0.3, 1.0, size=(M, K))
    A[M + 3, 2] = A[3, 2]  # a zero difference (dropped by the test)
    pairs = np.stack([np.arange(M), np.arange(M) + M], axis=1)
    clean = np.r_[np.arange(M), np.arange(2 * M, N)]
    out = paired_effects(A, pairs, clean_rows=clean)
    D = A[M:2 * M] - A[:M]
    np.testing.assert_allclose(out["mean_diff_sd"], D.mean(0) / A[clean].std(0))
    expect = [stats.wilcoxon(D[:, k]).pvalue for k in range(K)]
    np.testing.assert_allclose(out["wilcoxon_p"], expect, rtol=1e-10)
    np.testing.assert_allclose(wilcoxon_pvalues(D), expect, rtol=1e-10)


def test_no_pairs_and_bad_input():
    out = paired_effects(np.ones((3, 2)), np.zeros((0, 2), dtype=int))
    assert out["n_pairs"].tolist() == [0, 0] and out["wilcoxon_p"].tolist() == [1.0, 1.0]
    with pytest.raises(DataError, match=r"pairs must be \(M, 2\)"):
        paired_effects(np.ones((3, 2)), np.array([1, 2, 3]))
    with pytest.raises(DataError, match="outside 0..2"):
        paired_effects(np.ones((3, 2)), np.array([[0, 3]]))
    A = np.ones((2, 1))
    A[1, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        paired_effects(A, np.array([[0, 1]]))


def test_by_artifact_and_neuron_record():
    A, pairs = _data()
    eff = paired_effects_by_artifact(A, {"watermark": pairs, "text": np.zeros((0, 2), dtype=int)})
    assert list(eff) == ["watermark"]
    rec = neuron_paired(eff, 0)
    assert set(rec["watermark"]) == set(STAT_KEYS)
    assert isinstance(rec["watermark"]["n_pairs"], int) and rec["watermark"]["n_pairs"] == 6
    assert all(isinstance(v, float) for k, v in rec["watermark"].items() if k != "n_pairs")


def test_vectorised_large_sample_matches_scipy_per_column():
    rng = np.random.default_rng(1)
    D = rng.normal(0.1, 1.0, size=(120, 6))
    D[:10, 1] = 0.0  # zeros, dropped
    D[:, 2] = np.round(D[:, 2])  # ties
    D[:, 3] = 0.0
    expect = [1.0 if not D[:, k].any() else stats.wilcoxon(D[:, k]).pvalue for k in range(6)]
    np.testing.assert_allclose(wilcoxon_pvalues(D), expect, rtol=1e-10)
