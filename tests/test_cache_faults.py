"""The activation cache never serves a stale or corrupt value, and says so when it recomputes.

Reference for every case: the same collection without a cache (computed from the
images). Faults are injected on disk between runs: a flipped byte, an array of
another width, a valid chunk copied over another, a chunk deleted by a concurrent
run after this one checked it, an image swapped for one of the same size with its
mtime restored. Then the image loaders: 16-bit PNGs and decompression bombs.
"""

from __future__ import annotations

import json
import os
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from auditor.cli import main
from auditor.collect import build_transform, collect, state_hash
from auditor.data import load_probe_set
from auditor.models import Preprocessing, load_model

from conftest import COLOUR_MODEL, make_colour_probe


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture()
def setup(tmp_path):
    images, labels = make_colour_probe(tmp_path / "probe", n=96)
    probe = load_probe_set(images, labels)
    model = load_model(COLOUR_MODEL).module
    _, tf = build_transform(Preprocessing(), normalize=False)
    return probe, model, tf


def _collect(model, probe, tf, cache=None, log=None, **kw):
    kw.setdefault("chunk_size", 32)
    return collect(model, ["act"], probe, transform=tf, transform_desc={"t": "plain"}, model_hash=state_hash(model),
                   batch_size=16, device="cpu", top_k=5, cache_dir=cache, progress=False,
                   log=log or (lambda m: None), **kw)


def _logged():
    lines: list[str] = []
    return lines, lines.append


def _key_dir(cache):
    (d,) = [p for p in cache.iterdir() if p.is_dir()]
    return d


# -- committed arrays ------------------------------------------------------------------------------------------

def test_flipped_byte_in_values_is_recomputed_and_said(setup, tmp_path):
    probe, model, tf = setup
    ref = np.array(_collect(model, probe, tf).layers["act"].values)
    cache = tmp_path / "cache"
    _collect(model, probe, tf, cache=cache)
    values = _key_dir(cache) / "values-000.npy"
    data = bytearray(values.read_bytes())
    data[-7] ^= 0x40  # one bit in the last row's data
    values.write_bytes(bytes(data))
    assert not np.array_equal(np.load(values), ref)  # the file now holds a wrong value
    lines, log = _logged()
    got = _collect(model, probe, tf, cache=cache, log=log)
    assert got.cache["status"] == "miss"
    assert np.array_equal(np.asarray(got.layers["act"].values), ref)
    assert any("values-000.npy does not match its recorded sha256" in ln and "recomputing" in ln for ln in lines)
    assert _collect(model, probe, tf, cache=cache).cache["status"] == "hit"  # repaired


def test_wrong_width_array_is_never_served(setup, tmp_path):
    probe, model, tf = setup
    ref = np.array(_collect(model, probe, tf).layers["act"].values)
    cache = tmp_path / "cache"
    _collect(model, probe, tf, cache=cache)
    values = _key_dir(cache) / "values-000.npy"
    np.save(values, np.zeros((len(probe), 3), dtype=np.float32))  # a valid .npy of another width
    lines, log = _logged()
    got = _collect(model, probe, tf, cache=cache, log=log)
    assert got.cache["status"] == "miss" and np.array_equal(np.asarray(got.layers["act"].values), ref)
    assert any("values-000.npy holds a float32 array of shape (96, 3)" in ln for ln in lines)


def test_same_shape_other_values_are_caught_by_the_checksum(setup, tmp_path):
    probe, model, tf = setup
    cache = tmp_path / "cache"
    ref = np.array(_collect(model, probe, tf, cache=cache).layers["act"].values)
    values = _key_dir(cache) / "values-000.npy"
    np.save(values, ref[::-1].copy())  # right shape and dtype, rows reversed
    got = _collect(model, probe, tf, cache=cache)
    assert got.cache["status"] == "miss" and np.array_equal(np.asarray(got.layers["act"].values), ref)


def test_summary_from_another_commit_is_not_served(setup, tmp_path):
    probe, model, tf = setup
    cache = tmp_path / "cache"
    ref = np.array(_collect(model, probe, tf, cache=cache).layers["act"].values)
    key = _key_dir(cache)
    manifest = json.loads((key / "manifest.json").read_text())
    manifest["final"]["commit"] = "0" * 32
    (key / "manifest.json").write_text(json.dumps(manifest))
    lines, log = _logged()
    got = _collect(model, probe, tf, cache=cache, log=log)
    assert got.cache["status"] == "miss" and np.array_equal(np.asarray(got.layers["act"].values), ref)
    assert any("different commits" in ln for ln in lines)


# -- chunks -------------------------------------------------------------------------------------------------

class Boom(Exception):
    pass


def _crash_after_chunks(model, probe, tf, cache, n_chunks):
    """Run until ``n_chunks`` chunk files are committed, then crash in the next forward pass."""
    def bomb(_m, _i, _o):
        if len(list(cache.glob("*/chunk-*.npz"))) >= n_chunks:
            raise Boom("simulated crash")

    h = model.conv.register_forward_hook(bomb)
    with pytest.raises(Boom):
        _collect(model, probe, tf, cache=cache)
    h.remove()


def test_valid_chunk_copied_over_another_is_not_reused(setup, tmp_path):
    probe, model, tf = setup
    ref = np.array(_collect(model, probe, tf).layers["act"].values)
    cache = tmp_path / "cache"
    _crash_after_chunks(model, probe, tf, cache, 2)  # chunks 0 and 1 committed
    key = _key_dir(cache)
    assert sorted(p.name for p in key.glob("chunk-*")) == ["chunk-00000.npz", "chunk-00001.npz"]
    shutil.copyfile(key / "chunk-00000.npz", key / "chunk-00001.npz")  # a valid chunk, in the wrong place
    lines, log = _logged()
    got = _collect(model, probe, tf, cache=cache, log=log)
    assert got.cache["reused"] == 1
    assert np.array_equal(np.asarray(got.layers["act"].values), ref)
    assert any("1 chunk(s)" in ln and "recomputing" in ln for ln in lines)


def test_chunk_from_another_cache_entry_is_not_reused(setup, tmp_path):
    probe, model, tf = setup
    ref = np.array(_collect(model, probe, tf).layers["act"].values)
    cache = tmp_path / "cache"
    _crash_after_chunks(model, probe, tf, cache, 1)  # chunk 0 committed
    key = _key_dir(cache)
    other = tmp_path / "other"
    with torch.no_grad():
        model.conv.bias[0] += 0.5
    _crash_after_chunks(model, probe, tf, other, 1)
    with torch.no_grad():
        model.conv.bias[0] -= 0.5
    shutil.copyfile(_key_dir(other) / "chunk-00000.npz", key / "chunk-00000.npz")
    got = _collect(model, probe, tf, cache=cache)
    assert got.cache["reused"] == 0 and np.array_equal(np.asarray(got.layers["act"].values), ref)


def test_chunk_deleted_after_the_check_is_recomputed(setup, tmp_path, monkeypatch):
    """Another run commits and deletes the chunks between this run's check and its read."""
    probe, model, tf = setup
    ref = np.array(_collect(model, probe, tf).layers["act"].values)
    cache = tmp_path / "cache"
    _crash_after_chunks(model, probe, tf, cache, 2)
    key = _key_dir(cache)
    from auditor.collect import run as run_mod

    real = run_mod.load_chunk
    seen: dict[str, int] = {}

    def racing_load(path):
        seen[path.name] = seen.get(path.name, 0) + 1
        if seen[path.name] == 2:  # the second read, after the check: the other run deleted it
            path.unlink(missing_ok=True)
        return real(path)

    monkeypatch.setattr(run_mod, "load_chunk", racing_load)
    lines, log = _logged()
    got = _collect(model, probe, tf, cache=cache, log=log)
    assert np.array_equal(np.asarray(got.layers["act"].values), ref)
    assert any("changed or vanished while being read" in ln for ln in lines)
    assert not list(key.glob("chunk-*")) and not list(key.glob(".tmp-*"))


def test_two_runs_sharing_a_cache_take_turns(setup, tmp_path):
    """Two collections of one entry at once: the second waits for the lock, then reuses the first's result."""
    probe, model, tf = setup
    ref = np.array(_collect(model, probe, tf).layers["act"].values)
    cache = tmp_path / "cache"
    model2 = load_model(COLOUR_MODEL).module
    results, errors = {}, []
    logs: list[str] = []

    def go(name, m):
        try:
            results[name] = _collect(m, probe, tf, cache=cache, log=logs.append)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=("a", model)), threading.Thread(target=go, args=("b", model2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    statuses = sorted(r.cache["status"] for r in results.values())
    for r in results.values():
        assert np.array_equal(np.asarray(r.layers["act"].values), ref)
    assert statuses in (["hit", "miss"], ["miss", "miss"])
    if statuses == ["hit", "miss"]:
        assert any("waiting for another auditor run" in ln for ln in logs)


def test_disk_full_in_the_cache_names_it_and_leaves_no_temp_file(colour_args, capsys, monkeypatch):
    import errno

    from auditor.collect import assemble

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(assemble.os, "pwrite", full)
    rc = main(["run"] + colour_args + ["--formats", "json"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("auditor: error:")]
    cache = colour_args[colour_args.index("--cache-dir") + 1]
    assert rc == 2 and len(lines) == 1 and "no space left on the device writing" in lines[0]
    assert cache in lines[0] and "Traceback" not in err
    assert not [p for p in __import__("pathlib").Path(cache).rglob(".tmp-*")]


# -- the stat fingerprint -------------------------------------------------------------------------------------

def test_image_swapped_with_same_size_and_mtime_is_a_miss(setup, tmp_path):
    probe, model, tf = setup
    cache = tmp_path / "cache"
    first = _collect(model, probe, tf, cache=cache)
    victim = probe.root / probe.paths[0]
    st = victim.stat()
    # a donor with another background colour and a file no larger than the victim's
    donor = next(probe.root / p for p in probe.paths[1:]
                 if p.split("/")[0] != probe.paths[0].split("/")[0]
                 and (probe.root / p).stat().st_size <= st.st_size)
    replacement = victim.with_name("replacement.tmp")
    raw = donor.read_bytes()
    replacement.write_bytes(raw + b"\0" * (st.st_size - len(raw)))  # same size (PNG ignores trailing bytes)
    os.replace(replacement, victim)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert victim.stat().st_size == st.st_size and victim.stat().st_mtime_ns == st.st_mtime_ns
    again = _collect(model, probe, tf, cache=cache)
    assert again.cache["status"] == "miss" and again.cache["key"] != first.cache["key"]
    fresh = np.asarray(_collect(model, probe, tf).layers["act"].values)
    assert np.array_equal(np.asarray(again.layers["act"].values), fresh)
    assert not np.array_equal(np.asarray(first.layers["act"].values)[0], fresh[0])


# -- image loading ----------------------------------------------------------------------------------------------

def _grey_model() -> torch.nn.Module:
    """Hand-set weights: neuron 0 = mean of (R+G+B)/3 over the image, neuron 1 = its negation's ReLU (0)."""
    from collections import OrderedDict

    conv = torch.nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0] = 1 / 3
        conv.weight[1] = -1 / 3
        conv.bias.zero_()
    return torch.nn.Sequential(OrderedDict(conv=conv, act=torch.nn.ReLU())).eval()


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    from auditor.images import open_rgb

    grey8 = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))  # 0..252
    Image.fromarray((grey8.astype(np.uint16) * 257)).save(tmp_path / "g16.png")
    im = Image.open(tmp_path / "g16.png")
    assert im.mode.startswith("I;16")
    assert (np.asarray(im.convert("RGB")) == 255).mean() > 0.9  # what Pillow's convert does
    got = np.asarray(open_rgb(tmp_path / "g16.png"))
    assert got.shape == (8, 64, 3)
    assert np.array_equal(got[..., 0], grey8) and np.array_equal(got[..., 1], grey8)


def test_16_bit_probe_image_gives_the_8_bit_activations(setup):
    probe, _, tf = setup
    model = _grey_model()
    src = probe.root / probe.paths[0]
    grey = np.asarray(Image.open(src).convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(src)  # the same picture, 16 bits per pixel
    a16 = np.asarray(_collect(model, probe, tf).layers["act"].values)[0]
    assert a16[0] == pytest.approx(grey.mean() / 255, abs=1e-5)  # clipping would give ~1.0
    Image.fromarray(grey).save(src)
    a8 = np.asarray(_collect(model, probe, tf).layers["act"].values)[0]
    assert np.allclose(a16, a8, atol=1e-6)


def _bomb_probe(tmp_path, colour_probe):
    images, labels = colour_probe
    root = tmp_path / "probe"
    shutil.copytree(images.parent, root)
    victim = sorted((root / "images").rglob("*.png"))[3]
    Image.new("RGB", (80, 80), (230, 20, 20)).save(victim)  # 6,400 pixels; the others have 1,024
    return root, victim


@pytest.mark.parametrize("limit", [2000, 5000])  # past 2x the limit (Pillow raises) and past it (Pillow warns)
def test_decompression_bomb_skip_and_error(colour_args, colour_probe, tmp_path, capsys, monkeypatch, limit):
    root, victim = _bomb_probe(tmp_path, colour_probe)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    args = list(colour_args)
    args[args.index("--images") + 1] = str(root / "images")
    args[args.index("--labels") + 1] = str(root / "labels.csv")
    args += ["--resize", "32", "--crop", "32", "--formats", "json"]
    rc = main(["run"] + args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("auditor: error:")]
    assert rc == 2 and len(lines) == 1 and victim.name in lines[0] and "decompression-bomb" in lines[0], err
    assert "Traceback" not in err
    out = args[args.index("--out") + 1]
    args[args.index("--out") + 1] = out
    rc = main(["run"] + args + ["--on-bad-image", "skip", "--no-fail-on-flag"])
    err = capsys.readouterr().err
    assert rc == 0, err
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["provenance"]["data"]["n_unreadable"] == 1
    assert any(victim.name in w for w in data["warnings"])


def test_device_decode_scales_16_bit_and_refuses_bombs(tmp_path, monkeypatch):
    """``--decode device`` (here on the CPU): same two rules as the PIL path."""
    from auditor.data import ProbeSet

    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    greys = [rng.integers(0, 256, (32, 32), dtype=np.uint8) for _ in range(4)]
    for i, g in enumerate(greys):
        Image.fromarray(g).save(root / f"g8_{i}.png")
        Image.fromarray(g.astype(np.uint16) * 257).save(root / f"g16_{i}.png")
    model = _grey_model()
    pre = Preprocessing(resize=None, crop=None, mean=None, std=None)
    _, tf = build_transform(pre, normalize=False)
    kw = dict(transform=tf, transform_desc=pre.plain(), model_hash="c", batch_size=4, device="cpu", top_k=3,
              progress=False, decode="device", preprocessing=pre, normalize=False)

    def run(prefix, **extra):
        probe = ProbeSet(root=root, paths=[f"{prefix}_{i}.png" for i in range(4)],
                         labels=np.zeros((4, 1), dtype=bool), concepts=["c"])
        return collect(model, ["act"], probe, **kw, **extra)

    a8 = np.asarray(run("g8").layers["act"].values)
    a16 = np.asarray(run("g16").layers["act"].values)
    assert np.allclose(a8[:, 0], [g.mean() / 255 for g in greys], atol=1e-5)
    assert np.allclose(a16, a8, atol=1e-6)
    Image.new("L", (80, 80), 7).save(root / "g8_2.png")  # 6,400 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    got = run("g8", on_bad_image="skip")
    assert list(got.ok) == [True, True, False, True] and "decompression-bomb" in got.bad[0][1]


def test_corrupt_cache_keeps_the_verdict(colour_args, capsys):
    """A flagged audit (exit 1) stays flagged when its cached activations are replaced by a
    valid array of another width or with other values: the cache is recomputed, not served."""
    from pathlib import Path

    args = ["run"] + colour_args + ["--formats", "json"]
    assert main(args) == 1
    capsys.readouterr()
    cache = Path(colour_args[colour_args.index("--cache-dir") + 1])
    values = _key_dir(cache) / "values-000.npy"
    original = np.load(values)
    np.save(values, np.zeros((original.shape[0], original.shape[1] - 1), dtype=np.float32))
    assert main(args) == 1
    assert "activation cache in" in capsys.readouterr().err
    np.save(values, np.zeros_like(original))
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "does not match its recorded sha256" in err and "recomputing" in err
    assert np.array_equal(np.load(values), original)
