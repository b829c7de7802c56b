"""The embedded demo, audited end to end: the neurons that detect the watermark are
flagged, and every flag is backed by an effect measured without the audit."""

import numpy as np
import pytest

from auditor.artifacts import get_artifact
from auditor.demo.data import generate
from auditor.demo.model import (DEMO_IMAGE_SIZE, DEMO_LAYER, DEMO_WATERMARK_CHANNELS, images_to_tensor,
                                layer_means, load_demo_model)

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


def test_demo_flags_the_watermark_channels(demo_audit, watermark_effect):
    result, out, written = demo_audit
    layer = result.layers[0]
    assert layer.name == DEMO_LAYER
    flagged = {n.index for n in layer.neurons if any(f.artifact == "watermark" for f in n.flags)}
    assert set(DEMO_WATERMARK_CHANNELS) <= flagged
    # every flagged neuron really responds to watermarks (measured by pasting them), and no
    # neuron is flagged for text, which the model was never rewarded for
    assert all(watermark_effect[k] > 0.2 for k in flagged), {k: watermark_effect[k] for k in flagged}
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
