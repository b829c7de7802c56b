"""Any layer shape: conv (B, C, H, W), transformer tokens (B, T, D), linear (B, D)."""

import numpy as np
import pytest
import torch
from torch import nn

from auditor.collect import REDUCTIONS, patch_grid, reduce_output, register_reduction
from auditor.errors import ConfigError, LayerError
from helpers import collect_tensors


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py



def _outputs(model, layer, x):
    """Reference: the layer's full output, copied (``clone``) by a plain forward hook the moment it returns."""
    got = {}

    def keep(_m, _i, o):
        got.setdefault("o", (o[0] if isinstance(o, tuple) else o).detach().clone())
    h = dict(model.named_modules())[layer].register_forward_hook(keep)
    with torch.no_grad():
        model(x)
    h.remove()
    return got["o"].numpy()


def tiny_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                             mlp_dim=32, num_classes=5).eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("reduction", ["cls", "mean", "max"])
def test_vit_token_reductions(images, reduction):
    model = tiny_vit()
    layer = "encoder.layers.encoder_layer_1"
    got = collect_tensors(model, [layer], images, reduction=reduction).layers[layer]
    out = _outputs(model, layer, images)  # (B, 17, 16): CLS + 4×4 patches
    ref = {"cls": out[:, 0, :], "mean": out.mean(axis=1), "max": out.max(axis=1)}[reduction]
    assert got.kind == "tokens" and got.reduction == reduction
    assert got.output_shape == (17, 16)
    assert np.allclose(got.values, ref, atol=1e-5)
    # top-k per neuron and the patch-token maps laid out on the 4×4 grid (CLS dropped)
    assert got.top_maps.shape == (3, 16, 4, 4)
    for d in range(16):
        order = np.lexsort((np.arange(len(ref)), -ref[:, d]))[:3]
        assert list(got.top_index[:, d]) == list(order)
        for j, img in enumerate(order):
            assert np.allclose(got.top_maps[j, d], out[img, 1:, d].reshape(4, 4), atol=2e-3)  # float16 maps


def test_linear_and_conv_in_one_pass(images):
    model = tiny_vit()
    layers = ["conv_proj", "heads.head", "encoder.layers.encoder_layer_0"]
    got = collect_tensors(model, layers, images, reduction={"encoder.layers.encoder_layer_0": "cls"}).layers
    conv = _outputs(model, "conv_proj", images)  # (B, 16, 4, 4)
    assert got["conv_proj"].kind == "spatial" and got["conv_proj"].reduction == "mean"
    assert np.allclose(got["conv_proj"].values, conv.mean(axis=(2, 3)), atol=1e-5)
    assert got["conv_proj"].top_maps.shape == (3, 16, 4, 4)
    head = _outputs(model, "heads.head", images)
    assert got["heads.head"].kind == "linear" and got["heads.head"].top_maps is None
    assert np.allclose(got["heads.head"].values, head, atol=1e-5)
    with torch.no_grad():
        logits = model(images).numpy()
    assert np.allclose(got["heads.head"].values, logits, atol=1e-5)
    assert np.allclose(got["encoder.layers.encoder_layer_0"].values,
                       _outputs(model, "encoder.layers.encoder_layer_0", images)[:, 0], atol=1e-5)


def test_cls_on_a_conv_layer_is_refused(images):
    with pytest.raises(LayerError, match=r"reduction 'cls' does not apply to layer 'conv_proj'.*\['max', 'mean'\]"):
        collect_tensors(tiny_vit(), ["conv_proj"], images, reduction="cls")


def test_reduction_mapping_is_validated(images):
    with pytest.raises(ConfigError, match="not among the audited layers"):
        collect_tensors(tiny_vit(), ["conv_proj"], images, reduction={"nope": "max"})
    with pytest.raises(ConfigError, match="unknown reduction 'median'"):
        collect_tensors(tiny_vit(), ["conv_proj"], images, reduction="median")


class SeqFirst(nn.Module):
    """Tokens (B, T, D) from a 4×4 conv grid plus a mean 'CLS' token; ``seq_first`` emits (T, B, D)."""

    def __init__(self, seq_first: bool):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, kernel_size=8, stride=8)
        self.tokens = nn.Identity()
        self.seq_first = seq_first

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)  # (B, 16, 6)
        t = torch.cat([t.mean(dim=1, keepdim=True), t], dim=1)  # (B, 17, 6)
        if self.seq_first:
            t = t.transpose(0, 1)
        return self.tokens(t)


def test_sequence_first_tokens_are_turned_around(images):
    a = collect_tensors(SeqFirst(False), ["tokens"], images, reduction="max").layers["tokens"]
    b = collect_tensors(SeqFirst(True), ["tokens"], images, reduction="max").layers["tokens"]
    assert np.array_equal(a.values, b.values)
    assert np.array_equal(a.top_maps, b.top_maps)
    assert b.output_shape == (17, 6)


def test_patch_grid():
    assert patch_grid(197) == (1, 14)  # ViT-B/16 at 224: CLS + 14×14
    assert patch_grid(50) == (1, 7)  # ViT-B/32
    assert patch_grid(196) == (0, 14)  # no CLS token
    assert patch_grid(201) == (5, 14)  # CLS + 4 registers
    assert patch_grid(5) == (1, 2)
    assert patch_grid(7) is None  # 3 + 2×2 is not a plausible layout: no maps
    assert patch_grid(3) is None

    class T(nn.Module):
        def forward(self, x):
            return x.flatten(2)  # (B, 3, 32*32): 3 "tokens" of width 1024

    model = nn.Sequential(T(), nn.Identity())
    got = collect_tensors(model, ["1"], torch.rand(4, 3, 32, 32)).layers["1"]
    assert got.kind == "tokens" and got.top_maps is None and got.values.shape == (4, 1024)


def test_registered_reduction_is_used(images):
    @register_reduction("absmean")
    def _absmean(x, dim):
        return x.abs().mean(dim=dim, dtype=torch.float32)

    try:
        got = collect_tensors(tiny_vit(), ["conv_proj"], images, reduction="absmean").layers["conv_proj"]
        ref = np.abs(_outputs(tiny_vit(), "conv_proj", images)).mean(axis=(2, 3))
        assert np.allclose(got.values, ref, atol=1e-5)
    finally:
        REDUCTIONS.pop("absmean")


def test_reduce_output_returns_full_maps():
    out = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    values, maps = reduce_output(out, "x", "max")
    assert torch.equal(values, out.flatten(2).amax(2))
    assert torch.equal(maps, out)


@pytest.mark.slow
def test_vit_b_16_last_encoder_layer():
    """torchvision vit_b_16 (random weights) at 224×224: CLS and mean over tokens, maps on the 14×14 grid."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None).eval()
    x = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    layer = "encoder.layers.encoder_layer_11"
    out = _outputs(model, layer, x)
    assert out.shape == (3, 197, 768)
    got = collect_tensors(model, [layer], x, reduction="cls", top_k=2, batch_size=2).layers[layer]
    assert np.allclose(got.values, out[:, 0], atol=1e-4)
    assert got.top_maps.shape == (2, 768, 14, 14)
    best = got.top_index[0, 5]
    assert np.allclose(got.top_maps[0, 5], out[best, 1:, 5].reshape(14, 14), atol=1e-2, rtol=1e-2)
    mean = collect_tensors(model, [layer], x, reduction="mean", top_k=0, batch_size=3).layers[layer]
    assert np.allclose(mean.values, out.mean(axis=1), atol=1e-4)
