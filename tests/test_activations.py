import numpy as np
import pytest
import torch

from auditor.activations import TopK, build_transform, capture, collect, state_hash
from auditor.data import load_probe_set
from auditor.errors import DataError, LayerError
from auditor.models import Preprocessing, load_model

from conftest import COLOUR_MODEL


@pytest.fixture()
def setup(colour_probe):
    images, labels = colour_probe
    probe = load_probe_set(images, labels)
    model = load_model(COLOUR_MODEL).module
    _, tf = build_transform(Preprocessing(), normalize=False)
    return probe, model, tf


def _collect(model, probe, tf, cache=None, **kw):
    kw.setdefault("chunk_size", 64)
    return collect(model, ["act"], probe, transform=tf, transform_desc={"t": "plain"}, model_hash=state_hash(model),
                   batch_size=16, device="cpu", top_k=5, cache_dir=cache, progress=False, **kw)


def test_values_match_hand_computed(setup):
    probe, model, tf = setup
    got = _collect(model, probe, tf).layers["act"]
    # independent reference: numpy over the raw pixels
    from PIL import Image
    ref = []
    for rel in probe.paths:
        x = np.asarray(Image.open(probe.root / rel).convert("RGB"), dtype=np.float64) / 255.0
        r, g, b = x[..., 0], x[..., 1], x[..., 2]
        ref.append([np.maximum(r - g - b, 0).mean(), np.maximum(g - r - b, 0).mean(),
                    np.maximum(r + b - 2 * g - 1, 0).mean(), np.maximum(b - r - g, 0).mean()])
    assert np.allclose(got.values, np.array(ref), atol=1e-5)
    assert got.output_shape == (4, 32, 32)
    # top-k: per neuron, the k highest values in descending order with their rows
    for k in range(4):
        order = np.lexsort((np.arange(len(ref)), -got.values[:, k]))[:5]
        assert list(got.top_index[:, k]) == list(order)
        assert np.allclose(got.top_values[:, k], got.values[order, k])
    assert got.top_maps.shape == (5, 4, 16, 16)  # pooled down to MAX_MAP_SIDE


def test_cache_hit_miss_and_invalidation(setup, tmp_path):
    probe, model, tf = setup
    first = _collect(model, probe, tf, cache=tmp_path)
    assert first.cache["status"] == "miss"
    again = _collect(model, probe, tf, cache=tmp_path)
    assert again.cache["status"] == "hit"
    assert np.array_equal(first.layers["act"].values, again.layers["act"].values)
    with torch.no_grad():
        model.conv.bias[0] += 0.1  # new weights -> new key
    changed = _collect(model, probe, tf, cache=tmp_path)
    assert changed.cache["status"] == "miss" and changed.cache["key"] != first.cache["key"]
    with torch.no_grad():
        model.conv.bias[0] -= 0.1
    assert _collect(model, probe, tf, cache=tmp_path, reduction="max").cache["status"] == "miss"
    # an image changes on disk -> miss
    from PIL import Image
    p = probe.root / probe.paths[0]
    Image.open(p).transpose(Image.FLIP_LEFT_RIGHT).save(p)
    assert _collect(model, probe, tf, cache=tmp_path).cache["status"] == "miss"


class Boom(Exception):
    pass


def test_resume_after_crash_gives_identical_array(setup, tmp_path):
    probe, model, tf = setup
    reference = _collect(model, probe, tf).layers["act"].values
    calls = {"n": 0}

    def bomb(_m, _i, _o):
        calls["n"] += 1
        if calls["n"] == 7:  # in the second chunk (4 batches of 16 per 64-image chunk)
            raise Boom("simulated crash")

    h = model.conv.register_forward_hook(bomb)
    with pytest.raises(Boom):
        _collect(model, probe, tf, cache=tmp_path)
    h.remove()
    # a torn write: a leftover temp file must not be read as data
    key_dir = next(tmp_path.iterdir())
    (key_dir / ".tmp-garbage.npz").write_bytes(b"torn")
    resumed = _collect(model, probe, tf, cache=tmp_path)
    assert resumed.cache["status"] == "partial" and resumed.cache["reused"] == 1
    assert np.array_equal(resumed.layers["act"].values, reference)


def test_corrupt_chunk_is_recomputed(setup, tmp_path):
    probe, model, tf = setup
    ref = _collect(model, probe, tf, cache=tmp_path).layers["act"].values
    chunk = sorted(next(tmp_path.iterdir()).glob("chunk-*.npz"))[0]
    chunk.write_bytes(b"garbage")
    again = _collect(model, probe, tf, cache=tmp_path)
    assert again.cache["status"] == "partial"
    assert np.array_equal(again.layers["act"].values, ref)


def test_hooks_removed_and_mode_restored_when_forward_raises(setup):
    probe, model, tf = setup
    model.train()

    def fail(_m, _i, _o):
        raise Boom("x")

    h = model.conv.register_forward_hook(fail)
    with pytest.raises(Boom):
        _collect(model, probe, tf)
    h.remove()
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_corrupt_image_error_or_skip(setup, tmp_path, colour_probe):
    import shutil
    images, labels = colour_probe
    root = tmp_path / "copy"
    shutil.copytree(images, root)
    probe = load_probe_set(root, labels)
    (root / probe.paths[3]).write_bytes(b"\x89PNG broken")
    _, model, tf = setup
    with pytest.raises(DataError, match=rf"cannot read image .*{probe.paths[3]}"):
        _collect(model, probe, tf)
    got = _collect(model, probe, tf, on_bad_image="skip")
    assert not got.ok[3] and got.ok.sum() == len(probe) - 1
    assert got.bad[0][0] == probe.paths[3]


def test_unsupported_output_shape(setup):
    probe, model, tf = setup

    class Seq(torch.nn.Module):
        def forward(self, x):
            return x.flatten(2)  # (B, C, HW): 3-D
    model.act = torch.nn.Sequential(torch.nn.ReLU(), Seq())
    with pytest.raises(LayerError, match=r"output shape \(16, 4, 1024\)"):
        collect(model, ["act"], probe, transform=tf, transform_desc={}, model_hash="x", batch_size=16,
                device="cpu", top_k=0, progress=False)


def test_topk_streaming_equals_global_topk():
    rng = np.random.default_rng(0)
    vals = rng.integers(0, 5, size=(50, 3)).astype(np.float32)  # many ties
    tk = TopK(4)
    for s in range(0, 50, 7):
        tk.update(torch.from_numpy(vals[s:s + 7]), torch.arange(s, min(s + 7, 50)), None)
    out = tk.numpy()
    for k in range(3):
        order = np.lexsort((np.arange(50), -vals[:, k]))[:4]
        assert list(out["top_index"][:, k]) == list(order)


def test_capture_context_manager_cleans_up():
    model = load_model(COLOUR_MODEL).module
    with capture(model, ["act"]) as store:
        model(torch.zeros(1, 3, 4, 4))
        assert store["act"].shape == (1, 4, 4, 4)
    assert not model.act._forward_hooks
