"""`auditor explain`: INVERT on saved activations, the reference's own workflow."""

import json

import numpy as np
import pandas as pd
import pytest

from auditor import invert
from auditor.cli import main


@pytest.fixture()
def saved(tmp_path):
    rng = np.random.default_rng(0)
    N, C, K = 300, 6, 5
    Y = rng.random((N, C)) < 0.2
    A = np.maximum(rng.normal(size=(N, K)), 0)  # ReLU-like, many exact zeros
    A[:, 0] += 3.0 * Y[:, 4]  # neuron 0 detects concept 4 ("wm")
    A[:, 3] = 1.0  # dead neuron
    names = ["a", "b", "c", "d", "wm", "f"]
    np.save(tmp_path / "acts.npy", A.astype(np.float32))
    np.savez(tmp_path / "labels.npz", labels=Y, concepts=np.array(names))
    df = pd.DataFrame(Y.astype(int), columns=names)
    df.insert(0, "path", [f"img_{i}.png" for i in range(N)])
    df.to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path, A.astype(np.float32), Y, names


@pytest.mark.parametrize("labels", ["labels.npz", "labels.csv"])
def test_explain_matches_the_engine(saved, labels, capsys):
    d, A, Y, names = saved
    out = d / f"out-{labels}"
    rc = main(["explain", "--activations", str(d / "acts.npy"), "--labels", str(d / labels),
               "--artifacts", "wm", "--length", "2", "--beam", "3", "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 1, err  # neuron 0 is flagged and explain gates on flags like run (fail_on_flag)
    assert "gate failed: fail_on_flag: 1 neuron(s) flagged" in err
    data = json.loads((out / "results.json").read_text())
    neurons = data["layers"][0]["neurons"]
    # the same defaults as `run` (min_fraction 0.01), and the lowering side searched too
    assert data["config"]["min_fraction"] == 0.01
    ref = invert.explain(A, Y, names, invert.InvertParams(length=2, beam=3, min_fraction=0.01))
    neg = invert.explain(A, Y, names, invert.InvertParams(length=2, beam=3, min_fraction=0.01, mode="negative"))
    for got, want in zip(neurons, neg):
        assert [e["formula"] for e in got["negative_explanations"]] == [f.text for f in want.formulas]
    for got, want in zip(neurons, ref):
        assert got["status"] == want.status
        assert [e["formula"] for e in got["explanations"]] == [f.text for f in want.formulas]
        assert [e["auroc"] for e in got["explanations"]] == pytest.approx([f.auroc for f in want.formulas], abs=1e-12)
    assert neurons[3]["status"] == "dead" and neurons[3]["explanations"] == []
    assert neurons[0]["explanations"][0]["formula"] == "wm" and neurons[0]["flags"][0]["artifact"] == "wm"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["neurons.csv", "results.json"]


def test_explain_renders_a_report_without_images(saved, capsys):
    d, *_ = saved
    out = d / "report"
    rc = main(["explain", "--activations", str(d / "acts.npy"), "--labels", str(d / "labels.npz"),
               "--artifacts", "wm", "--out", str(out), "--formats", "html,json", "--no-fail-on-flag", "-q"])
    assert rc == 0, capsys.readouterr().err
    html = (out / "report.html").read_text()
    assert "neuron 0" in html and "wm" in html


@pytest.mark.parametrize("change, pattern", [
    ("rows", r"labels .* have 299 rows but activations .* have 300"),
    ("ndim", r"must be 2-D \(N images × K neurons\), got shape \(300, 5, 1\)"),
    ("artifact", r"artifact 'w' is not a concept.*did you mean 'wm'"),
])
def test_explain_bad_input_is_exit_2(saved, change, pattern, capsys):
    import re
    d, A, Y, names = saved
    acts, labels, arts = d / "acts.npy", d / "labels.npz", "wm"
    if change == "rows":
        np.savez(d / "short.npz", labels=Y[:-1], concepts=np.array(names))
        labels = d / "short.npz"
    elif change == "ndim":
        np.save(d / "cube.npy", A[:, :, None])
        acts = d / "cube.npy"
    else:
        arts = "w"
    rc = main(["explain", "--activations", str(acts), "--labels", str(labels), "--artifacts", arts,
               "--out", str(d / "bad"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(pattern, err), err
    assert not (d / "bad").exists()
