"""The flag rule (2.0) on activations whose relation to the artifact is known by construction,
and its statistics against independent computations (scipy, brute force, textbook formulas)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from auditor.config import make_config
from auditor.flags import Labels, containers, flip_region, stratified_test
from auditor.pipeline import explain_layers

ART = ["watermark", "text"]


def _brute_auroc(a, y):
    pos, neg = a[y], a[~y]
    gt = (pos[:, None] > neg[None, :]).sum()
    eq = (pos[:, None] == neg[None, :]).sum()
    return (gt + 0.5 * eq) / (len(pos) * len(neg))


# -- the statistic ---------------------------------------------------------------------------

def test_one_stratum_is_mann_whitney():
    rng = np.random.default_rng(0)
    a = np.round(rng.normal(size=300), 1)  # many ties
    y = rng.random(300) < 0.3
    a[y] += 0.4
    t = stratified_test(a, np.zeros(300, dtype=int), y)
    ref = stats.mannwhitneyu(a[y], a[~y], method="asymptotic", use_continuity=False)
    assert t.effect[0] == pytest.approx(_brute_auroc(a, y), abs=1e-12)
    assert t.effect[0] == pytest.approx(ref.statistic / (y.sum() * (~y).sum()), abs=1e-12)
    assert t.p[0] == pytest.approx(ref.pvalue, rel=1e-9)
    assert t.n_artifact[0] == y.sum() and t.n_strata[0] == 1


def _van_elteren(a, s, y):
    """Textbook van Elteren: T = Σ_s W_s / (n_s + 1) (W_s: rank sum of the artifact rows within the
    stratum, scipy's rankdata), E = Σ n1 / 2, Var = Σ n1 n0 / (12 (n_s + 1)) (1 - Σ(t³ - t) / (n_s³ - n_s))."""
    T = E = V = 0.0
    num = den = 0.0
    for g in np.unique(s):
        m = s == g
        ag, yg = a[m], y[m]
        n1, n0 = int(yg.sum()), int((~yg).sum())
        if n1 == 0 or n0 == 0:
            continue
        n = n1 + n0
        r = stats.rankdata(ag)
        _, counts = np.unique(ag, return_counts=True)
        T += r[yg].sum() / (n + 1)
        E += n1 / 2
        V += n1 * n0 / (12 * (n + 1)) * (1 - (counts ** 3 - counts).sum() / (n ** 3 - n))
        U = stats.mannwhitneyu(ag[yg], ag[~yg]).statistic
        w = n1 * n0 / (n + 1)
        num += w * U / (n1 * n0)
        den += w
    z = (T - E) / np.sqrt(V)
    return num / den, 2 * stats.norm.sf(abs(z))


def test_stratified_matches_a_direct_van_elteren():
    rng = np.random.default_rng(1)
    N = 900
    s = rng.integers(0, 6, N)
    y = rng.random(N) < (0.1 + 0.1 * s)  # prevalence differs between strata
    a = np.round(s * 0.7 + 0.35 * y + rng.normal(size=N), 1)
    s[:40] = 7  # a stratum without the artifact contributes nothing
    y[:40] = False
    t = stratified_test(a, s, y)
    effect, p = _van_elteren(a, s, y)
    assert t.effect[0] == pytest.approx(effect, abs=1e-12)
    assert t.p[0] == pytest.approx(p, rel=1e-9)
    assert t.n_strata[0] == 6 and t.n_artifact[0] == y.sum()
    # the pooled (unstratified) AUROC is confounded by the strata; the stratified one is not
    assert abs(_brute_auroc(a, y) - 0.5) > abs(effect - 0.5) + 0.1


def test_several_label_columns_at_once_match_one_by_one():
    rng = np.random.default_rng(2)
    a, s = rng.normal(size=400), rng.integers(0, 3, 400)
    Y = rng.random((400, 4)) < 0.3
    both = stratified_test(a, s, Y)
    for j in range(4):
        one = stratified_test(a, s, Y[:, j])
        assert both.effect[j] == pytest.approx(one.effect[0]) and both.p[j] == pytest.approx(one.p[0])


def test_no_varying_stratum_is_nan():
    y = np.array([True, True, False, False])
    t = stratified_test(np.array([1.0, 2, 3, 4]), np.array([0, 0, 1, 1]), y)
    assert np.isnan(t.p[0]) and t.n_strata[0] == 0 and t.effect[0] == 0.5


# -- containers and regions --------------------------------------------------------------------

def _labels(**cols):
    names = list(cols)
    return Labels(np.column_stack([cols[c] for c in names]), names)


def test_containers_are_unions_not_overlaps():
    rng = np.random.default_rng(3)
    N = 500
    star = rng.random(N) < 0.3
    wm = star & (rng.random(N) < 0.5)  # every watermark sits on a star: star is a superset, not a container
    text = rng.random(N) < 0.2
    lab = _labels(star=star, watermark=wm, text=text, overlay=wm | text, copy=wm.copy(), big=star | text)
    assert sorted(containers(lab, "watermark")) == ["copy", "overlay"]
    assert sorted(containers(lab, "text")) == ["big", "overlay"]  # big = text ∪ star, exactly
    # a hierarchy ancestor counts whatever its rows look like
    assert sorted(containers(lab, "watermark", ancestors=["big"])) == ["big", "copy", "overlay"]


def test_flip_region():
    rng = np.random.default_rng(4)
    N = 400
    wm, st, star, text = (rng.random((4, N)) < 0.4)
    lab = _labels(watermark=wm, stripes=st, star=star, text=text, overlay=wm | text)
    assert (flip_region(["and", "watermark", "stripes"], lab, "watermark", []) == st).all()
    assert (flip_region(["or", "star", "watermark"], lab, "watermark", []) == ~star).all()
    assert (flip_region(["and", "star", ["not", "watermark"]], lab, "watermark", []) == star).all()
    assert flip_region("watermark", lab, "watermark", []).all()
    # a container: flipping the watermark flips overlay only where there is no text
    assert (flip_region("overlay", lab, "watermark", ["overlay"]) == ~text).all()
    assert (flip_region(["and", "overlay", "stripes"], lab, "watermark", ["overlay"]) == (st & ~text)).all()


# -- neurons whose role is known by construction ------------------------------------------------------

def scenario(seed: int, confounded: bool, N: int = 2000):
    """Labels and activations: named detectors (see ROLES) then 50 noise and 12 confounded-noise neurons."""
    rng = np.random.default_rng(seed)
    star = rng.random(N) < 0.3
    stripes = rng.random(N) < 0.3
    text = rng.random(N) < 0.15
    if confounded:  # watermarks ride on stars, as in scraped data (P(w|star) = 0.4, P(w|no star) = 0.04)
        wm = np.where(star, rng.random(N) < 0.4, rng.random(N) < 0.04)
    else:
        wm = rng.random(N) < 0.15
    others = rng.random((N, 5)) < 0.2
    names = ["star", "stripes", "text", "watermark", "overlay"] + [f"c{i}" for i in range(5)]
    Y = np.column_stack([star, stripes, text, wm, wm | text, others])
    e = lambda: rng.normal(0, 1, N)  # noqa: E731
    named = {
        "star": 3 * star + e(),
        "star_plus_watermark": 3 * star + 1.5 * wm + e(),
        "watermark_and_stripes": 3 * (wm & stripes) + e(),
        "suppressor": 3 * ~wm + e(),
        "overlay": 3 * (wm | text) + e(),
        "star_or_watermark": 3 * (star | wm) + e(),
    }
    noise = [e() for _ in range(50)] + [k * star + e() for k in (0.5, 1, 2, 3) for _ in range(3)]
    A = np.column_stack(list(named.values()) + noise)
    return A, Y, names, list(named)


# (neuron, artifact) -> status, direction; everything else (and every noise neuron) is not flagged
ROLES = {
    ("star_plus_watermark", "watermark"): "raises",
    ("watermark_and_stripes", "watermark"): "raises",
    ("suppressor", "watermark"): "lowers",
    ("overlay", "watermark"): "raises",
    ("overlay", "text"): "raises",
    ("star_or_watermark", "watermark"): "raises",
}
MODES = {"defaults": {}, "heldout": {"heldout": 0.5}, "min_fraction": {"min_fraction": 0.05}}


@pytest.fixture(scope="module")
def audits():
    out = {}
    for confounded in (True, False):
        A, Y, names, roles = scenario(7 if confounded else 8, confounded)
        for mode, extra in MODES.items():
            cfg = make_config({"artifacts": ART, **extra})
            (neurons,), cal = explain_layers([("x", A)], Y, names, ART, cfg)
            out[confounded, mode] = (neurons, cal, roles, A, Y, names)
    return out


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("confounded", [True, False], ids=["confounded", "independent"])
def test_known_roles_are_flagged_and_nothing_else(audits, mode, confounded):
    neurons, cal, roles, *_ = audits[confounded, mode]
    flagged = {}
    for n in neurons:
        label = roles[n.index] if n.index < len(roles) else f"noise {n.index}"
        for t in n.artifact_tests:
            if t.status == "flagged":
                flagged[label, t.artifact] = t.direction
        assert [f.artifact for f in n.flags] == [t.artifact for t in n.artifact_tests if t.status == "flagged"]
    assert flagged == ROLES, {k: v for k, v in flagged.items() if ROLES.get(k) != v}
    assert cal["runs"] == 20 and len(cal["flags_per_run"]) == 20 and cal["max_flags"] <= 2


def test_pure_star_detector_with_watermarks_riding_on_stars(audits):
    neurons, *_ = audits[True, "defaults"]
    t = neurons[0].test("watermark")
    assert neurons[0].best.formula == "star" and t.status == "clean"
    assert "star" in t.strata and abs(t.effect - 0.5) < 0.1
    # the unstratified AUROC of the watermark alone is high: the confound the strata remove
    assert neurons[0].artifact_auroc["watermark"] > 0.75


def test_flags_record_branch_direction_and_numbers(audits):
    neurons, _, roles, A, Y, names = audits[True, "defaults"]
    sup = neurons[roles.index("suppressor")]
    (f,) = sup.flags
    assert f.artifact == "watermark" and f.direction == "lowers" and f.effect < 0.2
    assert f.branch in ("formula", "strong") and f.p_adjusted <= 0.01 and f.n_artifact >= 10
    assert f.effect_ci[0] <= f.effect <= f.effect_ci[1]
    t = sup.test("watermark")
    assert t.named_by  # the lowering search names the watermark: the suppressor is seen at all
    ands = neurons[roles.index("watermark_and_stripes")].test("watermark")
    assert ands.branch == "formula" and ands.effect > 0.9 and "flipping watermark" in ands.region


def test_benjamini_hochberg_runs_over_every_test_of_the_audit(audits):
    """Two layers in one audit: the adjusted p-values are BH over all their tests together."""
    _, _, _, A, Y, names = audits[True, "defaults"]
    cfg = make_config({"artifacts": ART, "calibration_runs": 0})
    layers, cal = explain_layers([("a", A[:, :30]), ("b", A[:, 30:])], Y, names, ART, cfg)
    assert cal is None
    raw, adj = [], []
    for neurons in layers:
        for n in neurons:
            for t in n.artifact_tests:
                if t.region == "all rows":
                    raw.append(t.p_value)
                    adj.append(t.p_adjusted)
                else:  # a region test and an all-rows test
                    raw += [t.p_value, t.all_rows["p_value"]]
                    adj += [t.p_adjusted, t.all_rows["p_adjusted"]]
    ref = stats.false_discovery_control(np.array(raw, dtype=float))
    assert np.allclose(adj, ref, rtol=1e-9, atol=1e-300)
    alone, _ = explain_layers([("a", A[:, :30])], Y, names, ART, cfg)
    p_one = {(n.index, t.artifact): t.p_adjusted for n in alone[0] for t in n.artifact_tests}
    p_two = {(n.index, t.artifact): t.p_adjusted for n in layers[0] for t in n.artifact_tests}
    assert any(p_one[k] != p_two[k] for k in p_one)  # the family is the audit, not the layer


def test_near_miss_says_which_condition_failed():
    rng = np.random.default_rng(11)
    N = 2000
    wm = rng.random(N) < 0.15
    other = rng.random((N, 3)) < 0.25
    Y = np.column_stack([wm, other])
    names = ["watermark", "a", "b", "c"]
    # a faint watermark response (AUROC about 0.53) that the best formulas name
    a = 0.1 * wm + rng.normal(size=N)
    cfg = make_config({"artifacts": ["watermark"]})
    (neurons,), _ = explain_layers([("x", a[:, None])], Y, names, ["watermark"], cfg)
    t = neurons[0].test("watermark")
    assert t.named_by and t.status == "near_miss" and not neurons[0].flags
    assert t.reason.startswith("near miss: ") and any(
        cond in t.reason for cond in (f"> {cfg.flag_max_p}", f"< {cfg.flag_min_effect}", "does not confirm"))
    assert t.direction in ("raises", "lowers") and t.effect is not None


def test_inconclusive_when_no_stratum_varies_the_artifact():
    rng = np.random.default_rng(12)
    N = 600
    wm = rng.random(N) < 0.3
    Y = np.column_stack([wm, ~wm, rng.random(N) < 0.3])  # "clean" is exactly NOT watermark
    names = ["watermark", "clean", "x"]
    a = wm + rng.normal(size=N)
    cfg = make_config({"artifacts": ["watermark"]})
    (neurons,), _ = explain_layers([("x", a[:, None])], Y, names, ["watermark"], cfg)
    t = neurons[0].test("watermark")
    assert t.status == "inconclusive" and t.effect is None and "no stratum" in t.reason
    assert not neurons[0].flags


def test_region_includes_the_formulas_a_narrow_one_was_grown_from():
    """``(watermark AND stripes) AND c`` was grown from ``watermark AND stripes``: the region is every
    stripes row, not only those where the chance literal ``c`` holds (nor every row)."""
    from auditor.flags import artifact_context, grown_from, make_plan

    rng = np.random.default_rng(5)
    N = 400
    wm, st, c = (rng.random((3, N)) < 0.4)
    lab = _labels(watermark=wm, stripes=st, c=c)
    ast = ["and", ["and", "watermark", "stripes"], "c"]
    assert grown_from(ast) == [ast, ["and", "watermark", "stripes"]]
    ctx = artifact_context(lab, "watermark", 0)
    plan = make_plan([("(watermark AND stripes) AND c", ast)], ctx, lab, np.arange(N))
    assert len(plan.regions) == 1 and (plan.regions[0][0] == np.flatnonzero(st)).all()
    assert (plan.outside_rows == np.flatnonzero(~st)).all()
    assert plan.strata_concepts == ["stripes", "c"]


# -- the decision on hand-set numbers ---------------------------------------------------------------

def _pair(effect, p, n_art, named, region_effect=None, region_p=None, region_n=None, selection=1.0,
          p_adj_all=None, p_adj_region=None):
    """A verdict from hand-set test numbers (p_adj given directly: the adjustment is tested above)."""
    from auditor.flags import Plan, PairTests, Rule, StratifiedTest, verdict

    def st(e, pv, n):
        return StratifiedTest(np.array([e]), np.array([0.02]), np.array([0.0]), np.array([pv]),
                              np.array([n]), np.array([5 * n]), np.array([3]))
    rows = np.arange(10)
    plan = Plan("watermark", ["watermark AND stripes"] if named else [], ["stripes"], rows, rows * 0,
                [(rows, rows * 0)] if named else [], rows if named else None, rows * 0 if named else None)
    tests = PairTests(st(effect, p, n_art), [st(region_effect, region_p, region_n)] if named else [],
                      st(effect, p, n_art) if named else None)
    return verdict(plan, tests, p if p_adj_all is None else p_adj_all,
                   (region_p if p_adj_region is None else p_adj_region) if named else np.nan, Rule(), False,
                   selection)


def test_decision_branches_and_directions():
    t = _pair(0.2, 1e-9, 50, named=False)
    assert (t.status, t.branch, t.direction) == ("flagged", "strong", "lowers")
    t = _pair(0.71, 1e-9, 50, named=False)  # 0.21 from 0.5: not strong, no formula names it
    assert t.status == "near_miss" and "< 0.25" in t.reason  # within half of delta (0.05) of 0.25
    t = _pair(0.65, 1e-9, 50, named=False)
    assert t.status == "clean" and t.direction is None
    t = _pair(0.55, 0.5, 50, named=True, region_effect=0.62, region_p=1e-6, region_n=12, p_adj_region=1e-5)
    assert (t.status, t.branch, t.direction) == ("flagged", "formula", "raises")
    assert t.effect == 0.62 and t.all_rows["effect"] == 0.55
    t = _pair(0.55, 0.5, 50, named=True, region_effect=0.62, region_p=1e-6, region_n=9, p_adj_region=1e-5)
    assert t.status == "near_miss" and "9 watermark rows < 10" in t.reason
    t = _pair(0.55, 0.5, 50, named=True, region_effect=0.58, region_p=1e-6, region_n=40, p_adj_region=1e-5)
    assert t.status == "near_miss" and "|effect - 0.5| = 0.080 < 0.1" in t.reason


def test_near_miss_by_a_factor_of_ten_in_p():
    t = _pair(0.85, 0.05, 50, named=False)
    assert t.status == "near_miss" and "adjusted p 0.05 > 0.01" in t.reason
    t = _pair(0.85, 0.2, 50, named=False)
    assert t.status == "clean"


def test_formula_p_combines_region_and_all_rows():
    from auditor.flags import formula_p

    # region p times the selection factor, or the outside-the-region p when it agrees with an effect >= delta;
    # doubled
    assert formula_p(1e-6, 0.8, 0.5, 0.5, 1000, 0.1) == pytest.approx(2e-3)
    assert formula_p(1e-6, 0.8, 1e-5, 0.65, 1000, 0.1) == pytest.approx(2e-5)
    assert formula_p(1e-6, 0.8, 1e-5, 0.55, 1000, 0.1) == pytest.approx(2e-3)  # outside effect too small
    assert formula_p(1e-6, 0.8, 1e-5, 0.3, 1000, 0.1) == pytest.approx(2e-3)  # points the other way
    assert formula_p(0.9, 0.8, 0.9, 0.7, 1000, 0.1) == 1.0
    assert np.isnan(formula_p(np.nan, 0.5, 1e-5, 0.7, 1, 0.1))
