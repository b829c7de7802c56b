"""The flag tests' fast path (one global ranking per neuron, sums over the artifact rows only,
label columns as positive rows, the calibration's permutations) gives exactly the numbers of the
straightforward computation: ``stratified_test`` on the dense label columns of the tested rows,
and the within-group permutation by ``np.lexsort``."""

from __future__ import annotations

import numpy as np
import pytest

from auditor.flags import LabelRows, Plan, permuted_labels, run_plan, stratified_test

FIELDS = ("effect", "se", "z", "p", "n_artifact", "n_rows", "n_strata")


def _same(fast, ref):
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(fast, f), getattr(ref, f), err_msg=f)


def _problem(seed, N=3000, P=21, n_strata=7):
    rng = np.random.default_rng(seed)
    a = np.round(rng.normal(size=N), 1)  # many ties
    a[rng.random(N) < 0.2] = 0.0  # a ReLU's zeros
    strata_all = rng.integers(0, n_strata, N) * 3  # ids with gaps
    y = rng.random(N) < rng.uniform(0.01, 0.3)
    a[y] += 0.3
    groups = rng.integers(0, 4, N)
    Y = permuted_labels(y, groups, P - 1, rng)
    if seed % 3 == 0:  # a stratum without artifact rows and one that is all artifact
        Y[strata_all == 0] = False
        Y[strata_all == 3] = True
    return rng, a, strata_all, Y


@pytest.mark.parametrize("seed", range(12))
def test_run_plan_equals_stratified_test_on_dense_columns(seed):
    rng, a, strata_all, Y = _problem(seed)
    N = len(a)
    test_rows = np.sort(rng.choice(N, int(N * 0.8), replace=False)) if seed % 2 else np.arange(N)
    strata = strata_all[test_rows]
    inside = [rng.random(len(test_rows)) < f for f in (0.3, 0.05)]
    anywhere = inside[0] | inside[1]
    plan = Plan("art", ["f1", "f2"], ["c"], test_rows, strata,
                regions=[(test_rows[m], strata[m]) for m in inside],
                outside_rows=test_rows[~anywhere], outside_strata=strata[~anywhere])
    fast = run_plan(plan, a, LabelRows.of(Y), np.argsort(a, kind="stable"))
    _same(fast.all_rows, stratified_test(a[test_rows], strata, Y[test_rows]))
    for (rows, st), t in zip(plan.regions, fast.regions):
        _same(t, stratified_test(a[rows], st, Y[rows]))
    _same(fast.outside, stratified_test(a[plan.outside_rows], plan.outside_strata, Y[plan.outside_rows]))
    # the dense label matrix and no precomputed order give the same too
    again = run_plan(plan, a, Y)
    _same(again.all_rows, fast.all_rows)
    # sanity: the problem is not degenerate (several strata contribute, the calibration columns differ)
    assert fast.all_rows.n_strata[0] >= 3 and len(np.unique(fast.all_rows.p)) > 1


def test_empty_region_is_nan():
    _, a, strata_all, Y = _problem(1, N=200)
    rows = np.arange(0)
    plan = Plan("art", ["f"], [], np.arange(200), strata_all, regions=[(rows, strata_all[rows])],
                outside_rows=np.arange(200), outside_strata=strata_all)
    t = run_plan(plan, a, Y).regions[0]
    assert np.isnan(t.p).all() and (t.effect == 0.5).all() and (t.n_rows == 0).all()


@pytest.mark.parametrize("seed", range(4))
def test_permuted_labels_equal_lexsort_permutation(seed):
    rng = np.random.default_rng(seed)
    N = 5000
    y = rng.random(N) < 0.2
    groups = rng.integers(0, 8, N) if seed % 2 else rng.integers(0, 1 << 20, N) % 50_000  # radix or not
    ref = np.empty((N, 6), dtype=bool)
    ref[:, 0] = y
    r1, r2 = np.random.default_rng(seed + 10), np.random.default_rng(seed + 10)
    base = np.argsort(groups, kind="stable")
    for r in range(5):
        perm = np.lexsort((r1.random(N), groups))
        ref[base, 1 + r] = y[perm]
    got = permuted_labels(y, groups, 5, r2)
    np.testing.assert_array_equal(got, ref)
    # within every group the artifact count is kept
    for g in np.unique(groups)[:20]:
        assert (got[groups == g].sum(axis=0) == y[groups == g].sum()).all()
