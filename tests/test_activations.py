import numpy as np
import pytest
import torch

from auditor.collect import TopK, build_transform, capture, collect, state_hash
from auditor.data import load_probe_set
from auditor.errors import DataError, LayerError
from auditor.models import Preprocessing, load_model

from conftest import COLOUR_MODEL


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


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
        if calls["n"] == 2 + 7:  # after the 2 calibration passes: in the second chunk (4 batches of 16 per chunk)
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
    ref = _collect(model, probe, tf).layers["act"].values
    calls = {"n": 0}

    def bomb(_m, _i, _o):
        calls["n"] += 1
        if calls["n"] == 2 + 9:  # after the 2 calibration passes: in the third chunk (chunks 0 and 1 committed)
            raise Boom("simulated crash")

    h = model.conv.register_forward_hook(bomb)
    with pytest.raises(Boom):
        _collect(model, probe, tf, cache=tmp_path)
    h.remove()
    key_dir = next(tmp_path.iterdir())
    chunks = sorted(key_dir.glob("chunk-*.npz"))
    assert len(chunks) == 2
    chunks[0].write_bytes(b"garbage")
    again = _collect(model, probe, tf, cache=tmp_path)
    assert again.cache["status"] == "partial" and again.cache["reused"] == 1
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
            return x.unsqueeze(1)  # (B, 1, C, H, W): 5-D
    model.act = torch.nn.Sequential(torch.nn.ReLU(), Seq())
    with pytest.raises(LayerError, match=r"output shape \(16, 1, 4, 32, 32\)"):
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


# -- cache keys: every input that changes the numbers forces a recompute -------------------------

def _small(probe, n=40):
    keep = np.zeros(len(probe), dtype=bool)
    keep[:n] = True
    return probe.subset(keep)


def _copy_probe(probe, root, rename=None, extra=0):
    """The probe's images copied under ``root`` (optionally one renamed, or extra rows appended)."""
    import shutil

    from auditor.data import ProbeSet
    paths = list(probe.paths)
    for rel in paths:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(probe.root / rel, root / rel)
    if rename is not None:
        old = paths[rename]
        new = old.replace(".png", "_renamed.png")
        (root / old).rename(root / new)
        paths[rename] = new
    labels = probe.labels
    for i in range(extra):
        paths.append(paths[i].replace(".png", f"_extra{i}.png"))
        shutil.copy2(root / probe.paths[i], root / paths[-1])
        labels = np.vstack([labels, probe.labels[i:i + 1]])
    return ProbeSet(root=root, paths=paths, labels=labels, concepts=probe.concepts)


def _change_weights(ctx):
    with torch.no_grad():
        ctx["model"].conv.bias[1] += 0.01


def _change_architecture(ctx):
    ctx["model"].act = torch.nn.LeakyReLU(0.01)  # same state_dict, different function


def _change_transform(ctx):
    from torchvision import transforms as T
    ctx["tf"] = T.Compose([T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))])
    ctx["kw"]["transform_desc"] = {"t": "normalised"}


def _change_transform_silently(ctx):
    from torchvision import transforms as T
    ctx["tf"] = T.Compose([T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))])  # same desc


def _change_image_content(ctx):
    from PIL import Image
    ctx["probe"] = _copy_probe(ctx["probe"], ctx["tmp"] / "copy")
    p = ctx["probe"].root / ctx["probe"].paths[0]
    Image.open(p).transpose(Image.FLIP_LEFT_RIGHT).save(p)


def _change_image_name(ctx):
    ctx["probe"] = _copy_probe(ctx["probe"], ctx["tmp"] / "copy", rename=3)


def _change_image_count(ctx):
    ctx["probe"] = _copy_probe(ctx["probe"], ctx["tmp"] / "copy", extra=1)


def _change_image_folder(ctx):
    ctx["probe"] = _copy_probe(ctx["probe"], ctx["tmp"] / "elsewhere")


def _change_version(module_name, attr="__version__"):
    def change(ctx):
        import importlib
        ctx["monkeypatch"].setattr(importlib.import_module(module_name), attr, "0.0.0-edited")
    return change


KEY_CHANGES = {
    "weights": _change_weights,
    "architecture": _change_architecture,
    "layer": lambda ctx: ctx.update(layers=["conv"]),
    "extra layer": lambda ctx: ctx.update(layers=["act", "conv"]),
    "reduction": lambda ctx: ctx["kw"].update(reduction="max"),
    "transform": _change_transform,
    "transform, same description": _change_transform_silently,
    "precision": lambda ctx: ctx["kw"].update(precision="bfloat16"),
    "channels_last": lambda ctx: ctx["kw"].update(channels_last=True),
    "top_k": lambda ctx: ctx["kw"].update(top_k=3),
    "image content": _change_image_content,
    "image renamed": _change_image_name,
    "image added": _change_image_count,
    "image folder": _change_image_folder,
    "auditor version": _change_version("auditor"),
    "torch version": _change_version("torch"),
    "torchvision version": _change_version("torchvision"),
    "token layout": lambda ctx: ctx["kw"].update(token_layout="batch_first"),
}


def _run(ctx, cache, log=None):
    kw = dict(ctx["kw"])
    kw.setdefault("transform_desc", {"t": "plain"})
    return collect(ctx["model"], ctx["layers"], ctx["probe"], transform=ctx["tf"], model_hash=state_hash(ctx["model"]),
                   batch_size=16, device="cpu", cache_dir=cache, progress=False, chunk_size=16,
                   log=log or (lambda m: None), **kw)


@pytest.mark.parametrize("change", list(KEY_CHANGES))
def test_each_changed_key_forces_recompute(setup, tmp_path, change, monkeypatch):
    probe, model, tf = setup
    ctx = {"probe": _small(probe), "model": model, "tf": tf, "layers": ["act"], "kw": {"top_k": 5}, "tmp": tmp_path,
           "monkeypatch": monkeypatch}
    cache = tmp_path / "cache"
    first = _run(ctx, cache)
    assert first.cache["status"] == "miss"
    logged = []
    again = _run(ctx, cache, log=logged.append)
    assert again.cache["status"] == "hit" and again.cache["key"] == first.cache["key"]
    assert any(m.startswith("activation cache hit") for m in logged)
    KEY_CHANGES[change](ctx)
    logged.clear()
    changed = _run(ctx, cache, log=logged.append)
    assert changed.cache["status"] == "miss", change
    assert changed.cache["key"] != first.cache["key"]
    assert any(m.startswith("activation cache miss") for m in logged)


def test_content_fingerprint_ignores_mtime_only_changes(setup, tmp_path):
    import os
    probe, model, tf = setup
    probe = _copy_probe(_small(probe, 20), tmp_path / "copy")
    ctx = {"probe": probe, "model": model, "tf": tf, "layers": ["act"], "kw": {"top_k": 2}}
    stat_first = _run(ctx, tmp_path / "c")
    ctx["kw"]["fingerprint"] = "content"
    content_first = _run(ctx, tmp_path / "c")
    assert content_first.cache["key"] != stat_first.cache["key"]
    p = probe.root / probe.paths[0]
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes
    assert _run(ctx, tmp_path / "c").cache["status"] == "hit"
    ctx["kw"]["fingerprint"] = "stat"
    assert _run(ctx, tmp_path / "c").cache["status"] == "miss"


def test_result_is_a_read_only_memmap_and_chunks_are_folded_away(setup, tmp_path):
    probe, model, tf = setup
    got = _collect(model, probe, tf, cache=tmp_path)
    values = got.layers["act"].values
    assert isinstance(values, np.memmap) and not values.flags.writeable
    key_dir = next(tmp_path.iterdir())
    names = sorted(p.name for p in key_dir.iterdir() if p.name != ".lock")
    assert names == ["manifest.json", "summary.npz", "values-000.npy"]
    assert np.load(key_dir / "values-000.npy").shape == (len(probe), 4)


def test_without_cache_the_scratch_folder_is_removed(setup, tmp_path):
    probe, model, tf = setup
    ref = _collect(model, probe, tf, cache=tmp_path / "cache").layers["act"]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    got = _collect(model, probe, tf, scratch_dir=scratch)
    assert got.cache["dir"] is None
    assert list(scratch.iterdir()) == []  # files unlinked; the open memory map keeps the data
    assert np.array_equal(got.layers["act"].values, ref.values)
    assert np.array_equal(got.layers["act"].top_maps, ref.top_maps)


def test_damaged_final_array_is_recomputed(setup, tmp_path):
    probe, model, tf = setup
    ref = np.array(_collect(model, probe, tf, cache=tmp_path).layers["act"].values)
    key_dir = next(tmp_path.iterdir())
    (key_dir / "values-000.npy").write_bytes(b"\x93NUMPY torn")
    again = _collect(model, probe, tf, cache=tmp_path)
    assert again.cache["status"] == "miss"
    assert np.array_equal(again.layers["act"].values, ref)


def test_unreadable_image_is_remembered_by_the_cache(setup, tmp_path, colour_probe):
    import shutil
    images, labels = colour_probe
    root = tmp_path / "copy"
    shutil.copytree(images, root)
    probe = load_probe_set(root, labels)
    (root / probe.paths[5]).write_bytes(b"not an image")
    _, model, tf = setup
    first = _collect(model, probe, tf, cache=tmp_path / "c", on_bad_image="skip")
    assert first.bad == [(probe.paths[5], first.bad[0][1])] and "UnidentifiedImageError" in first.bad[0][1]
    again = _collect(model, probe, tf, cache=tmp_path / "c", on_bad_image="skip")
    assert again.cache["status"] == "hit" and again.bad == first.bad
    assert np.isnan(again.layers["act"].values[5]).all() and not again.ok[5]
    with pytest.raises(DataError, match="cannot read image"):
        _collect(model, probe, tf, cache=tmp_path / "c")  # a hit still refuses in error mode


def test_bad_arguments_are_config_errors(setup):
    from auditor.errors import ConfigError
    probe, model, tf = setup
    for kw, match in [({"precision": "float8"}, "unknown precision"), ({"decode": "gpu"}, "decode must be"),
                      ({"chunk_size": 0}, "chunk_size must be"), ({"fingerprint": "md5"}, "fingerprint must be"),
                      ({"decode": "device"}, "pass preprocessing")]:
        with pytest.raises(ConfigError, match=match):
            _collect(model, probe, tf, **kw)


# -- the model's code is in the key: same weights, edited code -> recompute ------------------------

MODEL_PY = """
import torch
from torch import nn

SCALE = 1.0


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)
        self.out = nn.Identity()

    def forward(self, x):
        return self.out(self.conv(x) * 1.0 * SCALE)


def make():
    return Net()
"""


def _file_model(path, text):
    path.write_text(text)
    return load_model(f"{path}:make").module


@pytest.mark.parametrize("edit", [("* 1.0 * SCALE", "* -1.0 * SCALE"), ("SCALE = 1.0", "SCALE = -1.0")])
def test_edited_forward_with_the_same_weights_is_a_miss(setup, tmp_path, edit):
    probe, _, tf = setup
    probe = _small(probe, 16)
    path = tmp_path / "net.py"
    model = _file_model(path, MODEL_PY)
    kw = dict(transform=tf, transform_desc={"t": "plain"}, batch_size=8, device="cpu", progress=False,
              cache_dir=tmp_path / "cache", top_k=2)
    first = collect(model, ["out"], probe, model_hash=state_hash(model), **kw)
    assert collect(model, ["out"], probe, model_hash=state_hash(model), **kw).cache["status"] == "hit"
    edited = _file_model(path, MODEL_PY.replace(*edit))
    assert state_hash(edited) == state_hash(model)  # same weights
    again = collect(edited, ["out"], probe, model_hash=state_hash(edited), **kw)
    assert again.cache["status"] == "miss" and again.cache["key"] != first.cache["key"]
    assert np.allclose(again.layers["out"].values, -np.asarray(first.layers["out"].values), atol=1e-6)


class _Scaled(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


class _Double(torch.nn.Module):
    def forward(self, x):
        return x * 2.0


class _Triple(torch.nn.Module):
    def forward(self, x):
        return x * 3.0


def test_torchscript_code_is_in_the_key(setup, tmp_path):
    probe, _, tf = setup
    probe = _small(probe, 8)
    kw = dict(transform=tf, transform_desc={"t": "plain"}, batch_size=8, device="cpu", progress=False,
              cache_dir=tmp_path, top_k=1, model_hash="no-weights")
    a = collect(_Scaled(torch.jit.script(_Double())), ["inner"], probe, **kw)
    b = collect(_Scaled(torch.jit.script(_Triple())), ["inner"], probe, **kw)
    assert b.cache["status"] == "miss" and a.cache["key"] != b.cache["key"]
    assert np.allclose(np.asarray(b.layers["inner"].values) * 2, np.asarray(a.layers["inner"].values) * 3)


def test_unreadable_model_source_is_not_cached(setup, tmp_path):
    probe, _, tf = setup
    probe = _small(probe, 8)
    namespace: dict = {"nn": torch.nn}
    exec("class Hidden(nn.Module):\n    def forward(self, x):\n        return x * 2.0\n", namespace)
    model = namespace["Hidden"]()
    from auditor.collect import model_code
    assert model_code(model).unreadable == [f"{model.__class__.__module__}.Hidden"]
    logged = []
    wrapped = _Scaled(model)
    got = collect(wrapped, ["inner"], probe, transform=tf, transform_desc={}, batch_size=8, device="cpu",
                  progress=False, cache_dir=tmp_path / "cache", top_k=1, model_hash="x", log=logged.append)
    assert got.cache["status"] == "off" and got.cache["dir"] is None
    assert any("not cached" in w and "Hidden" in w for w in got.warnings)
    assert any(m.startswith("warning: activations not cached") for m in logged)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("where", ["class", "instance"])
def test_forward_replaced_at_run_time_is_a_miss(setup, tmp_path, where):
    probe, _, tf = setup
    probe = _small(probe, 8)
    model = _file_model(tmp_path / "net.py", MODEL_PY)
    kw = dict(transform=tf, transform_desc={"t": "plain"}, batch_size=8, device="cpu", progress=False,
              cache_dir=tmp_path / "cache", top_k=1, model_hash=state_hash(model))
    first = collect(model, ["out"], probe, **kw)

    def negated(self, x):
        return self.out(-self.conv(x))

    if where == "class":
        type(model).forward = negated
    else:
        import types
        model.forward = types.MethodType(negated, model)
    again = collect(model, ["out"], probe, **kw)
    assert again.cache["status"] == "miss"
    assert np.allclose(again.layers["out"].values, -np.asarray(first.layers["out"].values), atol=1e-6)
