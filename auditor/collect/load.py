"""Probe images into tensors: transforms, the datasets the DataLoader reads, batching.

:class:`ProbeImages` reads a :class:`~auditor.data.ProbeSet`'s files (decoded with
PIL, or as raw bytes for :mod:`.decode`); :class:`TensorImages` stands in for a probe
set whose images are not files. An unreadable image is reported with its reason,
never raised, so the run can skip it or stop with its name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from ..images import check_pixels, open_rgb
from ..models import Preprocessing

def build_transform(pre: Preprocessing, normalize: bool = True):
    from torchvision import transforms as T

    steps: list[Any] = []
    if pre.resize:
        mode = T.InterpolationMode.BICUBIC if getattr(pre, "interpolation", "bilinear") == "bicubic" \
            else T.InterpolationMode.BILINEAR
        steps.append(T.Resize(pre.resize, interpolation=mode, antialias=True))
    if pre.crop:
        steps.append(T.CenterCrop(pre.crop))
    geometry = T.Compose(list(steps))
    steps.append(T.ToTensor())
    if normalize and pre.mean is not None and pre.std is not None:
        steps.append(T.Normalize(pre.mean, pre.std))
    return geometry, T.Compose(steps)


class _Names(Sequence):
    """``paths`` of an in-memory source: 'memory[i]' for row i, without a list of N strings."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return f"memory[{i % self.n}]"


class TensorImages:
    """Probe images that are not files: a (N, C, H, W) tensor or a function ``i -> (C, H, W)``.

    Stands in for a :class:`~auditor.data.ProbeSet` in :func:`collect` (benchmarks,
    tests, images generated on the fly). ``fingerprint`` names the content for the
    cache key; it is required with a function and defaults to a hash of the tensor.
    ``transform``, if :func:`collect` is given one, is applied to each image tensor.
    """

    def __init__(self, images: torch.Tensor | Callable[[int], torch.Tensor], n: int | None = None,
                 fingerprint: str | None = None):
        if callable(images) and not isinstance(images, torch.Tensor):
            if n is None or fingerprint is None:
                raise ConfigError("TensorImages from a function needs n (the number of images) and a fingerprint")
            self._fn, self._tensor, self.n = images, None, int(n)
        else:
            t = torch.as_tensor(images)
            if t.dim() != 4:
                raise ConfigError(f"TensorImages expects a (N, C, H, W) tensor, got shape {tuple(t.shape)}")
            self._fn, self._tensor, self.n = None, t, t.shape[0]
        self._fingerprint = fingerprint
        self.root = Path("<memory>")
        self.paths = _Names(self.n)

    def __len__(self) -> int:
        return self.n

    def load(self, i: int) -> torch.Tensor:
        return self._tensor[i] if self._tensor is not None else self._fn(i)

    def full_path(self, i: int) -> Path:
        return self.root / self.paths[i]

    def image_fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256(f"{tuple(self._tensor.shape)}|{self._tensor.dtype}\n".encode())
            h.update(self._tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._fingerprint = "tensor:" + h.hexdigest()
        return self._fingerprint


class ProbeImages(Dataset):
    """Item ``i`` of ``indices`` -> (image tensor or None, probe row, error message or "").

    With ``raw=True`` the image is the file's bytes (a uint8 tensor), decoded later
    on the model's device.
    """

    def __init__(self, probe, transform, indices: Sequence[int] | None = None, raw: bool = False):
        self.probe = probe
        self.transform = transform
        self.indices = indices
        self.raw = raw

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.probe)

    def __getitem__(self, i: int):
        idx = int(self.indices[i]) if self.indices is not None else int(i)
        if hasattr(self.probe, "load"):  # in-memory images
            try:
                x = self.probe.load(idx)
                if self.transform is not None:
                    x = self.transform(x)
                return x, idx, ""
            except (OSError, ValueError, RuntimeError, IndexError) as exc:
                return None, idx, f"{type(exc).__name__}: {exc}"
        path = self.probe.full_path(idx)
        try:
            if self.raw:
                data = bytearray(Path(path).read_bytes())
                if not data:
                    raise ValueError("empty file")
                check_pixels(bytes(data))  # the device decoder has no decompression-bomb limit: the header says
                return torch.frombuffer(data, dtype=torch.uint8), idx, ""
            im = open_rgb(path)  # 16-bit scaled, not clipped; decompression bombs refused (a ValueError)
            x = self.transform(im) if self.transform is not None else _to_tensor(im)
            return x, idx, ""
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            return None, idx, f"{type(exc).__name__}: {exc}"


def _to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def collate(batch, stack: bool = True):
    """(stacked images or None | list of raw byte tensors, good rows, [(row, reason)] of failures)."""
    good = [b for b in batch if b[0] is not None]
    failed = [(b[1], b[2]) for b in batch if b[0] is None]
    if not stack:
        return [b[0] for b in good], [b[1] for b in good], failed
    shapes = {tuple(b[0].shape) for b in good}
    if len(shapes) > 1:
        raise DataError("probe images have different sizes after preprocessing "
                        f"({', '.join(str(s) for s in sorted(shapes)[:3])}); pass --resize and --crop "
                        "so every image reaches the model at the same size")
    x = torch.stack([b[0] for b in good]) if good else None
    return x, [b[1] for b in good], failed
