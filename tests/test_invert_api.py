"""INVERT public API: parameters, input validation, held-out split, helpers."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from auditor.errors import AuditorError, ConfigError, DataError
from auditor.invert import (
    Formula,
    InvertParams,
    NeuronExplanation,
    auroc_vector,
    benjamini_hochberg,
    concepts_in,
    evaluate,
    explain,
    formula_text,
    mannwhitney,
    remove_concept,
)


def small(seed=0, N=120, K=5, C=7):
    rng = np.random.default_rng(seed)
    A = np.maximum(rng.normal(size=(N, K)), 0).astype(np.float32)
    Y = rng.random((N, C)) < 0.2
    A[:, 1] += 2.0 * Y[:, 3]
    return A, Y, [f"c{i}" for i in range(C)]


# ------------------------------------------------------------------------------ params


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(length=0), ["length", "0", ">= 1"]),
        (dict(length=2.5), ["length", "2.5"]),
        (dict(beam=0), ["beam", ">= 1"]),
        (dict(beam=True), ["beam"]),
        (dict(min_fraction=-0.1), ["min_fraction", "-0.1", "[0, 1]"]),
        (dict(max_fraction=1.5), ["max_fraction", "1.5", "[0, 1]"]),
        (dict(min_fraction=0.6, max_fraction=0.5), ["min_fraction", "0.6", "max_fraction", "0.5"]),
        (dict(limit_search=0), ["limit_search", "0"]),
        (dict(mode="both"), ["mode", "'both'", "'positive'", "'negative'"]),
        (dict(alternative="less-ish"), ["alternative", "'two-sided'", "'greater'"]),
        (dict(heldout=0.0), ["heldout", "(0, 1)"]),
        (dict(heldout=1.0), ["heldout", "(0, 1)"]),
        (dict(seed=-1), ["seed", "-1"]),
        (dict(device="gpu"), ["device", "'gpu'", "'cuda:N'"]),
        (dict(all_lengths="yes"), ["all_lengths"]),
        (dict(chunk_neurons=0), ["chunk_neurons"]),
        (dict(backend="numpy"), ["backend", "'numpy'"]),
        (dict(backend="scipy", device="cuda"), ["scipy", "cuda"]),
    ],
)
def test_params_validation(kw, words):
    with pytest.raises(ConfigError) as exc:
        InvertParams(**kw)
    for w in words:
        assert w in str(exc.value)


def test_params_defaults_and_frozen():
    p = InvertParams()
    assert (p.length, p.beam, p.min_fraction, p.max_fraction, p.limit_search) == (3, 5, 0.0, 0.5, None)
    assert (p.mode, p.alternative, p.heldout, p.seed, p.all_lengths, p.device) == (
        "positive", "two-sided", None, 0, False, "cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.beam = 3  # type: ignore[misc]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_unavailable_is_config_error():
    A, Y, names = small()
    with pytest.raises(ConfigError, match="CUDA is not available"):
        explain(A, Y, names, InvertParams(device="cuda"))


# ------------------------------------------------------------------------------ inputs


def test_bad_label_values_name_column_and_value():
    A, Y, names = small()
    Yi = Y.astype(np.int16)
    Yi[7, 4] = 2
    with pytest.raises(DataError) as exc:
        explain(A, Yi, names)
    msg = str(exc.value)
    assert "column 4" in msg and "'c4'" in msg and "2" in msg and "row 7" in msg

    Ys = sp.lil_matrix(Y.astype(np.float64))
    Ys[3, 5] = 0.5
    Ys = Ys.tocsr()
    with pytest.raises(DataError, match=r"column 5 \('c5'\).*0\.5"):
        explain(A, Ys, names)

    Yf = Y.astype(np.float32)
    Yf[0, 0] = np.nan
    with pytest.raises(DataError, match="column 0"):
        explain(A, Yf, names)

    Yt = torch.from_numpy(Y.astype(np.int64))
    Yt[1, 2] = -1
    with pytest.raises(DataError, match=r"column 2.*-1"):
        explain(A, Yt, names)


def test_shape_mismatch_names_both_shapes():
    A, Y, names = small()
    with pytest.raises(DataError) as exc:
        explain(A[:100], Y, names)
    assert "(120, 7)" in str(exc.value) and "(100, 5)" in str(exc.value)
    with pytest.raises(DataError, match="6 concept names"):
        explain(A, Y, names[:6])
    with pytest.raises(DataError, match="2-D"):
        explain(A[:, 0], Y, names)
    with pytest.raises(DataError, match="2-D"):
        explain(A, Y[:, 0], names)


def test_nan_activations_rejected():
    A, Y, names = small()
    A[5, 2] = np.nan
    with pytest.raises(DataError, match="neuron 2.*row 5"):
        explain(A, Y, names)


def test_neurons_argument():
    A, Y, names = small()
    res = explain(A, Y, names, InvertParams(length=2, beam=2), neurons=[3, 1])
    assert [r.index for r in res] == [3, 1]
    full = explain(A, Y, names, InvertParams(length=2, beam=2))
    assert res[1].formulas[0].ast == full[1].formulas[0].ast
    with pytest.raises(ConfigError, match="5 out of range"):
        explain(A, Y, names, neurons=[5])


def test_errors_are_auditor_errors():
    assert issubclass(DataError, AuditorError) and issubclass(ConfigError, AuditorError)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32])
def test_torch_activation_dtypes(dtype):
    A, Y, names = small()
    At = torch.from_numpy(A * 10).to(dtype)
    ref = explain(At.float().numpy(), Y, names, InvertParams(length=2, beam=2))
    got = explain(At, torch.from_numpy(Y), names, InvertParams(length=2, beam=2))
    assert got == ref


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_label_formats_agree():
    A, Y, names = small(1)
    p = InvertParams(length=3, beam=3)
    ref = explain(A, Y, names, p)
    for lab in (
        Y.astype(np.uint8),
        Y.astype(np.float64),
        sp.csr_matrix(Y),
        sp.csc_matrix(Y.astype(np.int32)),
        sp.coo_matrix(Y),
        torch.from_numpy(Y).to_sparse(),
        torch.from_numpy(Y.astype(np.float32)).to_sparse_csr(),
    ):
        assert explain(A, lab, names, p) == ref


# ------------------------------------------------------------------------------ results


def test_dead_neurons():
    A, Y, names = small()
    A[:, 0] = 0.0
    A[:, 4] = 3.5
    res = explain(A, Y, names, InvertParams(length=2, beam=2, all_lengths=True))
    assert [r.status for r in res] == ["dead", "ok", "ok", "ok", "dead"]
    assert res[0].formulas == [] and res[4].formulas == []
    assert all(r.formulas for r in res if r.status == "ok")


def test_result_fields_and_json():
    A, Y, names = small()
    res = explain(A, Y, names, InvertParams(length=3, beam=3))
    best = res[1].formulas[0]
    assert isinstance(best, Formula) and isinstance(res[1], NeuronExplanation)
    assert "c3" in best.text
    y = evaluate(best.ast, Y, names)
    assert best.support == y.sum() and best.fraction == pytest.approx(y.mean())
    assert best.auroc == pytest.approx(auroc_vector(A[:, 1], y), abs=1e-12)
    p, lp = mannwhitney(A[:, 1], y)
    assert (best.p_value, best.log10_p) == pytest.approx((p, lp))
    assert best.length == len(concepts_in(best.ast))
    assert formula_text(best.ast) == best.text
    json.dumps([dataclasses.asdict(f) for r in res for f in r.formulas])
    # BH: each ok neuron's best formula carries the adjusted p of the best p's
    q = benjamini_hochberg([r.formulas[0].p_value for r in res])
    assert [r.formulas[0].p_adjusted for r in res] == pytest.approx(list(q))
    assert all(f.p_adjusted is None for r in res for f in r.formulas[1:])


def test_all_lengths():
    A, Y, names = small()
    res = explain(A, Y, names, InvertParams(length=3, beam=2, all_lengths=True))
    for r in res:
        assert len(r.beams) == 3
        assert r.beams[-1] == r.formulas
        assert all(f.length == 1 for f in r.beams[0])
        # the beam never gets worse
        best = [b[0].auroc for b in r.beams]
        assert best == sorted(best)
    assert explain(A, Y, names, InvertParams(length=3, beam=2))[0].beams is None


def test_heldout_split():
    A, Y, names = small(2, N=300)
    h = 0.4
    res = explain(A, Y, names, InvertParams(length=2, beam=3, heldout=h, seed=5))
    # the documented split: permutation(N) from default_rng(seed); the first round(h*N) are held out
    perm = np.random.default_rng(5).permutation(300)
    hold = np.sort(perm[: round(h * 300)])
    search = np.sort(perm[round(h * 300):])
    ref = explain(A[search], Y[search], names, InvertParams(length=2, beam=3))
    for r, rr in zip(res, ref):
        assert [f.ast for f in r.formulas] == [f.ast for f in rr.formulas]
        assert [f.auroc for f in r.formulas] == [f.auroc for f in rr.formulas]
        for f in r.formulas:
            y = evaluate(f.ast, Y[hold], names)
            assert f.heldout_auroc == pytest.approx(auroc_vector(A[hold, r.index], y), abs=1e-12)
            p, lp = mannwhitney(A[hold, r.index], y)
            assert f.heldout_p_value == pytest.approx(p) and f.heldout_log10_p == pytest.approx(lp)
    assert explain(A, Y, names, InvertParams(length=2, beam=3))[0].formulas[0].heldout_auroc is None


def test_heldout_degenerate_formula_is_none():
    N = 40
    a = np.arange(N, dtype=float)
    Y = np.zeros((N, 1), bool)
    perm = np.random.default_rng(0).permutation(N)
    search = np.sort(perm[20:])
    Y[search[-3:], 0] = True  # positives only in the search split
    res = explain(a[:, None], Y, ["x"], InvertParams(length=1, beam=1, heldout=0.5))
    f = res[0].formulas[0]
    assert f.text == "x" and f.heldout_auroc is None and f.heldout_p_value is None


# ------------------------------------------------------------------------------ formula helpers


def test_formula_text():
    ast = ["or", ["and", "watermark", ["not", "star"]], "text"]
    assert formula_text(ast) == "(watermark AND NOT star) OR text"
    assert formula_text("dog") == "dog"
    assert formula_text(["not", ["and", "a", "b"]]) == "NOT (a AND b)"
    assert formula_text(("and", ("or", "a", "b"), ("not", "c"))) == "(a OR b) AND NOT c"
    with pytest.raises(DataError):
        formula_text(["xor", "a", "b"])


def test_concepts_in():
    ast = ["or", ["and", "watermark", ["not", "star"]], "text"]
    assert concepts_in(ast) == [("watermark", False), ("star", True), ("text", False)]
    assert concepts_in(["not", ["not", "a"]]) == [("a", False)]


def test_remove_concept():
    ast = ["or", ["and", "watermark", ["not", "star"]], "text"]
    assert remove_concept(ast, "watermark") == ["or", ["not", "star"], "text"]
    assert remove_concept(ast, "text") == ["and", "watermark", ["not", "star"]]
    assert remove_concept(ast, "star") == ast  # negated occurrence is kept
    assert remove_concept("watermark", "watermark") is None
    assert remove_concept(["and", "w", "w"], "w") is None
    assert remove_concept(["or", ["and", "w", "x"], "w"], "w") == "x"
    assert remove_concept(ast, "absent") == ast


def test_evaluate():
    Y = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=np.int8)
    names = ["a", "b", "c"]
    assert evaluate(["and", "a", ["not", "b"]], Y, names).tolist() == [True, False, False, False]
    assert evaluate(["or", "a", "b"], sp.csr_matrix(Y), names).tolist() == [True, True, True, False]
    assert evaluate(["or", 0, ["not", 2]], Y, names).tolist() == [True, False, True, True]
    with pytest.raises(DataError, match="unknown concept 'bb'.*did you mean"):
        evaluate("bb", Y, names)


def test_text_uses_names_and_parentheses():
    N = 60
    rng = np.random.default_rng(4)
    Y = rng.random((N, 3)) < 0.3
    a = (Y[:, 0] & ~Y[:, 1]) * 3.0 + Y[:, 2] * 1.5 + rng.random(N) * 0.1
    res = explain(a[:, None], Y, ["watermark", "star", "text"], InvertParams(length=3, beam=3))
    for f in res[0].formulas:
        assert formula_text(f.ast) == f.text
        assert not math.isnan(f.auroc)


def test_device_rank_path_on_cpu():
    """The GPU branch of the ranking (upload (n, k), transpose, torch sort) run on the CPU."""
    from auditor.invert._api import _rank_block

    rng = np.random.default_rng(5)
    A = np.round(np.maximum(rng.normal(size=(300, 6)), 0), 1).astype(np.float32)
    rows = np.sort(rng.choice(300, 200, replace=False))
    for r, c in ((None, np.arange(6)), (None, np.array([1, 4])), (rows, np.array([0, 2, 3]))):
        host = _rank_block(A, r, c, "cpu")
        dev = _rank_block(A, r, c, torch.device("cpu"), on_host=False)
        assert isinstance(host[0], np.ndarray) and isinstance(dev[0], torch.Tensor)
        assert np.array_equal(host[0], dev[0].numpy()) and np.array_equal(host[1], dev[1].numpy())


@pytest.mark.parametrize("dtype", [np.uint32, np.uint16, np.bool_, np.int8])
def test_integer_activation_dtypes(dtype):
    rng = np.random.default_rng(6)
    A = rng.integers(0, 2 if dtype == np.bool_ else 5, size=(80, 3)).astype(dtype)
    Y = rng.random((80, 4)) < 0.3
    ref = explain(A.astype(np.float64), Y, list("abcd"), InvertParams(length=2, beam=2))
    assert explain(A, Y, list("abcd"), InvertParams(length=2, beam=2)) == ref
