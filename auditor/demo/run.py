"""The configuration of ``auditor demo``: the embedded model, a generated probe set."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..config import AuditConfig, default_cache_dir, make_config

DEMO_PROBE_VERSION = 1
DEMO_N_IMAGES = 1000
DEMO_SEED = 1234  # probe-set seed; the model was trained on other seeds


def demo_probe_set(cache_dir: Path, n_images: int = DEMO_N_IMAGES, seed: int = DEMO_SEED,
                   log: Callable[[str], None] = lambda m: None) -> tuple[Path, Path]:
    """Generate (once) the demo probe set; return (images folder, labels CSV)."""
    from .data import make_probe_set

    root = Path(cache_dir) / "demo" / f"probe-v{DEMO_PROBE_VERSION}-n{n_images}-s{seed}"
    labels = root / "labels.csv"
    if not labels.is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        log(f"generating the demo probe set ({n_images} images) in {root}")
        tmp = Path(tempfile.mkdtemp(prefix=".probe-", dir=root.parent))
        try:
            made = make_probe_set(tmp, n=n_images, seed=seed)
            if root.exists():
                shutil.rmtree(root)
            os.replace(tmp, root)
            labels = root / Path(made).relative_to(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root / "images", labels


def demo_config(out: str | None = None, device: str = "auto", cache_dir: str | None = None,
                n_images: int | None = None, formats: str | None = None,
                log: Callable[[str], None] = lambda m: None) -> AuditConfig:
    from .model import DEMO_ARTIFACTS, DEMO_LAYER

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    images, labels = demo_probe_set(cache, n_images or DEMO_N_IMAGES, log=log)
    values = {
        "model": "auditor.demo.model:load_demo_model",
        "layer": DEMO_LAYER,
        "images": str(images),
        "labels": str(labels),
        "artifacts": tuple(DEMO_ARTIFACTS),
        "normalize": False,
        "device": device,
        "cache_dir": str(cache),
        "out": out or "auditor-demo",
        "fail_on_flag": False,
        # Formulas must cover at least 2% of the probe set (20 images): narrower ones
        # fit a handful of images by chance (see docs/demo.md).
        "min_fraction": 0.02,
        "title": "auditor demo: a small CNN with a planted watermark shortcut",
    }
    if formats:
        values["formats"] = formats
    return make_config(values, "the demo configuration")
