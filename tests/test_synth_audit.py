"""End to end without the pipeline: synthesise magenta watermarks onto the colour probe set,
load it, collect the hand-set colour model's activations, and measure the paired effect.

Channel 2 of the colour model is ReLU(R + B - 2G - 1): it fires on magenta pixels only, so a
magenta watermark must raise it on every pair, while the background channels do not rise.
"""

import numpy as np
import pytest

from auditor.activations import build_transform, collect
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
