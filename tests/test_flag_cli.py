"""The flag rule through the command line: exit codes as a contract, gates named on stderr and in
JUnit, settings that flip nothing, replaced config keys, hierarchies, and 1.x results still render."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from auditor.cli import main
from test_flags import ROLES, scenario

DATA = Path(__file__).parent / "data"


def _save(d: Path, A, Y, names) -> tuple[Path, Path]:
    np.save(d / "acts.npy", A.astype(np.float32))
    df = pd.DataFrame(Y.astype(int), columns=names)
    df.insert(0, "path", [f"img_{i}.png" for i in range(len(A))])
    df.to_csv(d / "labels.csv", index=False)
    return d / "acts.npy", d / "labels.csv"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("flagcli")
    A, Y, names, roles = scenario(21, confounded=True)
    acts, labels = _save(d, A, Y, names)
    return d, acts, labels, roles


def _explain(acts, labels, out, *extra):
    return main(["explain", "--activations", str(acts), "--labels", str(labels), "--artifacts", "watermark,text",
                 "--out", str(out), "--formats", "json,csv,junit", "-q", *extra])


def _flagged(out: Path, roles) -> dict:
    data = json.loads((out / "results.json").read_text())
    got = {}
    for n in data["layers"][0]["neurons"]:
        label = roles[n["index"]] if n["index"] < len(roles) else f"noise {n['index']}"
        for f in n["flags"]:
            got[label, f["artifact"]] = f["direction"]
    return got


@pytest.mark.parametrize("extra", [[], ["--heldout", "0.5"], ["--min-fraction", "0.05"]],
                         ids=["defaults", "heldout", "min-fraction"])
def test_explain_flags_the_same_detectors_under_every_setting(saved, extra, capsys):
    d, acts, labels, roles = saved
    out = d / ("out" + "".join(extra))
    rc = _explain(acts, labels, out, *extra)
    err = capsys.readouterr().err
    assert rc == 1 and "gate failed: fail_on_flag" in err, err
    assert _flagged(out, roles) == ROLES
    junit = ET.parse(out / "junit.xml").getroot()
    failures = [f for f in junit.iter("failure")]
    assert {f.get("type") for f in failures} == {"ArtifactDetector"}
    assert all(f.get("message").startswith("gate fail_on_flag") for f in failures)
    csv = pd.read_csv(out / "neurons.csv")
    assert set(csv["status:watermark"]) <= {"flagged", "near_miss", "inconclusive", "clean"}
    assert (csv["status:watermark"] == "flagged").sum() == sum(1 for k in ROLES if k[1] == "watermark")


def test_no_fail_on_flag_exits_0(saved, capsys):
    d, acts, labels, _ = saved
    assert _explain(acts, labels, d / "nofail", "--no-fail-on-flag") == 0
    assert "gate failed" not in capsys.readouterr().err


@pytest.fixture()
def inconclusive(tmp_path):
    rng = np.random.default_rng(3)
    N = 500
    wm = rng.random(N) < 0.3
    Y = np.column_stack([wm, ~wm, rng.random(N) < 0.3, rng.random(N) < 0.3])  # "clean" = NOT watermark
    A = np.column_stack([2 * wm + rng.normal(size=N), rng.normal(size=N)])
    return _save(tmp_path, A, Y, ["watermark", "clean", "x", "text"]) + (tmp_path,)


def test_inconclusive_gates_only_when_asked(inconclusive, capsys):
    acts, labels, d = inconclusive
    out = d / "a"
    assert _explain(acts, labels, out) == 0  # nothing flagged: the artifact never varies within a stratum
    err = capsys.readouterr().err
    assert "watermark: 0 neuron(s) flagged; 0 near miss(es); 2 inconclusive" in err
    case = [c for c in ET.parse(out / "junit.xml").getroot().iter("testcase") if "watermark" in c.get("name")][0]
    assert case.find("failure") is None and "neuron 0 (inconclusive)" in case.find("system-out").text
    out = d / "b"
    assert _explain(acts, labels, out, "--fail-on-inconclusive") == 1
    err = capsys.readouterr().err
    assert "gate failed: fail_on_inconclusive: 2 inconclusive" in err and "fail_on_flag" not in err
    case = [c for c in ET.parse(out / "junit.xml").getroot().iter("testcase") if "watermark" in c.get("name")][0]
    failure = case.find("failure")
    assert failure.get("type") == "InconclusiveArtifactTest" and "fail_on_inconclusive" in failure.get("message")


def test_old_rule_keys_fail_with_their_replacement(saved, tmp_path, capsys, colour_args):
    d, acts, labels, _ = saved
    assert _explain(acts, labels, tmp_path / "x", "--flag-margin", "0.1") == 2
    err = capsys.readouterr().err
    assert "'flag_margin'" in err and "replaced" in err and "flag_min_effect" in err
    cfg = tmp_path / "old.yaml"
    cfg.write_text("artifact_auroc: 0.8\n")
    assert main(["run", str(cfg)] + colour_args) == 2
    err = capsys.readouterr().err
    assert "'artifact_auroc'" in err and "flag_strong_effect" in err
    assert not (tmp_path / "x").exists()


def test_explain_hierarchy_makes_a_parent_a_container(tmp_path, capsys):
    rng = np.random.default_rng(4)
    N = 1500
    wm, text = rng.random(N) < 0.15, rng.random(N) < 0.15
    others = rng.random((N, 3)) < 0.25
    Y = np.column_stack([wm, text, others])
    A = np.column_stack([3 * (wm | text) + rng.normal(size=N)] + [rng.normal(size=N) for _ in range(5)])
    acts, labels = _save(tmp_path, A, Y, ["watermark", "text", "a", "b", "c"])
    h = tmp_path / "h.json"
    h.write_text(json.dumps({"overlay": ["watermark", "text"], "scene": ["a", "b", "c"]}))
    out = tmp_path / "out"
    assert _explain(acts, labels, out, "--hierarchy", str(h)) == 1, capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    assert data["calibration"]["containers"]["watermark"] == ["overlay"]
    n0 = data["layers"][0]["neurons"][0]
    assert n0["explanations"][0]["formula"] == "overlay"
    assert sorted(f["artifact"] for f in n0["flags"]) == ["text", "watermark"]
    assert all(f["branch"] == "formula" for f in n0["flags"])
    assert not any(n["flags"] for n in data["layers"][0]["neurons"][1:])


def test_render_reads_a_1x_results_file(tmp_path, capsys):
    src = tmp_path / "results.json"
    shutil.copy(DATA / "results-1.0.json", src)
    before = src.read_bytes()
    assert json.loads(before)["schema_version"].startswith("1.")
    rc = main(["render", str(src), "--out", str(tmp_path / "r"), "--formats", "html,csv,junit"])
    assert rc == 0, capsys.readouterr().err
    html = (tmp_path / "r" / "report.html").read_text()
    assert src.read_bytes() == before
    from auditor.results import AuditResult
    r = AuditResult.load(src)
    assert r.rule_version is None and r.flagged_neurons() and all(n.artifact_tests == [] for n in r.flagged_neurons())
    for n in r.flagged_neurons():
        assert f"neuron {n.index}" in html
    assert "How the flag rule decides" not in html  # the rule 2.0 method text is for 2.x results only


@pytest.mark.parametrize("extra", [[], ["--heldout", "0.5"], ["--min-fraction", "0.05"]],
                         ids=["defaults", "heldout", "min-fraction"])
def test_run_flags_the_planted_detector_under_every_setting(colour_args, extra, capsys):
    """`run` on a real (hand-set) model: the stamp channel and nothing else, whatever the search settings."""
    from auditor.results import AuditResult

    rc = main(["run"] + colour_args + ["--formats", "json,junit", "--bootstrap", "0"] + extra)
    err = capsys.readouterr().err
    assert rc == 1 and "gate failed: fail_on_flag: 1 neuron(s) flagged" in err, err
    out = Path(colour_args[colour_args.index("--out") + 1])
    result = AuditResult.load(out / "results.json")
    flags = {(n.index, f.artifact, f.direction) for n in result.layers[0].neurons for f in n.flags}
    assert flags == {(2, "stamp", "raises")}
    assert result.rule_version == "2.0" and result.calibration["runs"] == 20
