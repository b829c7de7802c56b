"""Models as people store them: .safetensors weights (no pickle) and timm: architectures
with timm's own preprocessing config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from auditor.cli import main
from auditor.errors import ModelError
from auditor.models import load_model

DATA = Path(__file__).parent / "data"
SPEC = f"{DATA / 'colour_model.py'}:make"


def _scrambled_state():
    from importlib import util

    spec = util.spec_from_file_location("cm", DATA / "colour_model.py")
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    m = mod.ColourNet()
    with torch.no_grad():
        m.conv.weight.mul_(-1.0)
    return m.state_dict()


def test_safetensors_weights_load_exactly(tmp_path):
    state = _scrambled_state()
    save_file(state, str(tmp_path / "w.safetensors"))
    loaded = load_model(SPEC, str(tmp_path / "w.safetensors"))
    for k, v in loaded.module.state_dict().items():
        assert torch.equal(v, state[k]), k
    import hashlib

    assert loaded.file_sha256 == hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()
    # truncated (still being written) or for another architecture: one-line errors
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cannot read safetensors file .*cut.safetensors"):
        load_model(SPEC, str(tmp_path / "cut.safetensors"))
    save_file({"other": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError, match="missing 4: .*unexpected 1: other"):
        load_model(SPEC, str(tmp_path / "other.safetensors"))


def test_audit_with_safetensors_equals_audit_with_pt(colour_args, tmp_path, capsys):
    state = _scrambled_state()
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    outs = []
    for name in ("w.safetensors", "w.pt"):
        out = tmp_path / f"out-{name}"
        args = [a if a != str(tmp_path / "out") else str(out) for a in colour_args]
        assert main(["run", *args, "--weights", str(tmp_path / name), "--formats", "json", "-q",
                     "--no-fail-on-flag"]) == 0
        outs.append(json.loads((out / "results.json").read_text()))
    assert outs[0]["layers"] == outs[1]["layers"]
    # a truncated file through the CLI: exit 2, one line
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:100])
    assert main(["run", *colour_args, "--weights", str(tmp_path / "cut.safetensors"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("auditor: error: cannot read safetensors file")


def test_timm_model_with_its_preprocessing(tmp_path):
    timm = pytest.importorskip("timm")
    import timm.data

    from auditor.collect import build_transform

    loaded = load_model("timm:resnet18")
    assert loaded.kind == "timm" and loaded.info["warning"].startswith("no --weights")
    ref_model = timm.create_model("resnet18", pretrained=False)
    assert loaded.n_parameters == sum(p.numel() for p in ref_model.parameters())
    cfg = timm.data.resolve_data_config({}, model=ref_model)
    pre = loaded.default_preprocessing
    assert pre.crop == cfg["input_size"][-1] and pre.interpolation == cfg["interpolation"] == "bicubic"
    assert pre.mean == pytest.approx(cfg["mean"]) and pre.std == pytest.approx(cfg["std"])
    # our transform equals timm's own eval transform on an image
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 260, 3), dtype=np.uint8))
    _, ours = build_transform(pre, True)
    theirs = timm.data.create_transform(**cfg, is_training=False)
    assert torch.allclose(ours(img), theirs(img), atol=1e-5)
    # the same seeded random weights every time (reproducible random-weight audits)
    again = load_model("timm:resnet18")
    assert all(torch.equal(a, b) for a, b in zip(loaded.module.state_dict().values(),
                                                 again.module.state_dict().values()))
    with pytest.raises(ModelError, match="unknown timm architecture 'resnet181'.*did you mean"):
        load_model("timm:resnet181")
    with pytest.raises(ModelError, match="needs an architecture name"):
        load_model("timm:")


def test_layers_command_on_timm(capsys):
    pytest.importorskip("timm")
    assert main(["layers", "timm:resnet18"]) == 0
    out = capsys.readouterr().out
    assert "layer4.1.conv2" in out and "512×7×7" in out
