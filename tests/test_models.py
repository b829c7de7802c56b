import pytest
import torch
from torch import nn

from auditor.errors import LayerError, ModelError
from auditor.models import layer_shapes, load_model, resolve_layer

from conftest import COLOUR_MODEL, DATA


def test_torchvision_name_with_default_preprocessing():
    m = load_model("resnet18")
    assert m.kind == "torchvision"
    assert m.default_preprocessing.crop == 224 and m.default_preprocessing.resize == 256
    assert m.default_preprocessing.mean == pytest.approx((0.485, 0.456, 0.406))
    assert "random" in m.info["warning"]
    assert not m.module.training


def test_file_callable_and_module_callable():
    m = load_model(COLOUR_MODEL)
    assert m.kind == "callable" and type(m.module).__name__ == "ColourNet"
    m2 = load_model("torchvision.models:resnet18")
    assert m2.kind == "callable"


def test_unknown_model_suggests():
    with pytest.raises(ModelError, match=r"unknown model 'resnet81'.*resnet18"):
        load_model("resnet81")
    with pytest.raises(ModelError, match=r"no attribute 'mak'.*'make'"):
        load_model(f"{DATA / 'colour_model.py'}:mak")
    with pytest.raises(ModelError, match="model file not found"):
        load_model("nowhere/model.py:make")


def test_weights_state_dict_and_checkpoint_dict(tmp_path):
    src = load_model(COLOUR_MODEL).module
    with torch.no_grad():
        src.conv.bias.fill_(0.25)
    sd = tmp_path / "sd.pt"
    torch.save(src.state_dict(), sd)
    ck = tmp_path / "ck.pt"
    torch.save({"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, ck)
    for path in (sd, ck):
        m = load_model(COLOUR_MODEL, str(path))
        assert torch.equal(m.module.conv.bias, torch.full((4,), 0.25))
        assert len(m.file_sha256) == 64


def test_checkpoint_for_another_architecture_names_keys(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 8, 3)).state_dict(), path)
    with pytest.raises(ModelError, match=r"do not fit model ColourNet.*missing.*conv.weight.*unexpected.*0.weight"):
        load_model(COLOUR_MODEL, str(path))
    wrong_shape = tmp_path / "shape.pt"
    sd = load_model(COLOUR_MODEL).module.state_dict()
    sd["conv.weight"] = torch.zeros(5, 3, 1, 1)
    torch.save(sd, wrong_shape)
    with pytest.raises(ModelError, match=r"shape mismatch.*conv.weight \(5, 3, 1, 1\) vs model \(4, 3, 1, 1\)"):
        load_model(COLOUR_MODEL, str(wrong_shape))


def test_weights_only_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": object()}, path)
    with pytest.raises(ModelError, match="weights_only=True"):
        load_model(COLOUR_MODEL, str(path))


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="cannot load weights"):
        load_model(COLOUR_MODEL, str(path))


def test_torchscript(tmp_path):
    m = load_model(COLOUR_MODEL).module
    path = tmp_path / "m.ts"
    torch.jit.save(torch.jit.script(m), path)
    loaded = load_model(str(path))
    assert loaded.kind == "torchscript" and loaded.file_sha256
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(loaded.module(x), m(x))


def test_resolve_layer_suggests_and_points_to_layers_command():
    m = load_model("resnet18").module
    assert isinstance(resolve_layer(m, "layer4.1.conv2"), nn.Conv2d)
    with pytest.raises(LayerError, match=r"no layer 'layer4.1.conv3'.*layer4.1.conv2.*auditor layers"):
        resolve_layer(m, "layer4.1.conv3")


def test_layer_shapes_restores_mode_and_removes_hooks():
    m = load_model(COLOUR_MODEL).module
    m.train()
    rows = {r.name: r.shape for r in layer_shapes(m, torch.zeros(1, 3, 8, 8))}
    assert rows["act"] == (4, 8, 8) and rows["head"] == (2,)
    assert m.training
    assert all(not mod._forward_hooks for mod in m.modules())
