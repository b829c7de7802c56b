"""The flagging rules, on hand-set numbers."""

import pytest

from auditor.flags import PartEvidence, Thresholds, flag_neuron, unnegated_concepts
from auditor.results import Explanation

T = Thresholds()  # p 0.01, auroc 0.7, artifact alone 0.75, margin 0.05


def _best(formula, ast, auroc=0.9, p_adj=1e-6):
    return Explanation(formula=formula, ast=ast, length=1, auroc=auroc, fraction=0.2, support=20,
                       p_value=p_adj, log10_p=-6, p_adjusted=p_adj)


def _part(without=None, cond_auroc=None, cond_p=None):
    return lambda art: PartEvidence(auroc_without=without, conditional_auroc=cond_auroc, conditional_p=cond_p)


def test_unnegated():
    ast = ["or", ["and", "watermark", ["not", "star"]], ["not", ["or", "text", "x"]]]
    assert unnegated_concepts(ast) == {"watermark"}


def test_artifact_alone_strong_is_flagged():
    flags, sens = flag_neuron(_best("watermark", "watermark"), {"watermark": 0.9}, T, _part(None, 0.9, 1e-9))
    assert [f.artifact for f in flags] == ["watermark"] and sens == ["watermark"]
    assert "alone reaches AUROC 0.900" in flags[0].reason


def test_negated_artifact_is_not_flagged():
    best = _best("star AND NOT watermark", ["and", "star", ["not", "watermark"]])
    flags, sens = flag_neuron(best, {"watermark": 0.2}, T, _part(0.8, 0.2, 0.99))
    assert flags == [] and sens == []


def test_conjunction_with_ignored_artifact_is_not_flagged():
    # stripes AND star AND text on a neuron that ignores text: text alone 0.5; the margin is
    # large by chance, but within "stripes AND star" text does not raise the activation.
    ast = ["and", ["and", "stripes", "star"], "text"]
    flags, sens = flag_neuron(_best("(stripes AND star) AND text", ast), {"text": 0.5}, T,
                              _part(without=0.8, cond_auroc=0.55, cond_p=0.3))
    assert flags == [] and sens == []


def test_conjunction_where_artifact_matters_is_flagged():
    ast = ["and", "stripes", "text"]
    flags, _ = flag_neuron(_best("stripes AND text", ast, auroc=0.95), {"text": 0.6}, T,
                           _part(without=0.8, cond_auroc=0.9, cond_p=1e-5))
    assert len(flags) == 1 and flags[0].margin == pytest.approx(0.15)
    assert flags[0].conditional_p == 1e-5 and "drops AUROC by 0.150" in flags[0].reason


@pytest.mark.parametrize("auroc, p_adj", [(0.69, 1e-9), (0.95, 0.02)])
def test_weak_or_insignificant_formula_is_not_flagged_but_can_be_sensitive(auroc, p_adj):
    flags, sens = flag_neuron(_best("watermark", "watermark", auroc=auroc, p_adj=p_adj), {"watermark": 0.8}, T,
                              _part(None, 0.8, 1e-9))
    assert flags == [] and sens == ["watermark"]


def test_sensitive_without_artifact_in_formula():
    flags, sens = flag_neuron(_best("star", "star"), {"watermark": 0.76, "text": 0.74}, T, _part())
    assert flags == [] and sens == ["watermark"]


def test_dead_neuron():
    assert flag_neuron(None, {"watermark": float("nan")}, T, _part()) == ([], [])


def test_narrow_formula_is_not_flagged():
    # the random-weight ResNet-18 case: 3 images, margin and its test pass by selection, artifact alone 0.44
    ast = ["and", ["and", "yellow", "watermark"], "dots"]
    best = Explanation(formula="(yellow AND watermark) AND dots", ast=ast, length=3, auroc=0.97, fraction=0.015,
                       support=3, p_value=1e-4, log10_p=-4, p_adjusted=2e-3)
    flags, _ = flag_neuron(best, {"watermark": 0.44}, T, _part(without=0.7, cond_auroc=0.99, cond_p=4e-3))
    assert flags == []
    wide = Explanation(formula=best.formula, ast=ast, length=3, auroc=0.97, fraction=0.15, support=30,
                       p_value=1e-8, log10_p=-8, p_adjusted=1e-6)
    # enough support, but the artifact alone is below flag_partial_auroc: still not a watermark detector
    flags, _ = flag_neuron(wide, {"watermark": 0.55}, T, _part(without=0.7, cond_auroc=0.99, cond_p=1e-6))
    assert flags == []
    flags, _ = flag_neuron(wide, {"watermark": 0.65}, T, _part(without=0.7, cond_auroc=0.99, cond_p=1e-6))
    assert [f.artifact for f in flags] == ["watermark"]


def test_heldout_auroc_must_hold_up():
    import dataclasses
    best = _best("watermark", "watermark")
    kept = dataclasses.replace(best, heldout_auroc=0.85)
    dropped = dataclasses.replace(best, heldout_auroc=0.6)
    assert flag_neuron(kept, {"watermark": 0.9}, T, _part(None, 0.9, 1e-9))[0]
    assert flag_neuron(dropped, {"watermark": 0.9}, T, _part(None, 0.9, 1e-9))[0] == []
