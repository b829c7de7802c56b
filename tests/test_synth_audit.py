"""End to end without the pipeline: synthesise magenta watermarks onto the colour probe set,
load it, collect the hand-set colour model's activations, and measure the paired effect.

Channel 2 of the colour model is ReLU(R + B - 2G - 1): it fires on magenta pixels only, so a
magenta watermark must raise it on every pair, while the background channels do not rise.
"""

import numpy as np
import pytest

from auditor.collect import build_transform, collect
from auditor.data import check_artifacts, load_probe_set
from auditor.models import Preprocessing, load_model
from auditor.paired import neuron_paired, paired_effects, paired_effects_by_artifact
from auditor.synth import synthesise

from conftest import COLOUR_MODEL, make_colour_probe

pytestmark = pytest.mark.slow  # torch import and a model pass: ~10-20 s on a small CPU


@pytest.fixture(scope="module")
def synthesised(tmp_path_factory):
    base = tmp_path_factory.mktemp("synth-audit")
    images, labels = make_colour_probe(base, n=48, seed=3)
    made = synthesise(images, labels, base / "synth", artifacts=["watermark"], fraction=0.5, seed=0,
                      params={"watermark": {"color": [255, 0, 255], "opacity": 0.95, "tiled": True,
                                            "scale": 0.6}})
    return images, labels, made


def test_paired_effect_of_synthesised_watermark(synthesised, tmp_path):
    _, _, made = synthesised
    probe = load_probe_set(made.images, made.labels)
    check_artifacts(probe, ["watermark"])
    pairs = probe.pairs["watermark"]
    assert pairs.shape == (24, 2)
    for clean, copy in pairs:
        assert probe.paths[clean].startswith("clean/") and probe.paths[copy].startswith("watermark/")
        assert probe.paths[clean][len("clean/"):] == probe.paths[copy][len("watermark/"):]

    loaded = load_model(COLOUR_MODEL)
    _, transform = build_transform(Preprocessing(), normalize=False)
    got = collect(loaded.module, ["act"], probe, transform=transform, transform_desc={}, model_hash="colour",
                  device="cpu", top_k=0, cache_dir=None, progress=False)
    A = got.layers["act"].values.astype(np.float64)
    assert got.ok.all()

    eff = paired_effects(A, pairs, clean_rows=probe.clean_rows)
    assert eff["n_pairs"].tolist() == [24] * 4
    # the magenta detector rises on every pair, strongly and significantly
    assert eff["frac_rise"][2] == 1.0
    assert eff["mean_diff_sd"][2] > 1.0
    assert eff["wilcoxon_p"][2] < 1e-4
    # the background-colour channels do not rise (a covering watermark only takes colour away)
    assert (eff["frac_rise"][[0, 1, 3]] < 0.5).all()

    rec = neuron_paired(paired_effects_by_artifact(A, probe.pairs, ["watermark"], probe.clean_rows), 2)
    assert rec["watermark"]["n_pairs"] == 24 and rec["watermark"]["frac_rise"] == 1.0

    # the correlational view is weaker: clean images with a magenta 'stamp' also fire channel 2,
    # so the AUROC of the watermark column is high but well short of the paired evidence
    from auditor import invert

    auc = invert.auroc(A, probe.dense_columns(["watermark"]))
    assert 0.75 < auc[2, 0] < 1.0


def test_run_with_synth_section_reports_paired_effect_and_flags(tmp_path, capsys):
    """`auditor run` with a `synth:` section: copies go to the cache, the stamp-like magenta
    watermark neuron is flagged, and the paired effect lands in results.json."""
    from auditor.cli import main
    from auditor.results import AuditResult

    images, labels = make_colour_probe(tmp_path / "probe", n=128, seed=5)
    before = sorted(p.relative_to(images) for p in images.rglob("*"))
    cfg = tmp_path / "audit.yaml"
    cfg.write_text(
        f"model: {COLOUR_MODEL}\nlayer: act\nimages: {images}\nlabels: {labels}\nnormalize: false\n"
        f"cache_dir: {tmp_path / 'cache'}\nout: {tmp_path / 'out'}\nformats: [json]\nbootstrap: 50\nmin_fraction: 0.05\n"
        "synth:\n  artifacts: [watermark]\n  fraction: 0.5\n  seed: 0\n"
        "  params: {watermark: {color: [255, 0, 255], opacity: 0.95, tiled: true, scale: 0.6}}\n")
    rc = main(["run", str(cfg), "-q"])
    err = capsys.readouterr().err
    assert rc == 1, err
    result = AuditResult.load(tmp_path / "out" / "results.json")
    assert result.artifacts == ["watermark"]
    n2 = result.layers[0].neurons[2]
    assert [f.artifact for f in n2.flags] == ["watermark"]
    assert n2.paired["watermark"]["n_pairs"] == 64 and n2.paired["watermark"]["frac_rise"] == 1.0
    assert n2.paired["watermark"]["wilcoxon_p"] < 1e-4
    assert result.provenance["data"]["synth"]["counts"] == {"watermark": 64}
    assert str(tmp_path / "cache") in result.provenance["data"]["synth"]["dir"]
    # nothing the user gave was modified
    assert sorted(p.relative_to(images) for p in images.rglob("*")) == before
