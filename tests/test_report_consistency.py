"""One set of numbers: report.html, report.pdf, neurons.csv and results.json agree.

Renders every format once, then re-reads each file independently (lxml for the HTML,
pypdf for the PDF text, pandas for the CSV, json for the results) and checks, at the
precision the report shows, the per-artifact status counts, each neuron's best formula,
AUROC, p, adjusted p, support, fraction and artifact effect, the layer medians and the
impact figures.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

import auditor.report as report
from auditor.report.context import formula_tokens, tokens_text
from auditor.report.env import fmt_auroc, fmt_int, fmt_pct, fmt_pvalue
from auditor.results import AuditResult

import report_fixtures  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.slow

STATUS_WORDS = {"flagged": "flagged", "near_miss": "near miss", "inconclusive": "inconclusive", "clean": "clean",
                "dead": "dead"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return report.render(report_fixtures.make_result(), tmp_path_factory.mktemp("all"))


@pytest.fixture(scope="module")
def saved(files) -> AuditResult:
    json.loads(files["json"].read_text(encoding="utf-8"))  # plain JSON
    return AuditResult.load(files["json"])


@pytest.fixture(scope="module")
def csv(files):
    import pandas as pd

    return pd.read_csv(files["csv"])


@pytest.fixture(scope="module")
def doc(files):
    import lxml.html

    return lxml.html.fromstring(files["html"].read_bytes())


@pytest.fixture(scope="module")
def pdf_text(files) -> str:
    pypdf = pytest.importorskip("pypdf")
    return "\n".join(p.extract_text() or "" for p in pypdf.PdfReader(str(files["pdf"])).pages)


def _text(el) -> str:
    return re.sub(r"\s+", " ", el.text_content()).strip()


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s)


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _effect_text(effect, lo, hi) -> str:
    if _nan(effect):
        return "—"
    out = fmt_auroc(effect)
    if not _nan(lo):
        out += f" [{fmt_auroc(lo)}, {fmt_auroc(hi)}]"
    return out


def _expected_cells(row, artifacts) -> list[str]:
    """The numeric cells of a triage row, formatted from neurons.csv alone."""
    cells = [fmt_auroc(None if _nan(row["auroc"]) else row["auroc"])]
    if not _nan(row["heldout_auroc"]) or row.get("_heldout_column"):
        cells.append(fmt_auroc(None if _nan(row["heldout_auroc"]) else row["heldout_auroc"]))
    cells += [fmt_pvalue(None if _nan(row["p_value"]) else row["p_value"],
                         None if _nan(row["log10_p"]) else row["log10_p"]),
              fmt_pvalue(None if _nan(row["p_adjusted"]) else row["p_adjusted"]),
              fmt_int(None if _nan(row["support"]) else row["support"]),
              fmt_pct(None if _nan(row["fraction"]) else row["fraction"])]
    for a in artifacts:
        cells.append(_effect_text(row[f"effect:{a}"], row[f"effect_ci_low:{a}"], row[f"effect_ci_high:{a}"]))
    return cells


def test_csv_equals_results_json(saved, csv):
    neurons = [(lyr, n) for lyr in saved.layers for n in lyr.neurons]
    assert len(csv) == len(neurons)
    for (lyr, n), (_, row) in zip(neurons, csv.iterrows()):
        assert row["layer"] == lyr.name and row["neuron"] == n.index
        best = n.best
        if best is None:
            assert _nan(row["formula"]) and row["verdict"] == "dead"
            continue
        assert row["formula"] == best.formula
        assert row["auroc"] == best.auroc and row["support"] == best.support
        assert row["p_adjusted"] == pytest.approx(best.p_adjusted, rel=1e-12)
        for t in n.artifact_tests:
            assert row[f"status:{t.artifact}"] == t.status
            assert row[f"effect:{t.artifact}"] == t.effect
            assert (row[f"effect_ci_low:{t.artifact}"], row[f"effect_ci_high:{t.artifact}"]) == tuple(t.effect_ci)


def test_html_triage_table_equals_csv(doc, csv, saved):
    concepts = {c.name: c for c in saved.concepts}
    checked = [a for a in saved.artifacts if f"status:{a}" in csv and csv[f"status:{a}"].notna().any()]
    for pos, lyr in enumerate(saved.layers):
        table = doc.get_element_by_id(f"neurons-{pos}")
        heads = [_text(th) for th in table.xpath("./thead/tr/th")]
        heldout = "held-out" in heads
        body = table.xpath("./tbody/tr")
        sub = csv[csv["layer"] == lyr.name]
        assert len(body) == len(sub)
        for tr, (_, row), n in zip(body, sub.iterrows(), lyr.neurons):
            cells = [_text(td) for td in tr.xpath("./td")]
            assert cells[0] == str(row["neuron"])
            assert cells[1] == STATUS_WORDS.get(row["verdict"], row["verdict"])
            if n.best is not None:
                assert cells[2] == tokens_text(formula_tokens(n.best, concepts))
            row = row.copy()
            row["_heldout_column"] = heldout
            assert cells[3:] == _expected_cells(row, checked), n.index


def test_pdf_rows_equal_csv(pdf_text, csv, saved):
    text = _squash(pdf_text)
    concepts = {c.name: c for c in saved.concepts}
    checked = [a for a in saved.artifacts if f"status:{a}" in csv and csv[f"status:{a}"].notna().any()]
    for (_, row), n in zip(csv.iterrows(), [n for lyr in saved.layers for n in lyr.neurons]):
        if n.best is None:
            continue
        row = row.copy()
        row["_heldout_column"] = True  # the fixture has a held-out split
        numbers = _squash("".join(_expected_cells(row, checked)))
        formula = _squash(tokens_text(formula_tokens(n.best, concepts)))
        assert formula + numbers in text, (n.index, formula + numbers)


def test_status_counts_agree_everywhere(doc, csv, pdf_text, saved):
    page1 = _squash(pdf_text)
    for art in saved.artifacts:
        col = f"status:{art}"
        if col not in csv or csv[col].isna().all():
            continue
        counts = csv[col].value_counts()
        line = " · ".join(f"{int(counts.get(s, 0))} {w}" for s, w in
                          (("flagged", "flagged"), ("near_miss", "near miss"), ("inconclusive", "inconclusive"),
                           ("clean", "clean")))
        from_json = sum(1 for lyr in saved.layers for n in lyr.neurons for t in n.artifact_tests
                        if t.artifact == art and t.status == "flagged")
        assert int(counts.get("flagged", 0)) == from_json
        assert line in [_text(d) for d in doc.find_class("counts")], line
        assert _squash(line) in page1, line


def test_layer_medians_agree(doc, csv, pdf_text, saved):
    text = _squash(pdf_text)
    for lyr in saved.layers:
        sub = csv[csv["layer"] == lyr.name]
        phrase = (f"median best-formula AUROC {fmt_auroc(sub['auroc'].median())}, "
                  f"median support {fmt_pct(sub['fraction'].median())}")
        section = doc.get_element_by_id(f"layer-{[x.name for x in saved.layers].index(lyr.name)}")
        assert phrase in _text(section), phrase
        assert _squash(phrase) in text


def test_impact_figures_agree(doc, pdf_text, saved):
    text = _squash(pdf_text)
    summary = _text(doc.get_element_by_id("summary"))
    assert saved.impact
    for imp in saved.impact:
        phrase = f"{fmt_pct(imp.flip_rate)} of predictions flip (control {fmt_pct(imp.control_flip_rate)})"
        assert phrase in summary and _squash(phrase) in text, phrase
        if imp.ablation:
            carried = f"flagged neurons carry {fmt_pct(imp.ablation['share_carried'])}"
            assert carried in summary and _squash(carried) in text
