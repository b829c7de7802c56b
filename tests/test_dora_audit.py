"""DORA inside the audit: run_audit runs it after the explanations when the config has a
``dora:`` section, keeps s-AMS only for flagged and outlier neurons, gives outliers top
probe images, and the report shows both (the hand-set colour model, small and quick)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from auditor.cli import main
from auditor.results import AuditResult

DORA = "{size: 16, steps: 4, signals: 2, contamination: 0.25}"


@pytest.fixture()
def dora_run(colour_args, capsys):
    args = colour_args + ["--formats", "json,html", "--dora", DORA, "-q"]
    rc = main(["run"] + args)
    err = capsys.readouterr().err
    out = Path(args[args.index("--out") + 1])
    return rc, err, out


@pytest.mark.slow
def test_audit_with_dora_results_and_report(dora_run):
    rc, err, out = dora_run
    assert rc == 1, err
    result = AuditResult.load(out / "results.json")
    assert result.dora is not None and result.config["dora"]["steps"] == 4
    layer = result.dora.layers[0]
    assert layer.name == "act" and layer.n_neurons == 4 and len(layer.outliers) == 1
    flagged = {n.index for n in result.layers[0].neurons if n.flags}
    assert flagged == {2}
    keep = flagged | set(layer.outliers)
    for n in layer.neurons:
        assert (len(n.sams) == 2) == (n.index in keep), n.index  # images only where the report shows them
        assert all(s.startswith("data:image/png;base64,") for s in n.sams)
    by_index = {n.index: n for n in result.layers[0].neurons}
    for k in layer.outliers:
        assert by_index[k].top_images, "outliers get their top probe images"
    assert "dora_s" in result.provenance["timings"]
    html = (out / "report.html").read_text()
    assert 'id="dora"' in html and "Unnamed outliers (DORA)" in html
    assert "Synthetic images that maximise it (s-AMS, DORA)" in html  # on the flagged neuron's card
    assert len(re.findall(r'alt="s-AMS', html)) >= 2
    assert "an outlier is a neuron to look at, not a finding" in html.lower()


@pytest.mark.slow
def test_report_without_dora_has_no_dora_section(colour_args, capsys):
    args = colour_args + ["--formats", "html", "-q"]
    main(["run"] + args)
    html = (Path(args[args.index("--out") + 1]) / "report.html").read_text()
    assert 'id="dora"' not in html and "s-AMS" not in html


@pytest.mark.slow
@pytest.mark.parametrize("as_pil", [False, True])
def test_api_with_a_dataset_runs_dora_at_the_images_size(colour_probe, tmp_path, as_pil):
    import sys

    import auditor

    sys.path.insert(0, str(Path(__file__).parent))
    from test_api import LabelledImages

    sys.path.insert(0, str(Path(__file__).parent / "data"))
    from colour_model import ColourNet

    images, labels = colour_probe
    data = LabelledImages(images, labels, as_pil=as_pil)
    model = ColourNet().train()
    result = auditor.audit(model, layer="act", images=data, concepts=data.concepts, artifacts=["stamp"],
                           device="cpu", cache_dir=str(tmp_path / "cache"), bootstrap=0,
                           dora={"steps": 2, "signals": 1, "contamination": 0.25})
    assert result.dora is not None and result.dora.params["size"] == 32  # the probe images' side
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_report_marks_neurons_flagged_by_both_as_strongest_evidence():
    """Rendering only (no model): neuron 3 is INVERT-flagged and a DORA outlier; neuron 6 an unnamed outlier."""
    import dataclasses
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from report_fixtures import make_result, thumbnail

    from auditor.report import render_html
    from auditor.results import DoraLayer, DoraNeuron, DoraResult

    result = make_result(n_neurons=10, second_layer=False)
    layer = result.layers[0]
    flagged = {n.index for n in layer.neurons if n.flags}
    assert 3 in flagged and 6 not in flagged
    png = thumbnail(1).replace("image/jpeg", "image/png")
    neurons = [DoraNeuron(index=k, score=3.0 if k in (3, 6) else 1.0, rank={3: 1, 6: 2}.get(k, k + 3),
                          outlier=k in (3, 6), x=float(k), y=0.0, self_activation=1.0,
                          sams=[png] if k in flagged | {3, 6} else []) for k in range(10)]
    dora = DoraResult(distance="pairwise", method="lof", params={"signals": 1, "steps": 90, "size": 64, "seed": 0},
                      layers=[DoraLayer(name=layer.name, reduction="mean", n_neurons=10, outliers=[3, 6],
                                        neurons=neurons, threshold=1.5, n_neighbors=4)])
    html = render_html(dataclasses.replace(result, dora=dora))
    section = html[html.index('id="dora"'):]
    section = section[:section.index("</section>")]
    assert "INVERT + DORA" in section and "<strong>3</strong>" in section
    assert "unnamed" in section  # neuron 6: an outlier whose best formula names no artifact
    assert html.count("flagged by INVERT and DORA") == 1  # on neuron 3's card only
    assert html.count("not a DORA outlier") == len(flagged) - 1
