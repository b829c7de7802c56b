"""Throughput options: precision, channels_last, torch.compile, workers, out-of-memory backoff,
decoding on the device; GPU-only checks skip cleanly without CUDA."""

import numpy as np
import pytest
import torch
from torch import nn

from auditor.collect import TensorImages, build_transform, collect, resolve_precision, state_hash
from auditor.data import ProbeSet, load_probe_set
from auditor.errors import ModelError
from auditor.models import Preprocessing, load_model

from conftest import COLOUR_MODEL

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture()
def setup(colour_probe):
    images, labels = colour_probe
    probe = load_probe_set(images, labels)
    model = load_model(COLOUR_MODEL).module
    _, tf = build_transform(Preprocessing(), normalize=False)
    return probe, model, tf


def _collect(model, probe, tf, layers=("act",), **kw):
    kw.setdefault("chunk_size", 64)
    kw.setdefault("device", "cpu")
    kw.setdefault("batch_size", 16)
    return collect(model, list(layers), probe, transform=tf, transform_desc={"t": "plain"},
                   model_hash=state_hash(model), top_k=5, progress=False, **kw)


@pytest.fixture()
def reference(setup):
    probe, model, tf = setup
    return _collect(model, probe, tf).layers["act"]


@pytest.mark.parametrize("precision,tol", [("bfloat16", 2e-2), ("float16", 2e-3)])
def test_reduced_precision_is_close_and_keyed(setup, reference, tmp_path, precision, tol):
    probe, model, tf = setup
    got = _collect(model, probe, tf, precision=precision, cache_dir=tmp_path)
    assert got.precision == precision
    assert np.allclose(got.layers["act"].values, reference.values, atol=tol)
    full = _collect(model, probe, tf, precision="float32", cache_dir=tmp_path)
    assert full.cache["status"] == "miss" and full.cache["key"] != got.cache["key"]
    assert np.array_equal(full.layers["act"].values, reference.values)


def test_auto_precision_is_float32(setup, tmp_path):
    probe, model, tf = setup
    assert resolve_precision("auto", torch.device("cpu")) == "float32"
    assert resolve_precision("auto", torch.device("cuda")) == "float32"  # see resolve_precision: measured
    first = _collect(model, probe, tf, precision="float32", cache_dir=tmp_path)
    auto = _collect(model, probe, tf, precision="auto", cache_dir=tmp_path)
    assert auto.precision == "float32" and auto.cache["status"] == "hit" and auto.cache["key"] == first.cache["key"]


def test_float16_overflow_is_reported():
    class Loud(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)
            self.loud = nn.Identity()
            with torch.no_grad():
                self.conv.weight.fill_(1.0)

        def forward(self, x):
            return self.loud(self.conv(x) * 1e5)  # beyond float16's 65504

    x = torch.rand(4, 3, 8, 8) + 1
    with pytest.raises(ModelError, match="non-finite activations.*precision float16"):
        collect(Loud(), ["loud"], TensorImages(x), transform=None, transform_desc={}, model_hash="l",
                device="cpu", precision="float16", progress=False)
    ok = collect(Loud(), ["loud"], TensorImages(x), transform=None, transform_desc={}, model_hash="l",
                 device="cpu", precision="bfloat16", progress=False)
    assert np.isfinite(ok.layers["loud"].values).all()


def test_channels_last_gives_the_same_values_and_restores_the_model(setup, reference):
    probe, model, tf = setup
    got = _collect(model, probe, tf, channels_last=True)
    assert np.allclose(got.layers["act"].values, reference.values, atol=1e-6)
    assert model.conv.weight.is_contiguous()


def test_compile_path(setup, reference):
    probe, model, tf = setup
    got = _collect(model, probe, tf, compile="eager")  # the plumbing; inductor needs a compiler and minutes
    assert np.array_equal(got.layers["act"].values, reference.values)
    assert np.array_equal(got.layers["act"].top_index, reference.top_index)
    assert all(not m._forward_hooks for m in model.modules())


def test_workers_with_prefetch_give_the_same_result(setup, reference):
    probe, model, tf = setup
    got = _collect(model, probe, tf, workers=2, prefetch_factor=3)
    assert np.array_equal(got.layers["act"].values, reference.values)
    assert np.array_equal(got.layers["act"].top_maps, reference.top_maps)


class OOMNet(nn.Module):
    """Raises CUDA's out-of-memory error on batches larger than ``limit`` (simulated, on CPU)."""

    def __init__(self, limit: int):
        super().__init__()
        self.inner = load_model(COLOUR_MODEL).module
        self.limit = limit
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.inner(x)


def test_out_of_memory_halves_the_batch_and_continues(setup, reference):
    probe, _, tf = setup
    model = OOMNet(limit=5)
    logged: list[str] = []
    got = collect(model, ["inner.act"], probe, transform=tf, transform_desc={"t": "plain"}, model_hash="oom",
                  batch_size=16, chunk_size=64, device="cpu", top_k=5, progress=False, log=logged.append)
    assert got.batch_size == 4  # 16 -> 8 -> 4, and it stays there
    oom = [m for m in logged if "out of memory" in m]
    assert oom == ["out of memory on cpu with a batch of 16 images; continuing with batches of 8",
                   "out of memory on cpu with a batch of 8 images; continuing with batches of 4"]
    assert model.calls[:2] == [2, 3]  # the calibration passes (batch axis and call counts), once per run
    assert model.calls[2:4] == [16, 8] and max(model.calls[4:]) == 4
    layer = got.layers["inner.act"]
    assert np.allclose(layer.values, reference.values, atol=1e-6)
    assert np.array_equal(layer.top_index, reference.top_index)


def test_out_of_memory_with_one_image_is_an_error(setup):
    probe, _, tf = setup
    with pytest.raises(ModelError, match="out of memory on cpu even with a batch of one image"):
        collect(OOMNet(limit=0), ["inner.act"], probe, transform=tf, transform_desc={}, model_hash="oom",
                batch_size=4, device="cpu", progress=False)


def _jpeg_probe(root, n=12):
    from PIL import Image
    rng = np.random.default_rng(0)
    root.mkdir()
    paths = []
    for i in range(n):
        arr = np.clip(rng.normal(120, 60, size=(40, 48, 3)), 0, 255).astype(np.uint8)
        arr[8:20, 8:20] = (240, 10, 240)
        name = f"img{i:02d}." + ("png" if i == 3 else "jpg")
        Image.fromarray(arr).save(root / name, quality=95)
        paths.append(name)
    return ProbeSet(root=root, paths=paths, labels=np.zeros((n, 1), dtype=bool), concepts=["c"])


def _decode_check(tmp_path, device):
    probe = _jpeg_probe(tmp_path / "jpg")
    model = load_model(COLOUR_MODEL).module
    pre = Preprocessing(resize=32, crop=28, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    _, tf = build_transform(pre, normalize=True)
    kw = dict(transform=tf, transform_desc=pre.plain(), model_hash="c", batch_size=4, device=device, top_k=3,
              progress=False)
    pil = collect(model, ["act"], probe, **kw)
    dev = collect(model, ["act"], probe, decode="device", preprocessing=pre, cache_dir=tmp_path / "c", **kw)
    assert dev.cache["key"] != collect(model, ["act"], probe, cache_dir=tmp_path / "c", **kw).cache["key"]
    # resizing float tensors vs PIL's uint8 resize: close, not identical
    assert np.allclose(dev.layers["act"].values, pil.layers["act"].values, atol=0.02)
    return probe, model, pre, kw


def test_decode_on_device_path_matches_pil_on_cpu(tmp_path):
    probe, model, pre, kw = _decode_check(tmp_path, "cpu")
    (probe.root / probe.paths[5]).write_bytes(b"\xff\xd8 broken jpeg")
    got = collect(model, ["act"], probe, decode="device", preprocessing=pre, on_bad_image="skip", **kw)
    assert not got.ok[5] and got.ok.sum() == len(probe) - 1 and got.bad[0][0] == probe.paths[5]


@pytest.mark.slow
def test_resume_after_the_process_is_killed(setup, tmp_path):
    """SIGKILL mid-run (no cleanup at all), then resume: the identical array."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    probe, model, tf = setup
    reference = _collect(model, probe, tf, chunk_size=32).layers["act"]
    script = tmp_path / "worker.py"
    script.write_text(f"""
import sys, time, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
torch.set_num_threads(1)
from auditor.collect import build_transform, collect, state_hash
from auditor.data import load_probe_set
from auditor.models import Preprocessing, load_model
from conftest import COLOUR_MODEL
probe = load_probe_set({str(probe.root)!r}, {str(probe.root.parent / 'labels.csv')!r})
model = load_model(COLOUR_MODEL).module
_, tf = build_transform(Preprocessing(), normalize=False)
model.conv.register_forward_hook(lambda m, i, o: time.sleep(0.15))
print("ready", flush=True)
collect(model, ["act"], probe, transform=tf, transform_desc={{"t": "plain"}}, model_hash=state_hash(model),
        batch_size=16, chunk_size=32, device="cpu", top_k=5, cache_dir={str(tmp_path / 'cache')!r}, progress=False)
""")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((tmp_path / "cache").glob("*/chunk-00001.npz")):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    key_dir = next((tmp_path / "cache").iterdir())
    assert not (key_dir / "summary.npz").exists()
    resumed = _collect(model, probe, tf, chunk_size=32, cache_dir=tmp_path / "cache")
    assert resumed.cache["status"] == "partial" and 2 <= resumed.cache["reused"] < resumed.cache["chunks"]
    assert np.array_equal(resumed.layers["act"].values, reference.values)
    assert np.array_equal(resumed.layers["act"].top_index, reference.top_index)
    assert np.array_equal(resumed.layers["act"].top_maps, reference.top_maps)


# -- CUDA ------------------------------------------------------------------------------------------

@pytest.mark.gpu
@cuda
def test_cuda_matches_cpu_and_bfloat16_is_close(setup, reference):
    probe, model, tf = setup
    got = _collect(model, probe, tf, device="cuda", precision="float32")
    assert got.device.startswith("cuda")
    assert np.allclose(got.layers["act"].values, reference.values, atol=1e-5)
    assert _collect(model, probe, tf, device="cuda", precision="auto").precision == "float32"
    bf = _collect(model, probe, tf, device="cuda", precision="bfloat16", channels_last=True)
    assert bf.precision == "bfloat16"
    assert np.allclose(bf.layers["act"].values, reference.values, atol=2e-2)
    assert torch.backends.cudnn.allow_tf32 in (True, False)  # restored, whatever it was


@pytest.mark.gpu
@cuda
def test_cuda_tf32_settings_are_restored(setup):
    probe, model, tf = setup
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    _collect(model, probe, tf, device="cuda", precision="tf32")
    _collect(model, probe, tf, device="cuda", precision="float32")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


@pytest.mark.gpu
@cuda
def test_cuda_decode_on_device_matches_pil(tmp_path):
    _decode_check(tmp_path, "cuda")


@pytest.mark.gpu
@cuda
def test_cuda_workers_pinned_memory(setup, reference):
    probe, model, tf = setup
    got = _collect(model, probe, tf, device="cuda", workers=2, pin_memory=True, prefetch_factor=4)
    assert np.allclose(got.layers["act"].values, reference.values, atol=1e-5)


def test_a_channels_last_model_stays_channels_last(setup, reference):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval().to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 32, 32)
    got = collect(model, ["layer1"], TensorImages(x), transform=None, transform_desc={}, model_hash="r",
                  device="cpu", channels_last=True, progress=False)
    assert got.layers["layer1"].values.shape == (2, 64)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.conv1.weight.is_contiguous()
