"""Shared fixtures: a hand-set colour model with a planted "stamp" artifact, its probe
set, and one audit of the embedded demo shared by the whole session."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HERE = Path(__file__).parent
DATA = HERE / "data"
COLOUR_MODEL = f"{DATA / 'colour_model.py'}:make"

BACKGROUNDS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230), "gray": (128, 128, 128)}


def make_colour_probe(root: Path, n: int = 160, seed: int = 0, size: int = 32) -> tuple[Path, Path]:
    """Images with one background colour each and, on ~30%, a magenta 'stamp' patch.

    Returns (images folder, labels CSV). Concepts: red, green, blue, gray, stamp, noisy.
    """
    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = list(BACKGROUNDS)
    rows = []
    for i in range(n):
        bg = names[i % len(names)]
        img = np.empty((size, size, 3), dtype=np.float64)
        img[:] = BACKGROUNDS[bg]
        noisy = rng.random() < 0.5
        img += rng.normal(0, 12 if noisy else 3, img.shape)
        stamp = rng.random() < 0.3
        if stamp:
            s = int(rng.integers(8, 14))
            y, x = rng.integers(0, size - s, size=2)
            img[y:y + s, x:x + s] = (240, 10, 240)
        rel = f"{bg}/img_{i:04d}.png"
        (images / bg).mkdir(exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(images / rel)
        rows.append([rel] + [int(bg == c) for c in names] + [int(stamp), int(noisy)])
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path"] + names + ["stamp", "noisy"])
        w.writerows(rows)
    return images, labels


@pytest.fixture(scope="session")
def colour_probe(tmp_path_factory) -> tuple[Path, Path]:
    return make_colour_probe(tmp_path_factory.mktemp("colour-probe"))


@pytest.fixture()
def colour_args(colour_probe, tmp_path) -> list[str]:
    """`auditor run` flags for the colour model on its probe set (fresh cache and out)."""
    images, labels = colour_probe
    return ["--model", COLOUR_MODEL, "--layer", "act", "--images", str(images), "--labels", str(labels),
            "--artifacts", "stamp", "--no-normalize", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out"), "--bootstrap", "200", "--device", "cpu"]


@pytest.fixture(scope="session")
def demo_audit(tmp_path_factory):
    """One audit of the embedded demo, shared by every test that needs it: (result, out dir)."""
    from auditor.demo.run import demo_config
    from auditor.pipeline import run_audit, write_outputs

    base = tmp_path_factory.mktemp("demo")
    cfg = demo_config(out=str(base / "out"), device="cpu", cache_dir=str(base / "cache"))
    result = run_audit(cfg, progress=False)
    written = write_outputs(result, cfg.out, cfg.formats)
    return result, Path(cfg.out), written


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch, tmp_path):
    """Never touch the real user cache from tests."""
    monkeypatch.setenv("AUDITOR_CACHE_DIR", str(tmp_path / "user-cache"))
    os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture()
def one_torch_thread():
    """One torch thread for the test (restored after): tiny models gain nothing from threads, OpenMP
    spinning on a busy 2-core machine costs up to 50x, and torchrun's workers run with one too."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
