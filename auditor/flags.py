"""The artifact flag rule (rule 2.0): does the artifact itself move a neuron's activation?

For every (layer, neuron, artifact) of an audit:

1. **Containers** of the artifact count as the artifact: hierarchy ancestors, and
   concepts whose positives are exactly the artifact's plus those of other labelled
   concepts (``overlay`` = ``watermark`` ∪ ``text``). A concept that merely overlaps
   the artifact is not a container.
2. **Strata**: the other concepts of the neuron's best formulas (positive and negative
   INVERT search) plus the ``m`` concepts most associated with the artifact (|phi|),
   containers and the artifact's own sub-concepts excluded. **Region** of a best formula
   naming the artifact or a container: the rows where flipping the artifact flips that
   formula (``F(rest, artifact=1) != F(rest, artifact=0)``) or a shorter formula the
   search grew it from.
3. **Effect**: within every stratum of the tested rows, the AUROC of the activation for
   artifact vs no artifact, combined with van Elteren weights ``n1 n0 / (n + 1)``; its
   two-sided p-value is van Elteren's normal test (the Mann–Whitney test without continuity
   correction when there is one stratum). Strata where the artifact does not vary contribute
   nothing; when none varies the test is **inconclusive**. Each pair gets an all-rows test
   and, per naming formula, a region test; the formula branch's p (:func:`formula_p`)
   combines the region tests (times the search's size without a held-out split) with the
   test over the rows outside every region.
4. **Decision**: Benjamini–Hochberg over every test of the audit. Flagged when
   ``p_adj <= alpha``, the tested rows hold ``>= min_artifact_rows`` artifact rows, and
   either (a) a best formula names the artifact or a container and the region's
   ``|effect - 0.5| >= min_effect`` or (b) the all-rows ``|effect - 0.5| >= strong_effect``.
5. **Near miss**: a best formula names the artifact but the test fails, or one of
   p_adj and the effect passes and the other misses by less than a factor of ten /
   half of ``min_effect``, or only the row count fails.

Everything here is numpy/scipy on plain arrays: no torch, no model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import special

from .invert import benjamini_hochberg
from .results import ArtifactTest, Flag

RULE_VERSION = "2.0"

# Config keys of rule 1.x and what replaced them (an old key is an error naming its successor).
REPLACED_KEYS = {
    "flag_min_auroc": "flag_min_effect (|stratified artifact AUROC - 0.5| where a best formula names the artifact)",
    "artifact_auroc": "flag_strong_effect (|stratified artifact AUROC - 0.5| that flags whatever the formula says)",
    "flag_margin": "flag_min_effect (the stratified artifact effect replaced the formula margin)",
    "flag_partial_auroc": "flag_min_effect (the stratified artifact effect replaced the partial AUROC)",
    "flag_min_support": "flag_min_artifact_rows (artifact rows in the tested region)",
}


@dataclass(frozen=True)
class Rule:
    """Thresholds of the flag rule (config keys ``flag_*``, ``calibration_runs``)."""

    alpha: float = 0.01  # flag_max_p
    min_effect: float = 0.1  # flag_min_effect (delta)
    strong_effect: float = 0.25  # flag_strong_effect (delta_strong)
    min_artifact_rows: int = 10  # flag_min_artifact_rows
    strata: int = 3  # flag_strata (m)
    calibration_runs: int = 20
    seed: int = 0

    def plain(self) -> dict[str, Any]:
        return {"rule_version": RULE_VERSION, "flag_max_p": self.alpha, "flag_min_effect": self.min_effect,
                "flag_strong_effect": self.strong_effect, "flag_min_artifact_rows": self.min_artifact_rows,
                "flag_strata": self.strata, "calibration_runs": self.calibration_runs,
                "rule": RULE_TEXT.format(a=self.alpha, d=self.min_effect, ds=self.strong_effect,
                                         n=self.min_artifact_rows, m=self.strata)}


RULE_TEXT = ("per (layer, neuron, artifact): effect = within-stratum AUROC of artifact vs no artifact, van Elteren "
             "weights, two-sided p; strata = other concepts of the best positive and negative formulas + the {m} "
             "concepts most associated with the artifact; tested over all rows (strong branch) and, per best "
             "formula naming the artifact or a container, over the rows where flipping the artifact flips it "
             "(formula branch: p = smallest of the region tests' p times region_selection_factor and the p outside "
             "the regions, times the number of those tests); Benjamini-Hochberg over every test of the audit; "
             "flagged when p_adjusted <= {a} AND >= {n} artifact rows AND (formula branch with |effect - 0.5| >= "
             "{d} OR all-rows |effect - 0.5| >= {ds}); no stratum where the artifact varies: inconclusive")


# -- label structure ---------------------------------------------------------------------

class Labels:
    """Dense boolean columns of a (N, C) label matrix (dense or scipy sparse), fetched by name and cached."""

    def __init__(self, Y, names: Sequence[str]):
        self.Y = Y
        self.names = list(names)
        self.index: dict[str, int] = {}
        for i, c in enumerate(self.names):
            self.index.setdefault(c, i)
        self.N = Y.shape[0]
        self._cache: dict[str, np.ndarray] = {}
        self.memo: dict[Any, Any] = {}
        self.sparse = hasattr(Y, "tocsc")
        if self.sparse:
            self._csc = Y.tocsc()
        self.n_pos = np.asarray(Y.sum(axis=0)).ravel().astype(np.int64)

    def __call__(self, name: str) -> np.ndarray:
        col = self._cache.get(name)
        if col is None:
            j = self.index[name]
            if self.sparse:
                col = np.asarray(self._csc[:, j].toarray()).ravel() != 0
            else:
                col = np.asarray(self.Y[:, j]) != 0
            self._cache[name] = col
        return col

    def cross(self, y: np.ndarray) -> np.ndarray:
        """Per concept: rows where the concept and ``y`` both hold (C,)."""
        yf = np.asarray(y, dtype=np.float64)
        out = self.Y.T @ yf if self.sparse else yf @ np.asarray(self.Y, dtype=np.float64)
        return np.rint(np.asarray(out).ravel()).astype(np.int64)


def containers(labels: Labels, artifact: str, ancestors: Sequence[str] = ()) -> list[str]:
    """Concepts that stand for the artifact: hierarchy ``ancestors`` present among the labels, and
    concepts whose positives are exactly the artifact's plus those of other labelled concepts
    (the artifact being needed: the others alone do not cover them). Mere overlap does not count."""
    a = labels(artifact)
    na = int(a.sum())
    inter = labels.cross(a)
    out = [c for c in ancestors if c in labels.index and c != artifact]
    for j, c in enumerate(labels.names):
        if c == artifact or c in out or labels.index[c] != j:  # first column of a repeated name only
            continue
        if inter[j] != na or labels.n_pos[j] < na:  # not a superset of the artifact
            continue
        col = labels(c)
        sub = labels.cross(col)  # |d ∩ c|
        members = [d for i, d in enumerate(labels.names)
                   if i != j and d != artifact and sub[i] == labels.n_pos[i] and labels.n_pos[i] > 0
                   and inter[i] != na  # not itself a superset of the artifact (another container)
                   and inter[i] != labels.n_pos[i]]  # not a sub-concept of the artifact
        others = np.zeros(labels.N, dtype=bool)
        for d in members:
            others |= labels(d)
        if np.array_equal(others | a, col) and not np.array_equal(others, col):
            out.append(c)
    return out


def sub_concepts(labels: Labels, artifact: str) -> set[str]:
    """Concepts whose positives all carry the artifact (its children in a hierarchy)."""
    inter = labels.cross(labels(artifact))
    return {c for i, c in enumerate(labels.names) if c != artifact and labels.n_pos[i] > 0
            and inter[i] == labels.n_pos[i]}


def associated(labels: Labels, artifact: str, m: int, exclude: set[str], rows: np.ndarray | None = None) -> list[str]:
    """The ``m`` concepts most associated with the artifact (largest |phi|), ``exclude`` left out."""
    if m <= 0:
        return []
    a = labels(artifact)
    if rows is not None:
        sub = Labels(labels.Y[rows], labels.names)
        a = a[rows]
    else:
        sub = labels
    N = float(len(a))
    na = float(a.sum())
    n11 = sub.cross(a).astype(np.float64)
    nc = sub.n_pos.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        phi = (n11 * N - nc * na) / np.sqrt(nc * (N - nc) * na * (N - na))
    phi = np.where(np.isfinite(phi), np.abs(phi), -1.0)
    order = np.argsort(-phi, kind="stable")
    out: list[str] = []
    for j in order:
        c = labels.names[j]
        if phi[j] <= 0 or c == artifact or c in exclude or c in out:
            continue
        out.append(c)
        if len(out) == m:
            break
    return out


def leaves(ast: Any) -> list[str]:
    if isinstance(ast, str):
        return [ast]
    return [x for sub in ast[1:] for x in leaves(sub)]


def grown_from(ast: Any) -> list[Any]:
    """The formula and the shorter ones the beam search grew it from (it appends one literal at a
    time: ``(f op literal)``): ``((w AND s) AND c)`` -> itself, ``w AND s`` (not the starting literal)."""
    out = [ast]
    while not isinstance(ast, str) and ast[0] in ("and", "or"):
        ast = ast[1]
        if isinstance(ast, str) or ast[0] == "not":  # the starting literal: its region would be every row
            break
        out.append(ast)
    return out


def _evaluate(ast: Any, column: Callable[[str], np.ndarray]) -> np.ndarray:
    if isinstance(ast, str):
        return column(ast)
    if ast[0] == "not":
        return ~_evaluate(ast[1], column)
    x, y = _evaluate(ast[1], column), _evaluate(ast[2], column)
    return (x & y) if ast[0] == "and" else (x | y)


def flip_region(ast: Any, labels: Labels, artifact: str, conts: Sequence[str]) -> np.ndarray:
    """Rows where setting the artifact to 1 or to 0 gives different formula values.

    A container ``c`` takes value 1 with the artifact, and without it the value it has
    from everything else: ``c`` on rows without the artifact, elsewhere the union of its
    other member concepts (or 0 when it has none)."""
    a = labels(artifact)

    def without(c: str) -> np.ndarray:
        key = ("without", c, artifact)
        if key in labels.memo:
            return labels.memo[key]
        col = labels(c)
        inter = labels.cross(col)
        inter_a = labels.cross(a)
        na = int(a.sum())
        others = np.zeros(labels.N, dtype=bool)
        for i, d in enumerate(labels.names):
            if d in (c, artifact) or labels.n_pos[i] == 0 or inter[i] != labels.n_pos[i]:
                continue
            if inter_a[i] == na or inter_a[i] == labels.n_pos[i]:
                continue
            others |= labels(d)
        labels.memo[key] = np.where(a, others, col)
        return labels.memo[key]

    def column_for(v: bool):
        def column(name: str) -> np.ndarray:
            if name == artifact:
                return np.full(labels.N, v)
            if name in conts:
                return np.ones(labels.N, dtype=bool) if v else without(name)
            return labels(name)
        return column

    return _evaluate(ast, column_for(True)) != _evaluate(ast, column_for(False))


# -- the stratified test -----------------------------------------------------------------

@dataclass
class StratifiedTest:
    """van Elteren's stratified Mann–Whitney test, for P label columns at once (arrays of shape (P,))."""

    effect: np.ndarray  # combined AUROC (0.5 when nothing contributes)
    se: np.ndarray  # standard error of the effect (Hanley–McNeil per stratum), NaN when nothing contributes
    z: np.ndarray
    p: np.ndarray  # two-sided; NaN when no stratum varies the artifact
    n_artifact: np.ndarray  # artifact rows in the contributing strata
    n_rows: np.ndarray  # rows in the contributing strata
    n_strata: np.ndarray  # contributing strata


def stratified_test(a: np.ndarray, strata: np.ndarray, Y: np.ndarray, order: np.ndarray | None = None
                    ) -> StratifiedTest:
    """``a`` (n,) activations, ``strata`` (n,) integer stratum ids, ``Y`` (n,) or (n, P) boolean artifact labels;
    ``order``: the rows sorted by (stratum, activation), when the caller has it (else computed).

    Within stratum s with n1 artifact and n0 other rows (both > 0): AUROC_s = U_s / (n1 n0)
    (mid-ranks for ties), weight w_s = n1 n0 / (n_s + 1); effect = Σ w_s AUROC_s / Σ w_s.
    van Elteren: T - E = Σ (U_s - n1 n0 / 2) / (n_s + 1), Var = Σ n1 n0 (n_s + 1 - tie_s) / (12 (n_s + 1)^2)
    with tie_s = Σ (t³ - t) / (n_s (n_s - 1)); z = (T - E) / sqrt(Var), p = 2 Φ(-|z|).
    """
    a = np.asarray(a, dtype=np.float64)
    Y = np.asarray(Y, dtype=bool)
    if Y.ndim == 1:
        Y = Y[:, None]
    n = len(a)
    P = Y.shape[1]
    if n == 0:
        nan = np.full(P, np.nan)
        zero = np.zeros(P, dtype=np.int64)
        return StratifiedTest(np.full(P, 0.5), nan, nan, nan, zero, zero, zero)
    o = np.lexsort((a, strata)) if order is None else order
    ss, aa = np.asarray(strata)[o], a[o]
    str_id, rank, n_s, tie = _ranks(ss, aa)
    # (P, n) rows sorted like the ranks: reductions along contiguous memory
    str_start = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    Yt = np.ascontiguousarray(Y[o].T)
    n1 = np.add.reduceat(Yt, str_start, axis=1, dtype=np.float64).T  # (S, P)
    R1 = np.add.reduceat(np.where(Yt, rank, 0.0), str_start, axis=1).T
    return _van_elteren(n1, R1, n_s, tie)


def _ranks(ss: np.ndarray, aa: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows sorted by (stratum ``ss``, activation ``aa``): per row its stratum's position among the strata
    present (0, 1, ...: ascending stratum id) and its 1-based mid-rank within the stratum; per stratum its
    size and tie term Σ (t³ - t) over groups of equal activations."""
    n = len(aa)
    pos = np.arange(n)
    new_str = np.r_[True, ss[1:] != ss[:-1]]
    new_grp = new_str | np.r_[True, aa[1:] != aa[:-1]]
    str_start = pos[new_str]
    str_id = np.cumsum(new_str) - 1
    grp_start = pos[new_grp]
    grp_size = np.diff(np.r_[grp_start, n])
    grp_id = np.cumsum(new_grp) - 1
    rank = (grp_start[grp_id] - str_start[str_id]) + (grp_size[grp_id] + 1) / 2.0  # 1-based mid-rank in stratum
    n_s = np.diff(np.r_[str_start, n]).astype(np.float64)
    t = grp_size.astype(np.float64)
    tie = np.bincount(str_id[grp_start], weights=t ** 3 - t, minlength=len(n_s))
    return str_id, rank, n_s, tie


def _van_elteren(n1: np.ndarray, R1: np.ndarray, n_s: np.ndarray, tie: np.ndarray) -> StratifiedTest:
    """The test from per-stratum artifact rows ``n1`` and artifact rank sums ``R1`` ((S, P), transposed views of
    C-ordered (P, S) arrays), stratum sizes ``n_s`` and tie terms ``tie`` (S,)."""
    n0 = n_s[:, None] - n1
    ok = (n1 > 0) & (n0 > 0)
    U = R1 - n1 * (n1 + 1) / 2.0
    m = n1 * n0
    ns = n_s[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = np.where(ok, U / np.where(m > 0, m, 1.0), 0.5)
        w = np.where(ok, m / (ns + 1.0), 0.0)
        wsum = w.sum(axis=0)
        effect = np.where(wsum > 0, (w * auc).sum(axis=0) / np.where(wsum > 0, wsum, 1.0), 0.5)
        tie_corr = np.where(ns > 1, tie[:, None] / np.where(ns > 1, ns * (ns - 1), 1.0), 0.0)
        var = np.where(ok, m * (ns + 1.0 - tie_corr) / (12.0 * (ns + 1.0) ** 2), 0.0).sum(axis=0)
        num = (np.where(ok, (U - m / 2.0) / (ns + 1.0), 0.0)).sum(axis=0)
        z = np.where(var > 0, num / np.sqrt(np.where(var > 0, var, 1.0)), 0.0)
        p = np.where(var > 0, 2.0 * special.ndtr(-np.abs(z)), 1.0)
        # Hanley–McNeil variance of each stratum's AUROC, combined with the same weights
        A = np.clip(auc, 1e-12, 1 - 1e-12)
        q1, q2 = A / (2 - A), 2 * A * A / (1 + A)
        v = (A * (1 - A) + (n1 - 1) * (q1 - A * A) + (n0 - 1) * (q2 - A * A)) / np.where(m > 0, m, 1.0)
        se = np.where(wsum > 0, np.sqrt(np.where(ok, w * w * np.maximum(v, 0), 0).sum(axis=0))
                      / np.where(wsum > 0, wsum, 1.0), np.nan)
    any_ok = ok.any(axis=0)
    p = np.where(any_ok, p, np.nan)
    return StratifiedTest(effect=effect, se=se, z=z, p=p,
                          n_artifact=np.where(ok, n1, 0).sum(axis=0).astype(np.int64),
                          n_rows=np.where(ok, ns, 0).sum(axis=0).astype(np.int64),
                          n_strata=ok.sum(axis=0).astype(np.int64))


def strata_ids(labels: Labels, concepts: Sequence[str], rows: np.ndarray) -> np.ndarray:
    """Integer stratum of each of ``rows``: the combination of the concepts' values."""
    ids = np.zeros(len(rows), dtype=np.int64)
    if not concepts:
        return ids
    if len(concepts) <= 62:
        for j, c in enumerate(concepts):
            ids |= labels(c)[rows].astype(np.int64) << j
        return ids
    cols = np.stack([labels(c)[rows] for c in concepts], axis=1)
    _, inv = np.unique(cols, axis=0, return_inverse=True)
    return inv.ravel().astype(np.int64)


# -- one audit's tests ---------------------------------------------------------------------

@dataclass
class ArtifactContext:
    """Per artifact, computed once per audit."""

    name: str
    containers: list[str]
    sub: set[str]
    associated: list[str]  # m most associated concepts (strata of every test, and of the calibration)
    calib_groups: np.ndarray  # (N,) group id for the calibration's within-stratum permutation


def artifact_context(labels: Labels, artifact: str, m: int, ancestors: Sequence[str] = (),
                     search_rows: np.ndarray | None = None) -> ArtifactContext:
    conts = containers(labels, artifact, ancestors)
    sub = sub_concepts(labels, artifact)
    assoc = associated(labels, artifact, m, set(conts) | sub, search_rows)
    groups = strata_ids(labels, assoc, np.arange(labels.N))
    return ArtifactContext(artifact, conts, sub, assoc, groups)


@dataclass
class Plan:
    """Where one (neuron, artifact) pair is tested: every test row; when best formulas name the artifact or
    a container, each one's region, and the rows outside all of them."""

    artifact: str
    named_by: list[str]  # best formulas (text) naming the artifact or a container
    strata_concepts: list[str]
    rows: np.ndarray  # every test row
    strata: np.ndarray  # stratum id per test row
    regions: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # per naming formula: rows, strata
    outside_rows: np.ndarray | None = None  # test rows outside every region: the naming formulas ignore the artifact
    outside_strata: np.ndarray | None = None


def make_plan(best: Sequence[tuple[str, Any]], ctx: ArtifactContext, labels: Labels,
              test_rows: np.ndarray) -> Plan:
    """``best``: (text, ast) of the neuron's best formulas (positive and negative search)."""
    named_by: list[str] = []
    masks: list[np.ndarray] = []
    concepts: list[str] = []
    marks = {ctx.name} | set(ctx.containers)
    for text, ast in best:
        lv = leaves(ast)
        if marks & set(lv):
            named_by.append(text)
            region = np.zeros(labels.N, dtype=bool)
            for part in grown_from(ast):
                if marks & set(leaves(part)):
                    region |= flip_region(part, labels, ctx.name, ctx.containers)
            masks.append(region)
        for c in lv:
            if c not in marks and c not in ctx.sub and c not in concepts:
                concepts.append(c)
    for c in ctx.associated:
        if c not in concepts:
            concepts.append(c)
    all_strata = strata_ids(labels, concepts, test_rows)
    plan = Plan(ctx.name, named_by, concepts, test_rows, all_strata)
    if masks:
        anywhere = np.zeros(len(test_rows), dtype=bool)
        for m in masks:
            inside = m[test_rows]
            anywhere |= inside
            plan.regions.append((test_rows[inside], all_strata[inside]))
        plan.outside_rows, plan.outside_strata = test_rows[~anywhere], all_strata[~anywhere]
    return plan


@dataclass
class PairTests:
    """The tests of one pair, for P label columns (the real labels first, then the calibration's)."""

    all_rows: StratifiedTest
    regions: list[StratifiedTest] = field(default_factory=list)  # one per naming formula
    outside: StratifiedTest | None = None


@dataclass(frozen=True)
class LabelRows:
    """The positive rows of P boolean label columns (N, P), computed once per audit: the tests only
    sum over the artifact rows, which are few next to the N rows ranked."""

    N: int
    P: int
    rows: np.ndarray  # (nnz,) row of each positive, ascending
    cols: np.ndarray  # (nnz,) its column

    @classmethod
    def of(cls, Y: np.ndarray) -> LabelRows:
        Y = np.asarray(Y, dtype=bool)
        if Y.ndim == 1:
            Y = Y[:, None]
        rows, cols = np.nonzero(Y)
        return cls(Y.shape[0], Y.shape[1], rows, cols.astype(np.int64))


def _sorted_rows(order_a: np.ndarray, rows: np.ndarray, strata: np.ndarray, N: int
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Positions (into ``rows``) sorting them by (stratum, activation), from the activation's global
    order: keep the rows in activation order, then a stable sort by stratum (a radix sort for small ids);
    and the map row -> position in ``rows`` (-1 outside them; None when ``rows`` is every row in order)."""
    if len(rows) == N and np.array_equal(rows, np.arange(N)):  # every row in order: the identity map
        pos, idx = None, order_a
    else:
        pos = np.full(N, -1, dtype=np.int64)
        pos[rows] = np.arange(len(rows))
        idx = pos[order_a]
        idx = idx[idx >= 0]  # positions of the rows, in ascending activation
    st = strata[idx]
    if len(st) and st.min() >= 0 and st.max() < 2 ** 15:
        st = st.astype(np.int16)
    return idx[np.argsort(st, kind="stable")], pos


def _sparse_test(a: np.ndarray, rows: np.ndarray, strata: np.ndarray, labels: LabelRows, order_a: np.ndarray
                 ) -> StratifiedTest:
    """:func:`stratified_test` of ``a[rows]`` with ``strata`` for every column of ``labels`` (same numbers):
    one ranking of the rows (from ``order_a``, the activation's global stable order), then per column the
    stratum counts and rank sums of its positive rows only (their mid-ranks found by binary search among
    the starts of the strata and of the groups of tied activations)."""
    n, P = len(rows), labels.P
    if n == 0:
        return stratified_test(a[rows], strata, np.zeros((0, P), dtype=bool))
    o, pos = _sorted_rows(order_a, rows, strata, len(a))
    ss, aa = np.asarray(strata)[o], a[o if pos is None else rows[o]]
    new_str = np.empty(n, dtype=bool)
    new_str[0] = True
    np.not_equal(ss[1:], ss[:-1], out=new_str[1:])
    new_grp = np.empty(n, dtype=bool)
    new_grp[0] = True
    np.not_equal(aa[1:], aa[:-1], out=new_grp[1:])
    new_grp |= new_str
    str_start = np.flatnonzero(new_str)
    grp_start = np.flatnonzero(new_grp)
    grp_size = np.diff(np.r_[grp_start, n])
    n_s = np.diff(np.r_[str_start, n]).astype(np.float64)
    S = len(n_s)
    t = grp_size.astype(np.float64)
    tie = np.bincount(np.searchsorted(str_start, grp_start, side="right") - 1, weights=t ** 3 - t, minlength=S)
    # the positives of every column among the rows, at their place in the sorted order
    at = np.empty(n, dtype=np.int64)  # position in rows -> position in the sorted order
    at[o] = np.arange(n)
    if pos is None:
        k, cols = at[labels.rows], labels.cols
    else:
        q = pos[labels.rows]
        keep = q >= 0
        k, cols = at[q[keep]], labels.cols[keep]
    sid = np.searchsorted(str_start, k, side="right") - 1
    gid = np.searchsorted(grp_start, k, side="right") - 1
    rank = (grp_start[gid] - str_start[sid]) + (grp_size[gid] + 1) / 2.0  # 1-based mid-rank in stratum
    key = cols * S + sid
    n1 = np.bincount(key, minlength=P * S).astype(np.float64).reshape(P, S).T  # (S, P) like stratified_test's
    R1 = np.bincount(key, weights=rank, minlength=P * S).reshape(P, S).T
    return _van_elteren(n1, R1, n_s, tie)


def run_plan(plan: Plan, a: np.ndarray, Y: np.ndarray | LabelRows, order_a: np.ndarray | None = None) -> PairTests:
    """The tests of one plan for the label columns ``Y`` (N,) or (N, P) (or their :class:`LabelRows`);
    ``order_a``: ``np.argsort(a, kind="stable")``, shared by every plan of the neuron."""
    labels = Y if isinstance(Y, LabelRows) else LabelRows.of(Y)
    a = np.asarray(a, dtype=np.float64)
    if order_a is None:
        order_a = np.argsort(a, kind="stable")

    def test(rows, strata):
        return _sparse_test(a, rows, strata, labels, order_a)

    out = PairTests(test(plan.rows, plan.strata))
    if plan.regions:
        out.regions = [test(rows, strata) for rows, strata in plan.regions]
        out.outside = test(plan.outside_rows, plan.outside_strata)
    return out


def formula_branch(tests: PairTests, selection: float, min_effect: float) -> dict[str, np.ndarray]:
    """The formula branch's test, per label column: the naming formula whose region test has the smallest
    p (``chosen``), its effect and artifact rows, and the combined p (:func:`formula_p`, Bonferroni over
    the regions and the outside test)."""
    Pr = np.stack([np.minimum(1.0, r.p * selection) for r in tests.regions])  # (R, P)
    k = np.where(np.isnan(Pr), np.inf, Pr).argmin(axis=0)
    cols = np.arange(Pr.shape[1])
    effect = np.stack([r.effect for r in tests.regions])[k, cols]
    p = formula_p(Pr[k, cols], effect, tests.outside.p, tests.outside.effect, 1.0, min_effect,
                  n_tests=len(tests.regions) + 1)
    return {"p": p, "effect": effect, "n_artifact": np.stack([r.n_artifact for r in tests.regions])[k, cols],
            "chosen": k}


def decide(named, eff_r, p_r, n_r, eff_a, p_a, n_a, rule: Rule) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised decision: (formula branch fires, strong branch fires), element-wise.

    Formula branch: a best formula names the artifact and its region's test passes (p_adj <= alpha,
    >= min_artifact_rows artifact rows, |effect - 0.5| >= min_effect). Strong branch: the all-rows
    test passes with |effect - 0.5| >= strong_effect and >= min_artifact_rows artifact rows.
    """
    with np.errstate(invalid="ignore"):
        strong = (p_a <= rule.alpha) & (n_a >= rule.min_artifact_rows) & (np.abs(eff_a - 0.5) >= rule.strong_effect)
        formula = named & (p_r <= rule.alpha) & (n_r >= rule.min_artifact_rows) & (np.abs(eff_r - 0.5) >= rule.min_effect)
    return formula, strong


def formula_p(p_region, e_region, p_out, e_out, selection: float, min_effect: float, n_tests: int = 2):
    """The formula branch's p-value: ``n_tests`` times the smaller of the region test's p (times
    ``selection``: the region was chosen on the rows it is tested on unless a held-out split is used) and
    the p of the test over the rows outside the regions when it points the same way with
    |effect - 0.5| >= ``min_effect`` (Bonferroni for taking the smallest of ``n_tests`` valid tests: the
    regions' and the outside one). Outside the regions the naming formulas do not depend on the artifact,
    so the search's choice of formula does not bias that test. NaN when the region test is NaN."""
    with np.errstate(invalid="ignore"):
        same = (np.sign(np.asarray(e_region) - 0.5) == np.sign(np.asarray(e_out) - 0.5)) \
            & (np.abs(np.asarray(e_out) - 0.5) >= min_effect)
        pa = np.where(same & ~np.isnan(p_out), p_out, 1.0)
        out = np.minimum(1.0, n_tests * np.minimum(np.minimum(1.0, np.asarray(p_region) * selection), pa))
    return np.where(np.isnan(p_region), np.nan, out)


def search_size(n_concepts: int, length: int, beam: int, limit_search: int | None = None) -> int:
    """Formulas INVERT scores for one neuron in both directions: 2C atoms, then per further length
    beam × pool × 4 (AND, AND NOT, OR, OR NOT), twice (raising and lowering search)."""
    pool = min(n_concepts, limit_search) if limit_search else n_concepts
    return 2 * (2 * n_concepts + (length - 1) * beam * pool * 4)


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _first(t: StratifiedTest) -> dict[str, float]:
    return {"effect": float(t.effect[0]), "se": float(t.se[0]), "p": float(t.p[0]),
            "n_artifact": int(t.n_artifact[0]), "n_rows": int(t.n_rows[0]), "n_strata": int(t.n_strata[0])}


def verdict(plan: Plan, tests: PairTests, p_adj_all: float, p_adj_region: float, rule: Rule,
            heldout: bool, selection: float = 1.0) -> ArtifactTest:
    """Status, branch, direction and the one-sentence reason of one pair (real labels: column 0)."""
    art = plan.artifact
    named = bool(plan.named_by)
    A = _first(tests.all_rows)
    R = None
    where_r = ""
    if tests.regions:  # the formula branch: the chosen region's numbers, the p that entered the adjustment
        fb = formula_branch(tests, selection, rule.min_effect)
        k = int(fb["chosen"][0])
        R = _first(tests.regions[k])
        R["p_region"] = R["p"]
        R["p_outside"] = float(tests.outside.p[0])
        R["p"] = float(fb["p"][0])
        R["n_tests"] = len(tests.regions) + 1
        where_r = f"where flipping {art} flips {plan.named_by[k]!r}"
    split = " on the held-out rows" if heldout else ""
    strata = ", ".join(plan.strata_concepts) or "none"
    formula, strong = decide(np.array(named), np.array(R["effect"] if R else 0.5),
                             np.array(p_adj_region if R else np.nan), np.array(R["n_artifact"] if R else 0),
                             np.array(A["effect"]), np.array(p_adj_all), np.array(A["n_artifact"]), rule)
    all_rec = {"effect": A["effect"], "p_value": _num(A["p"]), "p_adjusted": _num(p_adj_all),
               "n_artifact": A["n_artifact"], "n_strata": A["n_strata"]}

    def record(status, t, p_adj, where, branch=None, direction=None, reason=""):
        se = t["se"]
        inconclusive = math.isnan(t["p"])
        ci = None if inconclusive or not math.isfinite(se) else \
            (max(0.0, t["effect"] - 1.96 * se), min(1.0, t["effect"] + 1.96 * se))
        return ArtifactTest(artifact=art, status=status, branch=branch, direction=direction,
                            effect=None if inconclusive else t["effect"], effect_ci=ci, p_value=_num(t["p"]),
                            p_adjusted=_num(p_adj), n_artifact=t["n_artifact"], reason=reason,
                            n_region=t["n_rows"], n_strata=t["n_strata"], strata=list(plan.strata_concepts),
                            named_by=list(plan.named_by), heldout=heldout, region=where,
                            region_p_value=_num(t["p_region"]) if "p_region" in t else None,
                            outside_p_value=_num(t["p_outside"]) if "p_outside" in t else None,
                            all_rows=all_rec if where != "all rows" else None)

    def desc(t, p_adj, where):
        sel = "" if where == "all rows" else (
            f" (p: {t['n_tests']} times the smallest of the region test's {t['p_region']:.2g}"
            + (f" times {selection:g}, the formulas the search scored," if selection > 1 else "")
            + f" and the test outside the regions' {t['p_outside']:.2g} if it points the same way with an "
            f"effect of at least {rule.min_effect})")
        return (f"stratified effect {t['effect']:.3f} (|effect - 0.5| = {abs(t['effect'] - 0.5):.3f}), adjusted p "
                f"{p_adj:.2g}, {t['n_artifact']} {art} rows in {t['n_strata']} strata of {strata} "
                f"{'over all rows' if where == 'all rows' else where}{split}{sel}")

    def direction_of(t):
        return "raises" if t["effect"] > 0.5 else "lowers"

    if bool(formula):
        return record("flagged", R, p_adj_region, where_r, "formula", direction_of(R),
                      f"flagged: {art} {direction_of(R)} the activation; {desc(R, p_adj_region, where_r)}; a best "
                      f"formula names {art} and the effect reaches {rule.min_effect}")
    if bool(strong):
        return record("flagged", A, p_adj_all, "all rows", "strong", direction_of(A),
                      f"flagged: {art} {direction_of(A)} the activation; {desc(A, p_adj_all, 'all rows')}; the "
                      f"effect reaches the strong threshold {rule.strong_effect}")
    if math.isnan(A["p"]) or (named and math.isnan(R["p"])):
        t, where = (A, "all rows") if math.isnan(A["p"]) else (R, where_r)
        return record("inconclusive", t, np.nan, where,
                      reason=f"inconclusive: no stratum of {strata} "
                             f"{'over all rows' if where == 'all rows' else where}{split} has rows both with and "
                             f"without {art} ({t['n_rows']} rows)")
    # not flagged: say which condition failed, with its number
    if named:
        t, p_adj, where, need = R, p_adj_region, where_r, rule.min_effect
    else:
        t, p_adj, where, need = A, p_adj_all, "all rows", rule.strong_effect
    d = abs(t["effect"] - 0.5)
    p_ok, e_ok, n_ok = p_adj <= rule.alpha, d >= need, t["n_artifact"] >= rule.min_artifact_rows
    failed = []
    if not p_ok:
        failed.append(f"adjusted p {p_adj:.2g} > {rule.alpha}")
    if not e_ok:
        failed.append(f"|effect - 0.5| = {d:.3f} < {need}"
                      + ("" if named else f" (no best formula names {art}: the strong threshold applies)"))
    if not n_ok:
        failed.append(f"{t['n_artifact']} {art} rows < {rule.min_artifact_rows}")
    near = named or (not n_ok and p_ok and e_ok) or (p_ok and not e_ok and d >= need - rule.min_effect / 2) \
        or (e_ok and not p_ok and p_adj <= 10 * rule.alpha)
    status = "near_miss" if near else "clean"
    return record(status, t, p_adj, where, direction=direction_of(t) if near else None,
                  reason=f"{'near miss' if near else 'clean'}: {'; '.join(failed)}; {desc(t, p_adj, where)}")


def flag_of(t: ArtifactTest, formula: str | None, formula_auroc: float | None, artifact_auroc: float | None) -> Flag:
    return Flag(artifact=t.artifact, rule=t.branch or "", formula=formula, auroc=formula_auroc,
                p_adjusted=t.p_adjusted, artifact_auroc=artifact_auroc, reason=t.reason, branch=t.branch,
                direction=t.direction, effect=t.effect, effect_ci=t.effect_ci, p_value=t.p_value,
                n_artifact=t.n_artifact)


@dataclass
class AuditTests:
    """The decision over a whole audit: one ArtifactTest per (layer, neuron, artifact)."""

    tests: dict[tuple[int, int], list[ArtifactTest]] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None


def permuted_labels(y: np.ndarray, groups: np.ndarray, runs: int, rng: np.random.Generator) -> np.ndarray:
    """(N, 1 + runs): ``y`` and ``runs`` copies permuted within ``groups``."""
    N = len(y)
    cols = np.empty((N, 1 + runs), dtype=bool)
    cols[:, 0] = y
    g = np.asarray(groups)
    if N and g.min() >= 0 and g.max() < 2 ** 15:
        g = g.astype(np.int16)  # radix sort
    base = np.argsort(g, kind="stable")
    for r in range(runs):
        # np.lexsort((rng.random(N), groups)): by the random key (ties by row), then stably by group
        o = np.argsort(rng.random(N), kind="stable")
        perm = o[np.argsort(g[o], kind="stable")]
        cols[base, 1 + r] = y[perm]
    return cols


def run_tests(layers: Sequence[tuple[np.ndarray, list[tuple[int, str, list[tuple[str, Any]]]]]],
              labels: Labels, artifacts: Sequence[str], rule: Rule, *, ancestors: dict[str, list[str]] | None = None,
              search_rows: np.ndarray | None = None, test_rows: np.ndarray | None = None,
              selection: float = 1.0) -> AuditTests:
    """Test every (layer, neuron, artifact) of an audit, adjust over all of them, decide, calibrate.

    ``layers``: per layer (A (N, K), [(neuron index, status, best formulas [(text, ast)])]).
    ``search_rows``/``test_rows``: the held-out split (associated concepts from the search rows, tests on
    the held-out rows); None = every row for both.
    ``selection``: without a held-out split a region is chosen by the search on the rows it is tested on;
    its p-value is multiplied by this factor (Bonferroni over the formulas the search scored, see
    :func:`search_size`) before the adjustment. 1 with a held-out split.
    """
    ancestors = ancestors or {}
    N = labels.N
    test_rows = np.arange(N) if test_rows is None else np.asarray(test_rows)
    heldout = len(test_rows) < N
    ctxs = {a: artifact_context(labels, a, rule.strata, ancestors.get(a, ()), search_rows) for a in artifacts}
    R = int(rule.calibration_runs)
    rng = np.random.default_rng([rule.seed, 9])
    Ycal = {art: LabelRows.of(permuted_labels(labels(art), ctxs[art].calib_groups, R, rng)) for art in artifacts}
    keys, plans, tests = [], [], []
    from .columns import ColumnBlocks

    for li, (A, neurons) in enumerate(layers):
        # float64 columns read a block of neurons at a time (A may be a float32 memmap of 10⁶ rows)
        columns = ColumnBlocks(A, [k for k, status, _ in neurons if status == "ok"]) if artifacts else None
        for pos, (k, status, best) in enumerate(neurons):
            a = None
            for art in artifacts:
                keys.append((li, pos, art))
                if status != "ok":
                    plans.append(None)
                    tests.append(None)
                    continue
                if a is None:
                    a = columns.column(k)
                    order_a = np.argsort(a, kind="stable")
                plan = make_plan(best, ctxs[art], labels, test_rows)
                plans.append(plan)
                tests.append(run_plan(plan, a, Ycal[art], order_a))
    n, P = len(keys), 1 + R
    p_a, p_r = np.full((n, P), np.nan), np.full((n, P), np.nan)
    e_a, e_r = np.full((n, P), 0.5), np.full((n, P), 0.5)
    n_a, n_r = np.zeros((n, P), dtype=np.int64), np.zeros((n, P), dtype=np.int64)
    named = np.zeros(n, dtype=bool)
    for i, (plan, t) in enumerate(zip(plans, tests)):
        if t is None:
            continue
        p_a[i], e_a[i], n_a[i] = t.all_rows.p, t.all_rows.effect, t.all_rows.n_artifact
        if t.regions:
            fb = formula_branch(t, selection, rule.min_effect)
            p_r[i], e_r[i], n_r[i] = fb["p"], fb["effect"], fb["n_artifact"]
        named[i] = bool(plan.named_by)
    # Benjamini-Hochberg over every test of the audit (all-rows and region tests of every pair), per run
    both = np.vstack([p_a, p_r])
    adj = np.column_stack([benjamini_hochberg(both[:, j]) for j in range(P)]) if n else both
    q_a, q_r = adj[:n], adj[n:]
    out = AuditTests()
    for i, ((li, pos, art), plan, t) in enumerate(zip(keys, plans, tests)):
        if t is None:
            rec = ArtifactTest(artifact=art, status="clean", n_artifact=0,
                               reason="clean: constant activation (dead neuron), nothing moves it")
        else:
            rec = verdict(plan, t, float(q_a[i, 0]), float(q_r[i, 0]), rule, heldout, selection)
        out.tests.setdefault((li, pos), []).append(rec)
    if not R:
        return out
    fb, sb = decide(named[:, None], e_r[:, 1:], q_r[:, 1:], n_r[:, 1:], e_a[:, 1:], q_a[:, 1:], n_a[:, 1:], rule)
    flags = fb | sb
    per_run = flags.sum(axis=0).astype(int).tolist()
    neuron_of = np.array([li * 10_000_000 + pos for li, pos, _ in keys], dtype=np.int64)
    neurons_per_run = [int(len(np.unique(neuron_of[flags[:, r]]))) for r in range(R)]
    real = sum(t.status == "flagged" for ts in out.tests.values() for t in ts)
    out.calibration = {
        "runs": R, "flags_per_run": per_run, "neurons_per_run": neurons_per_run,
        "mean_flags": float(np.mean(per_run)), "max_flags": int(max(per_run)), "real_flags": int(real),
        "method": f"each artifact's labels permuted within the strata of its {rule.strata} most associated "
                  "concepts (formulas, regions and strata kept), and the whole decision (tests, Benjamini-Hochberg "
                  f"over the audit, thresholds) rerun; {R} runs",
        "associated": {a: ctxs[a].associated for a in artifacts},
        "containers": {a: ctxs[a].containers for a in artifacts},
    }
    return out
