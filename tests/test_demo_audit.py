"""The embedded demo, audited end to end: the neurons that detect the watermark are
flagged, and every flag is backed by an effect measured without the audit: a paired
pasting test (each artifact pasted onto the same clean images, Wilcoxon signed-rank,
Benjamini-Hochberg over the channels)."""

import numpy as np
import pytest

from auditor.artifacts import get_artifact
from auditor.demo.data import generate
from auditor.demo.model import (DEMO_ARTIFACTS, DEMO_IMAGE_SIZE, DEMO_LAYER, DEMO_WATERMARK_CHANNELS,
                                images_to_tensor, layer_means, load_demo_model)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def watermark_effect():
    """Per channel: mean change (in clean SDs) when a watermark is pasted on clean images."""
    model = load_demo_model()
    clean = generate(300, seed=99, image_size=DEMO_IMAGE_SIZE,
                     artifact_rates={a: 0.0 for a in ("watermark", "text", "border", "timestamp")})
    gen = get_artifact("watermark")
    marked = [gen(im, np.random.default_rng([7, i])) for i, im in enumerate(clean.images)]
    c = layer_means(model, images_to_tensor(clean.images)).numpy()
    w = layer_means(model, images_to_tensor(marked)).numpy()
    return (w - c).mean(axis=0) / (c.std(axis=0) + 1e-6)


@pytest.fixture(scope="module")
def pasting():
    """Per artifact: (mean change in clean SDs, BH-adjusted two-sided Wilcoxon p) per channel, from the
    artifact pasted onto 300 clean images the audit never saw (scipy only, none of the audit's code)."""
    from scipy import stats

    model = load_demo_model()
    clean = generate(300, seed=99, image_size=DEMO_IMAGE_SIZE, artifact_rates={a: 0.0 for a in DEMO_ARTIFACTS})
    c = layer_means(model, images_to_tensor(clean.images)).numpy().astype(np.float64)
    out = {}
    for art in DEMO_ARTIFACTS:
        gen = get_artifact(art)
        marked = [gen(im, np.random.default_rng([11, i])) for i, im in enumerate(clean.images)]
        D = layer_means(model, images_to_tensor(marked)).numpy().astype(np.float64) - c
        p = np.array([stats.wilcoxon(D[:, k]).pvalue if (D[:, k] != 0).any() else 1.0 for k in range(D.shape[1])])
        out[art] = (D.mean(axis=0) / (c.std(axis=0) + 1e-12), stats.false_discovery_control(p))
    return out


def test_demo_flags_every_channel_pasting_shows_responding(demo_audit, pasting):
    result, *_ = demo_audit
    layer = result.layers[0]
    change, p_adj = pasting["watermark"]
    responding = {k for k in range(len(layer.neurons)) if p_adj[k] <= 0.01 and abs(change[k]) >= 0.5}
    assert set(DEMO_WATERMARK_CHANNELS) <= responding  # the planted detectors respond
    flagged = {n.index for n in layer.neurons if any(f.artifact == "watermark" for f in n.flags)}
    assert responding <= flagged, {k: (change[k], layer.neurons[k].test("watermark").reason)
                                   for k in responding - flagged}


def test_demo_every_flag_is_confirmed_by_pasting_in_its_direction(demo_audit, pasting):
    result, *_ = demo_audit
    n_flags = 0
    for n in result.layers[0].neurons:
        for f in n.flags:
            change, p_adj = pasting[f.artifact]
            sign = 1 if f.direction == "raises" else -1
            assert p_adj[n.index] <= 0.01 and sign * change[n.index] > 0, (n.index, f.artifact, f.direction,
                                                                          change[n.index], p_adj[n.index])
            n_flags += 1
    assert n_flags and result.calibration["runs"] == 20
    assert result.calibration["max_flags"] < n_flags


def test_demo_flags_the_watermark_channels(demo_audit, watermark_effect):
    result, out, written = demo_audit
    layer = result.layers[0]
    assert layer.name == DEMO_LAYER
    flagged = {n.index for n in layer.neurons if any(f.artifact == "watermark" for f in n.flags)}
    assert set(DEMO_WATERMARK_CHANNELS) <= flagged
    # every flagged neuron really responds to watermarks (measured by pasting them; the direction is
    # checked above), and no neuron is flagged for text, which the model was never rewarded for
    assert all(abs(watermark_effect[k]) > 0.2 for k in flagged), {k: watermark_effect[k] for k in flagged}
    assert not any(f.artifact == "text" for n in layer.neurons for f in n.flags)
    # the strongest non-flagged neurons do not respond to watermarks like the flagged ones do
    unflagged = [k for k in range(len(layer.neurons)) if k not in flagged]
    assert max(watermark_effect[unflagged]) < min(watermark_effect[list(DEMO_WATERMARK_CHANNELS)])


def test_demo_writes_every_output(demo_audit):
    result, out, written = demo_audit
    visible = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert visible == {"report.html", "report.pdf", "results.json", "neurons.csv", "junit.xml"}
    html = (out / "report.html").read_text()
    for k in DEMO_WATERMARK_CHANNELS:
        assert f"neuron {k}" in html
    flagged = [n for n in result.layers[0].neurons if n.flags]
    assert all(n.top_images and n.distribution and n.explanations[0].auroc_ci for n in flagged)
    assert any(img.artifacts for n in flagged for img in n.top_images)
