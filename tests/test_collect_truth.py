"""Activations checked against direct computations where collection used to go silently wrong:
in-place operations after the audited layer, token layers whose batch equals their token count,
modules called more than once, TorchScript models."""

import numpy as np
import pytest
import torch
from torch import nn

from auditor.errors import LayerError, ModelError
from helpers import collect_tensors


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py



def true_outputs(model, module_name, x):
    """Reference: every call's output of one module, copied (``clone``) the moment the module returns."""
    got = []
    module = dict(model.named_modules())[module_name]
    h = module.register_forward_hook(lambda m, i, o: got.append(o.detach().clone()))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        h.remove()
    return [g.numpy() for g in got]


# -- several layers in one pass, with in-place operations after them ---------------------------

@pytest.fixture(scope="module")
def resnet():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    # random BatchNorm statistics, so bn2's output has negative values an in-place ReLU would clip
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


@pytest.fixture(scope="module")
def photos():
    return torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def test_in_place_ops_after_a_layer_do_not_change_it(resnet, photos):
    layers = ["layer1.0.bn2", "layer2"]
    one_pass = collect_tensors(resnet, layers, photos, reduction="mean", batch_size=3).layers
    mx = collect_tensors(resnet, layers, photos, reduction="max", batch_size=3).layers
    bn2 = true_outputs(resnet, "layer1.0.bn2", photos)[0]  # (6, 64, 16, 16)
    layer2 = true_outputs(resnet, "layer2", photos)[0]
    assert np.allclose(one_pass["layer1.0.bn2"].values, bn2.mean(axis=(2, 3)), atol=1e-5)
    assert np.allclose(mx["layer1.0.bn2"].values, bn2.max(axis=(2, 3)), atol=1e-5)
    assert np.allclose(one_pass["layer2"].values, layer2.mean(axis=(2, 3)), atol=1e-5)
    # the maps of the top images are the true (pre-ReLU) maps too: negative values survive
    top = one_pass["layer1.0.bn2"]
    for j in range(3):
        for k in (0, 7, 63):
            assert np.allclose(top.top_maps[j, k], bn2[top.top_index[j, k], k], atol=2e-2)
    assert top.top_maps.min() < -0.1
    # the reference is not trivially equal to what a hook keeping a reference would see
    kept = []
    h = resnet.layer1[0].bn2.register_forward_hook(lambda m, i, o: kept.append(o))
    with torch.no_grad():
        resnet(photos)
    h.remove()
    assert not np.allclose(kept[0].numpy(), bn2, atol=1e-3)  # `out += identity; relu_(out)` changed it


def test_linear_and_token_zero_values_are_copies():
    """A linear layer's (B, D) output and token 0 are views of the output: an in-place op after must not reach them."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(12, 5)
            self.tok = nn.Identity()

        def forward(self, x):
            y = self.fc(x.flatten(1)[:, :12])
            t = self.tok(torch.stack([y, 2 * y, 3 * y], dim=1))  # (B, 3, 5) tokens
            t.mul_(0)  # in place, after both audited layers
            return y.clamp_(min=0)  # in place on the linear output

    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    got = collect_tensors(M().eval(), ["fc", "tok"], x, reduction={"tok": "cls"}, batch_size=4).layers
    with torch.no_grad():
        ref = M().eval().fc(x.flatten(1)[:, :12]).numpy()
    assert ref.min() < 0
    assert np.allclose(got["fc"].values, ref, atol=1e-6)
    assert np.allclose(got["tok"].values, ref, atol=1e-6)


# -- token layout: batch size equal to the token count ----------------------------------------

class Tokens(nn.Module):
    """CLS + a 2×2 (or 7×7) patch grid of tokens, through a sequence-first transformer layer (T, B, D),
    like OpenAI CLIP's ViT. ``seq_first=False`` runs the same weights batch first: the direct reference."""

    def __init__(self, patch: int, seq_first: bool = True, d: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(3, d, kernel_size=patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.block = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=False)
        self.out = nn.Identity()
        self.seq_first = seq_first

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # (B, G, D)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1)  # (B, T, D)
        t = self.block(t.transpose(0, 1))  # (T, B, D)
        if not self.seq_first:
            t = t.transpose(0, 1)
        return self.out(t)


def _reference_tokens(x, patch):
    """(N, T, D) from the same weights, batch first, one image at a time (batch 1: no ambiguity)."""
    model = Tokens(patch, seq_first=False).eval()
    with torch.no_grad():
        return np.concatenate([model(x[i:i + 1]).numpy() for i in range(len(x))])


@pytest.mark.parametrize("n,batch", [(10, 5), (13, 8), (5, 5)])  # every batch = T; the last batch = T; only one
@pytest.mark.parametrize("reduction", ["mean", "max", "cls"])
def test_sequence_first_tokens_with_batch_equal_to_token_count(n, batch, reduction):
    x = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(n))  # 2×2 patches + CLS = 5 tokens
    ref = _reference_tokens(x, 8)
    assert ref.shape == (n, 5, 8)
    got = collect_tensors(Tokens(8).eval(), ["out"], x, reduction=reduction, batch_size=batch, top_k=2).layers["out"]
    want = {"mean": ref.mean(axis=1), "max": ref.max(axis=1), "cls": ref[:, 0]}[reduction]
    assert got.layout == "sequence_first" and got.output_shape == (5, 8)
    assert np.allclose(got.values, want, atol=1e-5)
    for j in range(2):
        for d in range(8):
            img = got.top_index[j, d]
            assert np.allclose(got.top_maps[j, d], ref[img, 1:, d].reshape(2, 2), atol=2e-3)


@pytest.mark.slow
def test_clip_like_50_tokens_with_batches_of_50():
    """OpenAI CLIP ViT-B/32's 50 tokens (CLS + 7×7), sequence first, batches of 50 and a last batch of 50."""
    x = torch.rand(130, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    ref = _reference_tokens(x, 4)
    assert ref.shape[1] == 50
    got = collect_tensors(Tokens(4).eval(), ["out"], x, reduction="mean", batch_size=80, top_k=1).layers["out"]
    assert np.allclose(got.values, ref.mean(axis=1), atol=1e-5)
    got = collect_tensors(Tokens(4).eval(), ["out"], x[:100], reduction="cls", batch_size=50, top_k=1).layers["out"]
    assert np.allclose(got.values, ref[:100, 0], atol=1e-5)


def test_batch_first_tokens_with_batch_equal_to_token_count():
    x = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    ref = _reference_tokens(x, 8)
    got = collect_tensors(Tokens(8, seq_first=False).eval(), ["out"], x, reduction="max", batch_size=5).layers["out"]
    assert got.layout == "batch_first"
    assert np.allclose(got.values, ref.max(axis=1), atol=1e-5)


def test_token_layout_setting_is_used_and_checked():
    x = torch.rand(7, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    ref = _reference_tokens(x, 8)
    got = collect_tensors(Tokens(8).eval(), ["out"], x, reduction="mean", token_layout="sequence_first", batch_size=5)
    assert np.allclose(got.layers["out"].values, ref.mean(axis=1), atol=1e-5)
    with pytest.raises(LayerError, match="gave 5 rows for a batch of 3 images.*token_layout"):
        collect_tensors(Tokens(8).eval(), ["out"], x, reduction="mean", token_layout="batch_first", batch_size=3)
    from auditor.errors import ConfigError
    with pytest.raises(ConfigError, match="unknown token_layout 'tbd'"):
        collect_tensors(Tokens(8).eval(), ["out"], x, token_layout="tbd")


# -- a module called more than once -------------------------------------------------------------

def test_reused_module_calls_are_separate_layers(resnet, photos):
    from torchvision.models.feature_extraction import create_feature_extractor

    from auditor.errors import AuditorWarning

    with pytest.warns(AuditorWarning, match=r"'layer4.1.relu' runs 2 times.*layer4.1.relu_1") as caught:
        got = collect_tensors(resnet, ["layer4.1.relu", "layer4.1.relu_1", "layer4.1"], photos, reduction="mean")
    assert len([w for w in caught if issubclass(w.category, AuditorWarning)]) == 1
    calls = true_outputs(resnet, "layer4.1.relu", photos)
    assert len(calls) == 2
    assert np.allclose(got.layers["layer4.1.relu"].values, calls[0].mean(axis=(2, 3)), atol=1e-5)
    assert np.allclose(got.layers["layer4.1.relu_1"].values, calls[1].mean(axis=(2, 3)), atol=1e-5)
    assert np.allclose(got.layers["layer4.1.relu_1"].values, got.layers["layer4.1"].values, atol=1e-6)
    assert not np.allclose(got.layers["layer4.1.relu"].values, got.layers["layer4.1"].values, atol=1e-3)
    # the same naming as torchvision's feature extractor
    fx = create_feature_extractor(resnet, return_nodes=["layer4.1.relu", "layer4.1.relu_1"])
    with torch.no_grad():
        feats = fx(photos)
    for name in ("layer4.1.relu", "layer4.1.relu_1"):
        assert np.allclose(got.layers[name].values, feats[name].mean(dim=(2, 3)).numpy(), atol=1e-5)
    # the bare name is the first call, with a warning naming the later one
    assert got.layers["layer4.1.relu"].calls == 2
    assert any("'layer4.1.relu' runs 2 times" in w and "layer4.1.relu_1" in w for w in got.warnings)
    assert not any("'layer4.1'" in w for w in got.warnings)


def test_reused_module_warning_survives_the_cache(resnet, photos, tmp_path):
    with pytest.warns(UserWarning, match="runs 2 times"):
        first = collect_tensors(resnet, ["layer1.0.relu"], photos[:3], cache_dir=tmp_path)
    with pytest.warns(UserWarning, match="runs 2 times"):
        again = collect_tensors(resnet, ["layer1.0.relu"], photos[:3], cache_dir=tmp_path)
    assert again.cache["status"] == "hit"
    assert first.warnings == again.warnings and len(again.warnings) == 1


def test_a_call_beyond_the_last_is_an_error(resnet, photos):
    with pytest.raises(LayerError, match=r"call 3 of module 'layer4.1.relu', which runs 2 time\(s\).*layer4.1.relu_1"):
        collect_tensors(resnet, ["layer4.1.relu_2"], photos[:2])
    with pytest.raises(LayerError, match="no layer 'layer4.1.relux_1'"):
        collect_tensors(resnet, ["layer4.1.relux_1"], photos[:2])


def test_layers_command_marks_reused_modules_and_filters(capsys):
    from auditor.cli import main

    assert main(["layers", "resnet18", "layer4.1.relu", "--input-size", "64"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "2 of 75 layers matching 'layer4.1.relu'" in out[0]
    rows = [line.split() for line in out if not line.startswith("#")]
    assert [r[0] for r in rows] == ["layer4.1.relu", "layer4.1.relu_1"]
    assert "runs 2×" in out[-2] and rows[1][2] == "512×2×2"
    assert main(["layers", "resnet18", "layer?.0.conv1", "--input-size", "64"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert names == ["layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1", "layer4.0.conv1"]


# -- TorchScript --------------------------------------------------------------------------------

def _colour():
    from auditor.models import load_model

    from conftest import COLOUR_MODEL
    return load_model(COLOUR_MODEL).module


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_model_layers_are_refused_with_one_line(tmp_path, how):
    from auditor.models import load_model

    m = _colour()
    ts = torch.jit.script(m) if how == "script" else torch.jit.trace(m, torch.rand(1, 3, 8, 8))
    path = tmp_path / f"{how}.pt"
    torch.jit.save(ts, path)
    loaded = load_model(str(path)).module
    with pytest.raises(ModelError) as exc:
        collect_tensors(loaded, ["act"], torch.rand(4, 3, 8, 8))
    msg = str(exc.value)
    assert "\n" not in msg and "TorchScript" in msg and "pass the eager model" in msg


@pytest.mark.parametrize("how", ["script", "trace"])
def test_a_torchscript_submodule_called_from_eager_code_is_captured(how):
    m = _colour()
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = true_outputs(m, "act", x)[0].mean(axis=(2, 3))
    sub = torch.jit.script(m.act) if how == "script" else torch.jit.trace(m.act, torch.rand(1, 4, 8, 8))
    m.act = sub
    got = collect_tensors(m, ["act", "conv"], x, batch_size=4).layers
    assert np.allclose(got["act"].values, ref, atol=1e-6)
    assert m.act is sub and not any(k.startswith("act") for k in dict(m.named_modules()) if k != "act")


def test_run_on_a_torchscript_file_exits_2_with_one_line(tmp_path, colour_probe, capsys):
    from auditor.cli import main

    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(_colour()), path)
    images, labels = colour_probe
    rc = main(["run", "--model", str(path), "--layer", "act", "--images", str(images), "--labels", str(labels),
               "--artifacts", "stamp", "--out", str(tmp_path / "out"), "--device", "cpu", "--no-cache", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    errors = [e for e in err if e.startswith("auditor: error:")]
    assert len(errors) == 1 and "pass the eager model" in errors[0]
    assert not (tmp_path / "out").exists()


# -- fully pickled models -----------------------------------------------------------------------

def test_whole_pickled_model_is_refused_with_a_complete_line(tmp_path, capsys):
    from auditor.cli import main
    from auditor.models import load_model

    from conftest import COLOUR_MODEL
    path = tmp_path / "full.pt"
    torch.save(_colour(), path)
    for args in ([str(path)], [COLOUR_MODEL, str(path)]):
        with pytest.raises(ModelError) as exc:
            load_model(*args)
        msg = str(exc.value)
        assert "\x1b" not in msg and "\n" not in msg and "…" not in msg
        assert "weights_only" in msg and "torch.save(model.state_dict()" in msg and "--weights" in msg
        assert "ColourNet" in msg
    assert main(["layers", COLOUR_MODEL, "--weights", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and err.strip().endswith("--weights weights.pt")


@pytest.mark.slow
def test_run_audits_a_later_call_and_warns_once_about_the_bare_name(colour_args, tmp_path, capsys):
    """`auditor run --layer layer1.0.relu,layer1.0.relu_1` end to end: two layers, one warning line."""
    import json

    from auditor.cli import main

    args = list(colour_args)
    args[args.index("--model") + 1] = "resnet18"
    args[args.index("--layer") + 1] = "layer1.0.relu,layer1.0.relu_1"
    args += ["--resize", "32", "--crop", "32", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25",
             "--formats", "json", "--no-fail-on-flag", "-q"]
    args.remove("--no-normalize")
    assert main(["run"] + args) == 0
    err = capsys.readouterr().err
    assert err.count("'layer1.0.relu' runs 2 times") == 1, err
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [layer["name"] for layer in data["layers"]] == ["layer1.0.relu", "layer1.0.relu_1"]
    assert sum("'layer1.0.relu' runs 2 times" in w for w in data["warnings"]) == 1
    assert data["provenance"]["capture"]["layer1.0.relu_1"]["module_calls"] == 2
