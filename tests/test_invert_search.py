"""INVERT beam search against an independent brute-force reference.

The reference below shares no code with auditor.invert: AUROC by counting all
(positive, negative) pairs (ties count 1/2), every candidate formula built and
evaluated one at a time with numpy booleans, and the search rules of
shared/spec/INVERT.md written out literally:

* atoms: c and NOT c for every concept with positives and negatives, in the order
  c0, NOT c0, c1, NOT c1, ...
* admissible: 0 < n < N and min_fraction <= n/N <= max_fraction
* pool: concepts by |AUROC - 0.5| descending, ties by concept index, each giving
  c then NOT c; the first `limit_search` atoms; not filtered by fraction
* candidates at length l: the beam (in beam order), then for each beam formula f,
  each pool atom a, AND then OR; a combination whose labeling equals f's or a's is
  trivial and dropped; inadmissible ones are dropped
* identical labelings are one candidate: the shortest, then the first enumerated
* the beam: the best B by (AUROC desc [asc for mode="negative"], length, order)
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from auditor.invert import InvertParams, explain

# --------------------------------------------------------------------------- reference


def pair_auroc(a: np.ndarray, y: np.ndarray) -> float:
    """AUROC by counting pairs: (2 * #greater + #equal) / (2 * n_pos * n_neg)."""
    pos, neg = a[y], a[~y]
    gt = int((pos[:, None] > neg[None, :]).sum())
    eq = int((pos[:, None] == neg[None, :]).sum())
    return (2 * gt + eq) / (2 * len(pos) * len(neg))


def pool_key(a: np.ndarray, y: np.ndarray) -> float:
    """|AUROC - 0.5| as one rounding of the exact rational |4U - 2 n1 n0| / (4 n1 n0)."""
    pos, neg = a[y], a[~y]
    u2 = 2 * int((pos[:, None] > neg[None, :]).sum()) + int((pos[:, None] == neg[None, :]).sum())
    d = 2 * len(pos) * len(neg)
    return abs(2 * u2 - d) / (2 * d)


def reference_search(a, Y, B, L, min_f=0.0, max_f=0.5, limit=None, negative=False):
    """Returns the beam after each length: lists of (ast, labeling, length, auroc)."""
    N, C = Y.shape

    def admissible(lab):
        n = int(lab.sum())
        return 0 < n < N and min_f <= n / N <= max_f

    def select(cands):
        # cands: (ast, lab, length) in enumeration order
        reps = {}
        for order, (ast, lab, length) in enumerate(cands):
            key = lab.tobytes()
            if key not in reps or (length, order) < (reps[key][2], reps[key][3]):
                reps[key] = (ast, lab, length, order)
        scored = []
        for ast, lab, length, order in reps.values():
            auc = pair_auroc(a, lab)
            scored.append(((auc if negative else -auc), length, order, ast, lab, auc))
        scored.sort(key=lambda t: (t[0], t[1], t[2]))
        return [(ast, lab, length, auc) for _, length, _, ast, lab, auc in scored[:B]]

    ok = [c for c in range(C) if 0 < Y[:, c].sum() < N]
    atoms = []
    for c in ok:
        atoms.append((c, Y[:, c].copy()))
        atoms.append((["not", c], ~Y[:, c]))
    beam = select([(ast, lab, 1) for ast, lab in atoms if admissible(lab)])
    beams = [beam]
    order = sorted(ok, key=lambda c: (-pool_key(a, Y[:, c]), c))
    pool = []
    for c in order:
        pool.append((c, Y[:, c].copy()))
        pool.append((["not", c], ~Y[:, c]))
    if limit is not None:
        pool = pool[:limit]
    for _ in range(2, L + 1):
        cands = [(ast, lab, length) for ast, lab, length, _ in beam]
        for f_ast, f_lab, f_len, _ in beam:
            for a_ast, a_lab in pool:
                for op in ("and", "or"):
                    lab = (f_lab & a_lab) if op == "and" else (f_lab | a_lab)
                    if np.array_equal(lab, f_lab) or np.array_equal(lab, a_lab):
                        continue  # trivial
                    if not admissible(lab):
                        continue
                    cands.append(([op, f_ast, a_ast], lab, f_len + 1))
        beam = select(cands)
        beams.append(beam)
    return beams


# --------------------------------------------------------------------------- problems


def random_problem(seed: int):
    rng = np.random.default_rng(seed)
    N = int(rng.integers(6, 48))
    C = int(rng.integers(1, 8))
    K = int(rng.integers(1, 4))
    kind = seed % 4
    if kind == 0:  # heavy ties: few distinct values
        A = rng.integers(0, 4, size=(N, K)).astype(np.float32)
    elif kind == 1:  # ReLU-like: many exact zeros
        A = np.maximum(rng.normal(size=(N, K)), 0).astype(np.float32)
    elif kind == 2:  # continuous float64, large magnitudes (a sigmoid would tie these)
        A = rng.normal(scale=50.0, size=(N, K)) + 30
    else:  # rounded: ties and zeros
        A = np.round(np.maximum(rng.normal(size=(N, K)), 0), 1)
    dens = rng.uniform(0.05, 0.6)
    Y = rng.random((N, C)) < dens
    # edge columns
    if C >= 3 and rng.random() < 0.5:
        Y[:, rng.integers(C)] = False  # no positives
    if C >= 3 and rng.random() < 0.4:
        Y[:, rng.integers(C)] = True  # no negatives
    if C >= 4 and rng.random() < 0.5:
        i, j = rng.choice(C, 2, replace=False)
        Y[:, j] = Y[:, i]  # duplicate column
    if C >= 4 and rng.random() < 0.3:
        i, j = rng.choice(C, 2, replace=False)
        Y[:, j] = ~Y[:, i]  # complementary column
    if C >= 4 and rng.random() < 0.3:  # a nested pair: c_j subset of c_i (like a hypernym)
        i, j = rng.choice(C, 2, replace=False)
        Y[:, j] &= Y[:, i]
    B = int(rng.choice([1, 2, 3, 5]))
    L = int(rng.choice([1, 2, 3, 3]))
    mode = "negative" if rng.random() < 0.3 else "positive"
    limit = None if rng.random() < 0.6 else int(rng.integers(1, 2 * C + 2))
    if rng.random() < 0.5:
        min_f, max_f = 0.0, 0.5
    else:
        lo, hi = sorted(rng.uniform(0, 1, 2))
        min_f, max_f = float(round(lo * 0.5, 3)), float(round(hi, 3))
    return A, Y, dict(beam=B, length=L, mode=mode, limit_search=limit, min_fraction=min_f, max_fraction=max_f)


def as_format(Y: np.ndarray, fmt: int):
    if fmt == 0:
        return Y
    if fmt == 1:
        return Y.astype(np.int8)
    if fmt == 2:
        return sp.csr_matrix(Y.astype(np.int64))
    if fmt == 3:
        return sp.csc_matrix(Y)
    if fmt == 4:
        return torch.from_numpy(Y.astype(np.uint8))
    return torch.from_numpy(Y)


def check_against_reference(A, Y, kw, fmt=0, backend="auto", names=None):
    C = Y.shape[1]
    names = names or [f"c{i}" for i in range(C)]
    params = InvertParams(all_lengths=True, backend=backend, **kw)
    got = explain(A, as_format(Y, fmt), names, params)
    for k, res in enumerate(got):
        a = np.asarray(A[:, k], dtype=np.float64)
        if a.min() == a.max():
            assert res.status == "dead" and res.formulas == []
            continue
        assert res.status == "ok"
        ref = reference_search(
            a,
            Y,
            kw["beam"],
            kw["length"],
            kw["min_fraction"],
            kw["max_fraction"],
            kw["limit_search"],
            kw["mode"] == "negative",
        )
        assert len(res.beams) == len(ref)
        for ell, (mine, theirs) in enumerate(zip(res.beams, ref), start=1):
            ctx = f"neuron {k}, length {ell}, params {kw}"
            assert [f.ast_columns for f in mine] == [t[0] for t in theirs], ctx
            for f, (ast, lab, length, auc) in zip(mine, theirs):
                assert f.length == length, ctx
                assert f.support == int(lab.sum()), ctx
                assert abs(f.auroc - auc) <= 1e-12, ctx
                assert f.fraction == pytest.approx(lab.mean(), abs=1e-15)
        assert res.formulas == res.beams[-1]


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("seed", range(160))
def test_matches_bruteforce(seed):
    A, Y, kw = random_problem(seed)
    check_against_reference(A, Y, kw, fmt=seed % 6)


@pytest.mark.parametrize("seed", range(0, 160, 4))
def test_torch_backend_matches_bruteforce(seed):
    """The torch backend (the CUDA code path) run on the CPU."""
    A, Y, kw = random_problem(seed)
    check_against_reference(A, Y, kw, backend="torch")


def test_duplicate_concept_names_search_by_column():
    rng = np.random.default_rng(7)
    N = 40
    A = np.maximum(rng.normal(size=(N, 3)), 0)
    Y = rng.random((N, 5)) < 0.3
    Y[:, 3] = Y[:, 1]
    names = ["dog", "cat", "dog", "cat", "car"]  # same names, different columns
    kw = dict(beam=3, length=3, mode="positive", limit_search=None, min_fraction=0.0, max_fraction=0.5)
    check_against_reference(A, Y, kw, names=names)
    res = explain(A, Y, names, InvertParams(beam=3, length=2))
    for r in res:
        for f in r.formulas:
            assert all(isinstance(x, str) for x in _leaves(f.ast))


def _leaves(ast):
    if isinstance(ast, (str, int)):
        return [ast]
    return [x for sub in ast[1:] for x in _leaves(sub)]


def test_chunking_does_not_change_results():
    A, Y, kw = random_problem(3)
    rng = np.random.default_rng(0)
    A = np.maximum(rng.normal(size=(50, 9)), 0)
    Y = rng.random((50, 6)) < 0.3
    base = explain(A, Y, list("abcdef"), InvertParams(beam=3, length=3))
    for chunk in (1, 2, 4):
        assert explain(A, Y, list("abcdef"), InvertParams(beam=3, length=3, chunk_neurons=chunk)) == base


def test_large_activation_values_are_ranked_raw():
    """The reference's float32 sigmoid ties every activation above ~16.6; ranks must not."""
    rng = np.random.default_rng(1)
    N = 60
    y = np.zeros(N, bool)
    y[:10] = True
    a = np.linspace(20, 80, N)[::-1].copy()  # all > 16.6: a sigmoid makes them all 1.0
    a[:10] = a[:10][::-1]
    A = a[:, None]
    Y = np.stack([y, rng.random(N) < 0.3], 1)
    res = explain(A, Y, ["x", "noise"], InvertParams(length=1, beam=1))
    assert res[0].formulas[0].text == "x"
    assert res[0].formulas[0].auroc == pytest.approx(1.0)


def test_or_with_integer_labels_is_boolean():
    """0/1 integer labels: OR of overlapping concepts must not count overlaps twice."""
    N = 20
    a = np.arange(N, dtype=float)
    a[12:15] = 100.0  # neither p nor q alone is perfect; p OR q is
    Y = np.zeros((N, 2), dtype=np.int64)
    Y[15:, 0] = 1
    Y[12:18, 1] = 1  # overlaps concept 0
    res = explain(a[:, None], Y, ["p", "q"], InvertParams(length=2, beam=2))
    best = res[0].formulas[0]
    assert best.text in ("p OR q", "q OR p")
    assert best.support == 8
    assert best.auroc == pytest.approx(1.0)


def test_beam_holds_distinct_labelings_only():
    rng = np.random.default_rng(3)
    N, C = 80, 6
    A = np.maximum(rng.normal(size=(N, 4)), 0)
    Y = rng.random((N, C)) < 0.25
    Yd = np.concatenate([Y, Y], 1)  # every concept twice
    res = explain(A, Yd, [f"c{i}" for i in range(2 * C)], InvertParams(length=3, beam=5))
    from auditor.invert import evaluate

    for r in res:
        labs = [evaluate(f.ast_columns, Yd, [f"c{i}" for i in range(2 * C)]).tobytes() for f in r.formulas]
        assert len(set(labs)) == len(labs)
        # duplicates resolve to the first column
        assert all(c < C for f in r.formulas for c in _leaves(f.ast_columns))


def test_negative_mode_reports_low_auroc():
    N = 30
    a = np.arange(N, dtype=float)
    Y = np.zeros((N, 2), bool)
    Y[:5, 0] = True  # lowest activations
    Y[25:, 1] = True  # highest
    res = explain(a[:, None], Y, ["low", "high"], InvertParams(length=1, beam=2, mode="negative"))
    f = res[0].formulas
    assert f[0].text == "low" and f[0].auroc == 0.0
    pos = explain(a[:, None], Y, ["low", "high"], InvertParams(length=1, beam=2))
    assert pos[0].formulas[0].text == "high" and pos[0].formulas[0].auroc == 1.0


def test_no_admissible_formula_gives_empty_beam():
    a = np.arange(10.0)[:, None]
    Y = np.ones((10, 2), bool)
    Y[0, 0] = False
    res = explain(a, Y, ["a", "b"], InvertParams(length=3, beam=3, max_fraction=0.05))
    assert res[0].status == "ok" and res[0].formulas == []


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(160, 400))
def test_matches_bruteforce_more(seed):
    A, Y, kw = random_problem(seed)
    check_against_reference(A, Y, kw, fmt=seed % 6, backend="torch" if seed % 2 else "auto")


def test_gpu_marker_registered_and_on_every_cuda_test(request):
    """`-m "not gpu"` must leave out every test that needs CUDA: the marker is registered (strict markers)
    and every test that skips without CUDA carries it."""
    import ast
    from pathlib import Path

    registered = [line.split(":")[0].strip() for line in request.config.getini("markers")]
    assert "gpu" in registered
    needs_cuda, unmarked = [], []
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        # module-level names bound to a skip-without-CUDA mark (e.g. ``cuda = pytest.mark.skipif(not torch.cuda...)``)
        aliases = {t.id for node in tree.body if isinstance(node, ast.Assign) and "not torch.cuda.is_available()"
                   in ast.unparse(node.value) for t in node.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
                continue
            decos = [ast.unparse(d) for d in node.decorator_list]
            if any("not torch.cuda.is_available()" in d or d in aliases for d in decos):
                needs_cuda.append(node.name)
                if "pytest.mark.gpu" not in decos:
                    unmarked.append(f"{path.name}::{node.name}")
    assert len(needs_cuda) >= 5 and unmarked == []
    assert InvertParams(device="cuda").device == "cuda"  # validation only; no CUDA needed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(11)
    N, K, C = 3000, 24, 60
    A = np.maximum(rng.normal(size=(N, K)), 0).astype(np.float32)
    A[:, :4] = np.round(A[:, :4], 1)
    Y = sp.random(N, C, density=0.05, random_state=1, format="csr").astype(bool)
    names = [f"c{i}" for i in range(C)]
    for kw in (dict(), dict(mode="negative"), dict(limit_search=25, heldout=0.5)):
        p = dict(length=3, beam=3, all_lengths=True, **kw)
        cpu = explain(A, Y, names, InvertParams(**p))
        gpu = explain(A, Y, names, InvertParams(device="cuda", **p))
        assert gpu == cpu
    for seed in range(0, 40, 3):
        A2, Y2, kw = random_problem(seed)
        names2 = [f"c{i}" for i in range(Y2.shape[1])]
        assert explain(A2, Y2, names2, InvertParams(device="cuda", **kw)) == explain(
            A2, Y2, names2, InvertParams(**kw)
        )
