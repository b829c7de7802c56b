"""The training script: a quick smoke run, and (slow) a retrain that reproduces the shortcut."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from auditor.artifacts import get_artifact
from auditor.demo.data import ARTIFACT_CONCEPTS, generate
from auditor.demo.model import DEMO_LAYER, DemoNet, images_to_tensor, load_demo_model
from auditor.demo.train import TrainConfig, main, train


def test_train_cli_writes_loadable_weights(tmp_path, capsys):
    out = tmp_path / "tiny.pt"
    threads = torch.get_num_threads()
    assert main(["--out", str(out), "--epochs", "1", "--n-train", "64", "--n-val", "16", "--n-eval", "16"]) == 0
    assert torch.get_num_threads() == threads  # the script's thread setting does not leak
    printed = capsys.readouterr().out
    for needle in ("val accuracy", "watermarked", "saved"):
        assert needle in printed
    model = load_demo_model(out)
    assert isinstance(model, DemoNet) and not model.training


def test_training_is_deterministic():
    config = TrainConfig(n_train=48, n_val=8, n_eval=8, epochs=1, batch_size=16)
    a, _ = train(config, log=lambda _msg: None)
    b, _ = train(config, log=lambda _msg: None)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


@pytest.mark.slow
def test_retraining_reproduces_the_shortcut():
    """A shorter run than the shipped one (2500 images, 4 epochs: ~40 s) still learns the shortcut."""
    model, metrics = train(TrainConfig(n_train=2500, n_val=200, n_eval=400, epochs=4), log=lambda _msg: None)
    assert metrics["others_clean_accuracy"] > 0.8
    assert metrics["others_clean_to_shortcut"] < 0.05
    assert metrics["others_watermarked_to_shortcut"] - metrics["others_clean_to_shortcut"] > 0.2

    # ... and channels of DEMO_LAYER that watermarks drive, as in test_demo_model.py.
    clean = generate(300, seed=12, artifact_rates={a: 0.0 for a in ARTIFACT_CONCEPTS})
    marked = [get_artifact("watermark")(im, np.random.default_rng([12, i])) for i, im in enumerate(clean.images)]
    captured = []
    handle = model.get_submodule(DEMO_LAYER).register_forward_hook(
        lambda _m, _i, out: captured.append(out.mean(dim=(2, 3)).numpy())
    )
    try:
        with torch.no_grad():
            model(images_to_tensor(clean.images))
            model(images_to_tensor(marked))
    finally:
        handle.remove()
    before, after = captured
    effect = (after - before).mean(0) / (before.std(0) + 1e-6)
    rises = ((after - before) > 0).mean(0)
    assert ((effect > 1.0) & (rises > 0.9)).sum() >= 1, np.round(np.sort(effect)[-5:], 2)
