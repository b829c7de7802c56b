"""End to end on a model the demo has never seen: the hand-set colour model, whose
channel 2 detects a planted magenta "stamp" artifact (see tests/data/colour_model.py)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from auditor.cli import main
from auditor.results import AuditResult


def _brute_auroc(a, y):
    pos, neg = a[y], a[~y]
    gt = (pos[:, None] > neg[None, :]).sum()
    eq = (pos[:, None] == neg[None, :]).sum()
    return (gt + 0.5 * eq) / (len(pos) * len(neg))


@pytest.fixture()
def colour_run(colour_args, capsys):
    args = colour_args + ["--formats", "json,csv,junit"]
    rc = main(["run"] + args)
    err = capsys.readouterr().err
    out = Path(args[args.index("--out") + 1])
    return rc, err, out, args


def test_planted_artifact_neuron_is_flagged_and_others_are_not(colour_run):
    rc, err, out, _ = colour_run
    assert rc == 1, err  # fail_on_flag is on by default for run
    result = AuditResult.load(out / "results.json")
    neurons = result.layers[0].neurons
    assert [n.index for n in neurons if n.flags] == [2]
    flag = neurons[2].flags[0]
    assert flag.artifact == "stamp" and flag.branch == "formula" and flag.direction == "raises"
    assert flag.artifact_auroc >= 0.95 and flag.p_adjusted < 1e-6 and flag.effect >= 0.9
    assert neurons[2].explanations[0].formula.startswith("stamp")
    for k, colour in ((0, "red"), (1, "green"), (3, "blue")):
        assert neurons[k].explanations[0].formula == colour
        assert not neurons[k].flags and neurons[k].test("stamp").status != "flagged"
    assert "stamp: 1 neuron(s) flagged (act#2)" in err
    assert "gate failed: fail_on_flag: 1 neuron(s) flagged" in err


def test_reported_numbers_match_independent_computation(colour_run, colour_probe):
    _, _, out, _ = colour_run
    result = AuditResult.load(out / "results.json")
    images, labels = colour_probe
    rows = list(csv.DictReader(open(labels)))
    from PIL import Image
    acts = []
    for row in rows:
        x = np.asarray(Image.open(images / row["path"]).convert("RGB"), dtype=np.float64) / 255.0
        r, g, b = x[..., 0], x[..., 1], x[..., 2]
        acts.append(np.maximum(r + b - 2 * g - 1, 0).mean())
    a = np.array(acts)
    stamp = np.array([row["stamp"] == "1" for row in rows])
    n2 = result.layers[0].neurons[2]
    assert n2.artifact_auroc["stamp"] == pytest.approx(_brute_auroc(a, stamp), abs=1e-9)
    from scipy.stats import mannwhitneyu
    best = n2.explanations[0]
    # the formula's images, evaluated here from the labels CSV (whatever formula the search chose)
    columns = {c: np.array([row[c] == "1" for row in rows]) for c in rows[0] if c != "path"}
    expr = best.formula.replace(" AND NOT ", " & ~").replace(" OR NOT ", " | ~").replace(" AND ", " & ")
    expr = expr.replace(" OR ", " | ").replace("NOT ", "~")
    mask = eval(expr, {"__builtins__": {}}, columns)
    assert best.formula.startswith("stamp") and mask.sum() > 0
    assert best.support == mask.sum()
    assert best.p_value == pytest.approx(mannwhitneyu(a[mask], a[~mask]).pvalue, rel=1e-6)
    lo, hi = best.auroc_ci
    assert lo <= best.auroc <= hi or best.auroc == pytest.approx(hi)


def test_outputs_and_schema(colour_run):
    _, _, out, args = colour_run
    assert sorted(p.name for p in out.iterdir()) == [".auditor", ".auditor-manifest.json", "junit.xml", "neurons.csv",
                                                     "results.json"]
    manifest = json.loads((out / ".auditor-manifest.json").read_text())
    assert sorted(manifest["files"]) == ["junit.xml", "neurons.csv", "results.json"]
    data = json.loads((out / "results.json").read_text())
    assert data["schema_version"] == "2.0" and data["rule_version"] == "2.0"
    assert data["calibration"]["runs"] == 20 and len(data["calibration"]["flags_per_run"]) == 20
    for key in ("concepts", "artifacts", "config", "provenance", "layers", "thresholds"):
        assert key in data
    prov = data["provenance"]
    assert len(prov["data"]["fingerprint"]) == 64 and prov["device"] == "cpu"
    assert prov["preprocessing"]["mean"] is None and "normalisation off" in prov["preprocessing"]["source"]
    assert {"torch", "numpy", "auditor"} <= set(prov["packages"])
    assert prov["timings"]["total_s"] > 0
    neuron = data["layers"][0]["neurons"][2]
    for key in ("index", "status", "explanations", "artifact_auroc", "flags"):
        assert key in neuron
    expl = neuron["explanations"][0]
    for key in ("formula", "length", "auroc", "fraction", "support", "p_value", "p_adjusted"):
        assert key in expl
    assert {"artifact", "rule", "reason", "branch", "direction", "effect", "p_adjusted"} <= set(neuron["flags"][0])
    for n in data["layers"][0]["neurons"]:  # every pair's numbers are stored
        (t,) = n["artifact_tests"]
        assert t["artifact"] == "stamp" and t["status"] in ("flagged", "near_miss", "inconclusive", "clean")
        assert {"branch", "direction", "effect", "effect_ci", "p_value", "p_adjusted", "n_artifact",
                "reason"} <= set(t)
    rows = list(csv.DictReader(open(out / "neurons.csv")))
    assert len(rows) == 4
    # One run folder (the published one), nothing else; the cache is outside --out.
    assert len(list((out / ".auditor" / "runs").iterdir())) == 1


def test_no_fail_on_flag_and_cache_reuse(colour_args, capsys):
    args = colour_args + ["--formats", "json", "--no-fail-on-flag"]
    assert main(["run"] + args) == 0
    capsys.readouterr()
    assert main(["run"] + args) == 0
    assert "activation cache hit" in capsys.readouterr().err


def test_yaml_config_with_flag_override(colour_args, tmp_path, capsys):
    opts = dict(zip(colour_args[::2], colour_args[1::2])) if False else None
    cfg = tmp_path / "audit.yaml"
    a = colour_args
    get = lambda f: a[a.index(f) + 1]
    cfg.write_text(
        f"model: {get('--model')}\nlayer: act\nimages: {get('--images')}\nlabels: {get('--labels')}\n"
        f"artifacts: [stamp]\nnormalize: false\ncache_dir: {get('--cache-dir')}\nout: {get('--out')}\n"
        "beam: 2\nlength: 2\nformats: [json]\n")
    rc = main(["run", str(cfg), "--beam", "3", "--no-fail-on-flag"])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((Path(get("--out")) / "results.json").read_text())
    assert data["config"]["beam"] == 3 and data["config"]["length"] == 2
    assert all(len(n["explanations"]) <= 3 for n in data["layers"][0]["neurons"])


# -- preprocessing decisions the user did not state are said out loud ----------------------------

def test_preprocessing_notes_against_the_probe_images(colour_probe):
    from auditor.config import make_config
    from auditor.data import load_probe_set
    from auditor.models import Preprocessing
    from auditor.pipeline import preprocessing_notes, resolve_preprocessing

    images, labels = colour_probe  # 160 images of 32×32 px
    probe = load_probe_set(images, labels)
    tv = Preprocessing(resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                       source="torchvision:resnet18 default weights transforms")
    base = {"model": "resnet18", "layer": "layer4", "images": str(images), "labels": str(labels)}

    def notes(default, **given):
        cfg = make_config(base | given)
        return preprocessing_notes(cfg, resolve_preprocessing(cfg, default), default, probe)

    said, found = notes(tv)
    assert any(n.startswith("normalisation assumed from torchvision:resnet18") for n in said)
    assert any(n.startswith("resize 256 and centre crop 224 assumed") for n in said)
    assert any(n.startswith("160 of the probe images are smaller than the model input (shortest side 32 px)")
               and "resized up to 256" in n for n in said)
    assert found == {"images_checked": 160, "images_enlarged": 160, "smallest_side": 32}
    said, found = notes(tv, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize=32, crop=32)
    assert said == [] and found["images_enlarged"] == 0  # everything stated, nothing enlarged
    said, found = notes(Preprocessing(crop=48, source="a crop-only model"), normalize=False)
    assert said[0] == "centre crop 48 assumed from a crop-only model; pass --resize/--crop to change them"
    assert "padded to the 48 px centre crop" in said[1] and found["images_enlarged"] == 160
    none = Preprocessing(source="none given (model takes [0, 1] RGB unless --mean/--std)")
    said, found = notes(none)
    assert len(said) == 1 and said[0].startswith("no normalisation") and found == {}
    assert notes(none, normalize=False)[0] == []  # [0, 1] confirmed by --no-normalize


def test_unstated_normalisation_is_on_stderr_and_in_the_results(colour_args, capsys):
    args = [a for a in colour_args if a != "--no-normalize"] + ["--formats", "json"]
    main(["run"] + args)
    err = capsys.readouterr().err
    assert "auditor: warning: no normalisation: neither --mean/--std nor the model" in err
    out = Path(args[args.index("--out") + 1])
    result = AuditResult.load(out / "results.json")
    assert any(w.startswith("no normalisation") for w in result.warnings)
    assert result.provenance["preprocessing"]["notes"][0].startswith("no normalisation")


def test_capture_details_are_in_the_provenance(colour_run):
    _, _, out, _ = colour_run
    prov = json.loads((out / "results.json").read_text())["provenance"]
    assert prov["capture"] == {"act": {"kind": "spatial", "layout": "batch_first", "module_calls": 1}}
