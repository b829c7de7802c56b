"""Page 1 and the plain-words parts of the report (fast: no figures, no PDF layout)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pytest

import auditor.report as report
from auditor.report.context import ACTIONS, IMPACT_LEVELS, STATUS_LABEL, build_context, formula_tokens
from auditor.report.html import render_context
from auditor.report.tables import neurons_table
from auditor.results import AuditResult

import report_fixtures  # tests/ is on sys.path (rootdir conftest)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def result() -> AuditResult:
    return report_fixtures.make_result()


@pytest.fixture(scope="module")
def ctx(result):
    return build_context(result, render_figures=False)


def _html(result: AuditResult, *, for_pdf: bool = False) -> str:
    return render_context(build_context(result, render_figures=False), for_pdf=for_pdf)


def _page1(html: str) -> str:
    return html[html.index('<section id="summary"'):html.index('<nav class="toc"')]


def test_page1_identifies_model_probe_set_and_audit(result):
    page1 = _page1(_html(result))
    assert "ab12" * 16 in page1 and "sha256 of weights file" in page1
    assert "11,689,512" in page1  # parameters
    assert "data/probe-images" in page1 and ".cache" not in page1  # the folder as given, not the synth cache
    assert "5,000" in page1
    assert "Watermark 8.0%" in page1 and "Overlaid text 5.0%" in page1  # prevalence of each artifact
    assert "auditor 0.1.0" in page1 and "flag rule 2.0" in page1
    assert "Recommended action" in page1 and "Block the release" in page1
    assert "8.4%" in page1 and "control 0.6%" in page1  # impact figure next to the verdict
    assert "—" not in page1.split("Model</h3>")[1].split("</dl>")[0]  # no dash in the model box


def test_results_and_config_hashes_match_the_files(result, tmp_path):
    paths = report.render(result, tmp_path, formats=("html", "json"))
    html = paths["html"].read_text(encoding="utf-8")
    shown = re.search(r'id="results-sha256">([0-9a-f]{64})<', html).group(1)
    assert shown == hashlib.sha256(paths["json"].read_bytes()).hexdigest()
    config = json.dumps(result.config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert hashlib.sha256(config.encode()).hexdigest() in html
    # re-rendering the saved results reproduces the same results.json bytes, hence the same hash
    (tmp_path / "again").mkdir()
    again = report.render(AuditResult.load(paths["json"]), tmp_path / "again", formats=("html", "json"))
    assert again["json"].read_bytes() == paths["json"].read_bytes()
    assert shown in again["html"].read_text(encoding="utf-8")


def test_model_hash_never_a_dash_even_when_missing(result):
    prov = dict(result.provenance)
    prov["model"] = {"name": "resnet18"}
    old = dataclasses.replace(result, provenance=prov)
    page1 = _page1(_html(old))
    assert "not recorded in this results file" in page1


def test_signoff_fields_blank_or_given(result):
    page1 = _page1(_html(result))
    assert "A. Auditor" in page1
    assert page1.count('class="blank"') == 3  # reviewed by, decision, date left to fill in
    signed = dataclasses.replace(result, signoff={"prepared_by": "A", "reviewed_by": "B. Reviewer",
                                                  "decision": "release blocked", "date": "2026-12-02"})
    page1 = _page1(_html(signed))
    assert "B. Reviewer" in page1 and "release blocked" in page1 and 'class="blank"' not in page1


def test_the_whole_rule_is_printed(result):
    rule = "artifact un-negated AND " + " AND ".join(f"condition number {i} holds" for i in range(60))
    long = dataclasses.replace(result, thresholds={**result.thresholds, "rule": rule})
    out = _html(long)
    assert rule in out and "…" not in out.split('id="thresholds"')[1].split("</section>")[0]
    # human names beside the config keys
    assert "Largest adjusted p-value of a flagged formula" in out and ">flag_max_p<" in out


def test_method_cites_invert_and_states_the_search(result, ctx):
    out = _html(result)
    method = out[out.index('id="method"'):]
    assert "Bykov" in method and "NeurIPS 2023" in method
    per = ctx["search"]["formulas_per_neuron"]
    assert f"{per:,}" in method and "beam of <strong>3</strong>" in method
    assert "held-out" in method.lower() and "optimistic" in method
    in_sample = _html(dataclasses.replace(result, provenance={**result.provenance, "search": {
        **result.provenance["search"], "heldout": None}}))
    assert "Every number in this report is in-sample" in in_sample
    for term in ("AUROC", "BH (adjusted p)", "Support", "Beam", "Near miss", "Held-out", "In-sample"):
        assert f"<dt>{term}</dt>" in out


def test_action_table_is_complete_and_documented(ctx):
    verdicts = {"flagged", "near_miss", "inconclusive", "clean", "not_checked"}
    assert set(ACTIONS) == {(v, i) for v in verdicts for i in IMPACT_LEVELS}
    docs = (REPO / "docs" / "report.md").read_text(encoding="utf-8")
    for (verdict, impact), (_, line) in ACTIONS.items():
        assert f"| {STATUS_LABEL[verdict]} | {impact} | {line} |" in docs, (verdict, impact)
    assert len(ctx["actions"]) == len(ACTIONS)


def test_verdict_counts_and_closest_calls(result, ctx):
    tests = [t for lyr in result.layers for n in lyr.neurons for t in n.artifact_tests]
    for v in ctx["verdict"]:
        if v["status"] == "not_checked":
            assert v["top"] is None
            continue
        for status in ("flagged", "near_miss", "inconclusive", "clean"):
            assert v["counts"][status] == sum(1 for t in tests if t.artifact == v["name"] and t.status == status)
    wm = next(v for v in ctx["verdict"] if v["name"] == "watermark")
    assert [nm["neuron"] for nm in wm["near_misses"]] == sorted(
        report_fixtures.NEAR_MISS, key=lambda i: -result.layers[0].neurons[i].artifact_auroc["watermark"])
    assert all("below the 0.75 required" in nm["reason"] for nm in wm["near_misses"])
    # a verdict without flags names its closest call, never a bare dash
    unflagged = dataclasses.replace(result, layers=[dataclasses.replace(lyr, neurons=[
        dataclasses.replace(n, flags=[], artifact_tests=[dataclasses.replace(t, status="clean")
                                                         for t in n.artifact_tests]) for n in lyr.neurons])
        for lyr in result.layers])
    c2 = build_context(unflagged, render_figures=False)
    text = next(v for v in c2["verdict"] if v["name"] == "text_overlay")
    assert text["status"] == "clean" and text["top_kind"] == "closest call" and text["top"]["reason"]
    best = max((n for lyr in result.layers for n in lyr.neurons if n.artifact_tests),
               key=lambda n: next(t.effect for t in n.artifact_tests if t.artifact == "text_overlay"))
    assert text["top"]["neuron"] == best.index


def test_negated_artifact_is_not_highlighted(result):
    concepts = {c.name: c for c in result.concepts}
    expl = dataclasses.replace(result.layers[0].neurons[0].best, ast=["and", "sky", ["not", "text_overlay"]],
                               formula="sky AND NOT text_overlay")
    kinds = [t["kind"] for t in formula_tokens(expl, concepts)]
    assert kinds == ["concept", "op", "op", "artifact-neg"]


def test_triage_rows_match_only_unnegated_concepts(result, ctx):
    rows = ctx["layers"][0]["rows"]
    for r, n in zip(rows, result.layers[0].neurons):
        if n.best is None:
            assert r["match_pos"] == "" and r["verdict"] == "dead"
            continue
        text = n.best.formula
        for name in re.findall(r"NOT (\w+)", text):
            if f" {name}" not in text.replace(f"NOT {name}", ""):
                assert name not in r["match_pos"].split("|")
                assert name in r["match_neg"].split("|")
    statuses = {r["verdict"] for r in rows}
    assert {"flagged", "near_miss", "inconclusive", "clean", "dead"} <= statuses


def test_layer_median_is_the_csv_median(result, ctx):
    df = neurons_table(result)
    for lyr in ctx["layers"]:
        sub = df[df["layer"] == lyr["name"]]
        assert lyr["median_auroc"] == pytest.approx(sub["auroc"].median())
        assert lyr["median_fraction"] == pytest.approx(sub["fraction"].median())


def test_legacy_results_render_and_show_near_misses():
    old = report_fixtures.make_result(v2=False)
    layer = old.layers[0]
    n = layer.neurons[10]
    best = dataclasses.replace(n.best, ast=["and", "watermark", "dog"], formula="watermark AND dog", auroc=0.9,
                               p_adjusted=0.2)
    neurons = list(layer.neurons)
    neurons[10] = dataclasses.replace(n, explanations=[best, *n.explanations[1:]])
    old = dataclasses.replace(old, layers=[dataclasses.replace(layer, neurons=neurons), *old.layers[1:]])
    ctx = build_context(old, render_figures=False)
    wm = next(v for v in ctx["verdict"] if v["name"] == "watermark")
    assert wm["counts"]["flagged"] == sum(1 for lyr in old.layers for x in lyr.neurons
                                          if any(f.artifact == "watermark" for f in x.flags))
    near = {nm["neuron"]: nm["reason"] for nm in wm["near_misses"] if "neuron" in nm}
    assert "adjusted p 0.2 is above 0.01" in near[10]
    # artifact-sensitive neurons without a flag are near misses too, with that reason
    for i in (8, 14):
        assert near[i].startswith("watermark alone reaches AUROC") and "does not name watermark" in near[i]
    out = render_context(ctx)
    assert "not recorded" in out  # no parameter count in a 1.x file, said in words


def test_flagged_interval_below_the_threshold_is_said(result):
    layer = result.layers[0]
    n = layer.neurons[12]
    best = dataclasses.replace(n.best, auroc_ci=(0.62, 0.95))
    neurons = list(layer.neurons)
    neurons[12] = dataclasses.replace(n, explanations=[best, *n.explanations[1:]])
    out = _html(dataclasses.replace(result, layers=[dataclasses.replace(layer, neurons=neurons), *result.layers[1:]]))
    card = out[out.index('id="L0-n12"'):]
    card = card[:card.index("</article>")]
    assert "reaches 0.620, below the flag threshold 0.85" in card
    assert "below the flag threshold" not in _html(result)


def test_evidence_images_have_a_colour_scale_and_base_rates(result):
    out = _html(result)
    card = out[out.index('id="L0-n12"'):]
    card = card[:card.index("</article>")]
    assert 'class="colour-scale"' in card and "highest activation among these images" in card
    n = result.layers[0].neurons[12]
    shown = n.top_images[:12]
    k = sum(1 for img in shown if "watermark" in img.artifacts)
    assert f"Watermark: {k} of {len(shown)} top images (base rate 8.0%, {0.08 * len(shown):.2f} expected)" in card
    assert card.count('class="thumb has-artifact"') == k


def test_explain_results_identify_the_activations_file(result):
    prov = {"activations": {"path": "acts.npy", "sha256": "cd34" * 16, "shape": [5000, 40]},
            "data": {"n_images": 5000}}
    page1 = _page1(_html(dataclasses.replace(result, provenance=prov, config={"activations": "acts.npy"})))
    assert "activations given directly (auditor explain)" in page1
    assert "sha256 of activations file" in page1 and "cd34" * 16 in page1 and "Activations file" in page1


def test_notebook_view_shows_the_same_verdict(result, ctx):
    from auditor.report.notebook import notebook_document

    doc = notebook_document(result)
    assert ctx["overall"]["action"].replace("'", "&#39;") in doc
    for v in ctx["verdict"]:
        if v["status"] != "not_checked":
            c = v["counts"]
            assert (f"{c['flagged']} flagged · {c['near_miss']} near miss · {c['inconclusive']} inconclusive · "
                    f"{c['clean']} clean") in doc
    assert "8.4% of predictions flip (control 0.6%)" in doc
