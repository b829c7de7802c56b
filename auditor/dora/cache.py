"""The s-AMS cache: one folder per key, written atomically, reused when every input matches.

The key covers what changes the images: the weights (:func:`auditor.collect.state_hash`),
the architecture (:func:`auditor.collect.architecture_hash`), the layer, the
reduction, the neurons, every :class:`~.generate.SamsParams` field, the input
normalisation, the device type, the PyTorch version and the generator's version. Change any of them and the
images are generated again; a folder whose array does not match its manifest is
ignored and overwritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..collect.files import atomic_write

CACHE_FORMAT = 1
#: Bump when the generation code changes what it makes (parameterisation, transforms, objective).
GENERATOR_VERSION = 2  # 2: redirected ReLU for silent neurons


def manifest(*, model_hash: str, architecture: str, layer: str, reduction: str, neurons: list[int],
             params: dict[str, Any], mean, std, device_type: str, torch_version: str) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "generator": GENERATOR_VERSION, "kind": "dora-sams", "model": model_hash,
            "architecture": architecture,
            "layer": layer, "reduction": reduction, "neurons": [int(k) for k in neurons], "params": params,
            "mean": list(mean) if mean is not None else None, "std": list(std) if std is not None else None,
            "device": device_type, "torch": torch_version}


def folder_for(cache_dir: str | os.PathLike, man: dict[str, Any]) -> tuple[str, Path]:
    from ..collect import cache_key

    key = cache_key(man)
    return key, Path(cache_dir) / "dora" / key


def load(folder: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    path = folder / "sams.npy"
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if arr.shape != tuple(shape) or arr.dtype != np.uint8:
        return None
    return arr


def save(folder: Path, man: dict[str, Any], sams: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "manifest.json", lambda fh: fh.write(json.dumps(man, indent=1, sort_keys=True).encode()))
    atomic_write(folder / "sams.npy", lambda fh: np.save(fh, sams, allow_pickle=False))  # last: the commit marker
