"""auditor compare: flags that appear, go and stay, matched by index and by activations,
on hand-set models whose detectors are known by construction (tests/data/colour_model.py)."""

from __future__ import annotations

import itertools
import json
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

import auditor
from auditor.cli import main
from auditor.compare import correlation_matrix, impact_delta, match_by_activations
from auditor.errors import ConfigError
from helpers import NO_TORCH

sys.path.insert(0, str(Path(__file__).parent / "data"))
from colour_model import ColourNet, no_stamp  # noqa: E402

PERM = [3, 2, 0, 1]  # new channel j is old channel PERM[j]; the stamp detector (old 2) becomes new 1



def permuted() -> ColourNet:
    """The same detectors in another channel order (a retrained model)."""
    m = ColourNet()
    with torch.no_grad():
        m.conv.weight.copy_(m.conv.weight[PERM].clone())
        m.conv.bias.copy_(m.conv.bias[PERM].clone())
    return m


@pytest.fixture(scope="module")
def audits(colour_probe, tmp_path_factory):
    images, labels = colour_probe
    base = tmp_path_factory.mktemp("cmp")
    out = {}
    for name, model, extra in (("base", ColourNet(), {}), ("clean", no_stamp(), {}), ("perm", permuted(), {}),
                               ("strict", ColourNet(), {"flag_strong_effect": 0.4})):
        r = auditor.audit(model, layer="act", images=images, labels=labels, artifacts=["stamp"], normalize=False,
                          bootstrap=0, device="cpu", cache_dir=str(base / "cache"), **extra)
        r.save(base / name, formats=["json"])
        out[name] = base / name
    return out


def test_planted_detector_trained_out_is_no_longer_flagged(audits, tmp_path):
    cmp = auditor.compare(audits["base"], audits["clean"])
    (a,) = cmp.artifacts
    assert (a.old_flagged, a.new_flagged) == (1, 0)
    assert [c.old_index for c in a.no_longer_flagged] == [2] and not a.newly_flagged and not a.still_flagged
    gone = a.no_longer_flagged[0]
    assert gone.old_formula and "stamp" in gone.old_formula and gone.formula_changed
    assert gone.artifact_auroc_delta == pytest.approx(gone.new_artifact_auroc - gone.old_artifact_auroc)
    assert gone.new_artifact_auroc < 0.6 < 0.9 < gone.old_artifact_auroc
    assert cmp.differences == [] and cmp.n_new == 0
    # the reverse direction: the detector appears, the gate fails
    rc = main(["compare", str(audits["clean"]), str(audits["base"] / "results.json"), "--out", str(tmp_path / "c"),
               "--fail-on-new", "--formats", "html,json,junit"])
    assert rc == 1
    data = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert data["n_new"] == 1 and data["artifacts"][0]["newly_flagged"][0]["new_index"] == 2
    suite = ET.parse(tmp_path / "c" / "junit.xml").getroot()
    assert suite.get("failures") == "1"
    html = (tmp_path / "c" / "compare.html").read_text()
    assert "New artifact detectors" in html and "Newly flagged (1)" in html
    assert main(["compare", str(audits["clean"]), str(audits["base"]), "--out", str(tmp_path / "d"),
                 "--formats", "json"]) == 0  # no gate asked


def test_permuted_channels_by_index_vs_by_activations(audits):
    by_index = auditor.compare(audits["base"], audits["perm"])
    (a,) = by_index.artifacts
    assert [c.old_index for c in a.no_longer_flagged] == [2] and [c.new_index for c in a.newly_flagged] == [1]
    by_act = auditor.compare(audits["base"], audits["perm"], match="activations")
    (b,) = by_act.artifacts
    assert not b.newly_flagged and not b.no_longer_flagged
    assert [(c.old_index, c.new_index) for c in b.still_flagged] == [(2, 1)]
    assert b.still_flagged[0].correlation == pytest.approx(1.0)
    assert by_act.layers[0].mean_correlation == pytest.approx(1.0)
    assert by_act.layers[0].n_formula_changed == 0  # the same detectors, renumbered


def test_threshold_difference_is_stated_first(audits, tmp_path, capsys):
    cmp = auditor.compare(audits["base"], audits["strict"])
    assert len(cmp.differences) == 1 and cmp.differences[0].startswith("DIFFERENT THRESHOLDS: flag_strong_effect 0.25 -> 0.4")
    main(["compare", str(audits["base"]), str(audits["strict"]), "--out", str(tmp_path / "o"), "--formats", "html"])
    assert "WARNING: DIFFERENT THRESHOLDS" in capsys.readouterr().err
    html = (tmp_path / "o" / "compare.html").read_text()
    assert html.index("do not measure the same thing") < html.index("Per artifact")


def test_missing_activation_cache_is_exit_2_naming_it(audits, tmp_path, capsys):
    old = auditor.load(audits["base"])
    cache = Path(old.provenance["cache"]["dir"])
    moved = tmp_path / "moved"
    shutil.move(str(cache), moved)
    try:
        rc = main(["compare", str(audits["base"]), str(audits["perm"]), "--out", str(tmp_path / "x"),
                   "--match", "activations"])
        err = capsys.readouterr().err
        assert rc == 2 and str(cache) in err and old.provenance["cache"]["key"] in err
        assert not (tmp_path / "x").exists()
    finally:
        shutil.move(str(moved), cache)


def test_different_probe_sets_refuse_activation_matching(audits, tmp_path):
    a = auditor.load(audits["base"])
    d = a.to_dict()
    d["provenance"]["data"]["fingerprint"] = "elsewhere"
    b = type(a).from_dict(d)
    with pytest.raises(ConfigError, match="same probe set"):
        auditor.compare(a, b, match="activations")
    assert any(x.startswith("DIFFERENT PROBE SETS") for x in auditor.compare(a, b).differences)


def test_correlation_and_assignment_against_references():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(50, 5))
    B = A[:, [4, 0, 3, 1, 2]] * rng.uniform(0.5, 2, size=5) + rng.normal(scale=0.3, size=(50, 5))
    C = correlation_matrix(A, B)
    ref = np.corrcoef(A.T, B.T)[:5, 5:]
    assert np.allclose(C, ref)
    pairs = match_by_activations(A, B)
    best = max(itertools.permutations(range(5)), key=lambda p: sum(ref[i, p[i]] for i in range(5)))
    assert [j for _, j, _ in sorted(pairs)] == list(best) == [1, 3, 4, 2, 0]
    # streamed in chunks over a row subset: the same as on the subset directly
    import auditor.compare as c

    rows = rng.random(50) < 0.7
    old_chunk = c.CHUNK_ROWS
    c.CHUNK_ROWS = 7
    try:
        assert np.allclose(correlation_matrix(A, B, rows), np.corrcoef(A[rows].T, B[rows].T)[:5, 5:])
    finally:
        c.CHUNK_ROWS = old_chunk
    # a constant (dead) neuron correlates 0 with everything, not NaN
    A[:, 0] = 1.0
    assert np.isfinite(correlation_matrix(A, B)).all() and (correlation_matrix(A, B)[0] == 0).all()


def test_impact_deltas():
    d = impact_delta({"flip_rate": 0.4, "control_flip_rate": 0.02, "ablation": {"share_carried": 0.8}},
                     {"flip_rate": 0.1, "control_flip_rate": 0.03, "ablation": None, "summary": "s"})
    assert d["numbers"]["flip_rate"]["delta"] == pytest.approx(-0.3)
    assert d["numbers"]["share_carried"] == {"old": 0.8, "new": None, "delta": None}
    assert d["new_summary"] == "s"
    assert impact_delta(None, None) is None


@pytest.mark.slow
def test_compare_pdf(audits, tmp_path):
    cmp = auditor.compare(audits["base"], audits["clean"])
    written = cmp.save(tmp_path / "p", formats=["pdf"])
    assert written["pdf"].read_bytes().startswith(b"%PDF")


def test_compare_history_and_notebook_view_run_without_torch(audits, tmp_path):
    """compare, history and the Jupyter view work from saved results alone: torch blocked."""
    import subprocess

    code = (NO_TORCH +
            "import auditor\n"
            "from auditor.cli import main\n"
            "from auditor.history import History\n"
            "a, b, out = sys.argv[1:4]\n"
            "assert main(['compare', a, b, '--out', out, '--formats', 'html,json,junit']) == 0\n"
            "r = auditor.load(b)\n"
            "assert '<iframe' in r._repr_html_() and '<iframe' in auditor.compare(a, b)._repr_html_()\n"
            "with History(out + '/h.sqlite') as h:\n"
            "    h.record(r, source='api')\n"
            "assert main(['history', out + '/h.sqlite']) == 0\n")
    proc = subprocess.run([sys.executable, "-c", code, str(audits["base"]), str(audits["clean"]), str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "o" / "compare.html").is_file()


def test_artifact_test_statuses_and_impact_are_carried(audits, tmp_path):
    """Results that carry artifact_tests (per neuron) and impact (per artifact) show both in the comparison."""
    a, b = auditor.load(audits["base"]), auditor.load(audits["clean"])
    n_old = a.layers[0].neurons[2]
    n_new = b.layers[0].neurons[2]
    object.__setattr__(n_old, "artifact_tests", [{"artifact": "stamp", "status": "flagged"}])
    object.__setattr__(n_new, "artifact_tests", [{"artifact": "stamp", "status": "near_miss"}])
    object.__setattr__(a, "impact", [{"artifact": "stamp", "flip_rate": 0.5, "control_flip_rate": 0.01,
                                      "summary": "old", "ablation": {"share_carried": 0.9}}])
    object.__setattr__(b, "impact", [{"artifact": "stamp", "flip_rate": 0.02, "control_flip_rate": 0.01,
                                      "summary": "Pasting the stamp flips 2% of predictions.", "ablation": None}])
    cmp = auditor.compare(a, b)
    gone = cmp.artifacts[0].no_longer_flagged[0]
    assert (gone.old_test, gone.new_test) == ("flagged", "near_miss")
    assert cmp.artifacts[0].impact["numbers"]["flip_rate"]["delta"] == pytest.approx(-0.48)
    html = (cmp.save(tmp_path / "o", formats=["html"])["html"]).read_text()
    assert "near_miss" in html and "-48.0 points" in html and "flips 2% of predictions" in html
