"""Collecting layers' activations over the probe set.

One forward pass per batch, with forward hooks on the audited layers that stop
the pass once every one of them has produced its output. Each layer's output is
reduced on the device, so only N×K numbers come back:

- (B, C, H, W) conv outputs: a reduction over the H×W positions (``mean``, ``max``);
- (B, T, D) transformer token outputs: ``cls`` (token 0), ``mean`` or ``max`` over
  tokens (a (T, B, D) sequence-first output is recognised by its batch axis);
- (B, D) linear outputs: as they are.

Reductions are registered by name (:func:`register_reduction`). While collecting,
a streaming top-k of the most-activating images per neuron is kept, with their
spatial maps (conv positions, or patch tokens laid out on the patch grid) pooled
to at most ``MAX_MAP_SIDE`` per side, so the report needs no second pass.

Storage. Work is done in chunks of ``chunk_size`` images; with a cache folder each
chunk is written atomically as it completes (the unit of resume: an interrupted
run continues from the last completed chunk, and a torn write is never read as
data). When every chunk is done, each layer's (N, K) float32 array is assembled
into ``values-NNN.npy`` and a ``summary.npz`` (read/unread images, top-k) is
written last, as the commit marker; the chunk files are then removed. Results
come back as read-only memory maps, so host memory does not grow with N. Without
a cache folder the same happens in a temporary folder that is removed at once
(the open memory maps keep their data on POSIX systems).

The cache key covers everything that changes the numbers: weights, architecture,
layers, reductions, preprocessing, precision and memory format, compilation,
the PyTorch version, top-k settings and the images (paths, sizes and mtimes, or
content hashes with ``fingerprint="content"``).

Throughput options: ``precision`` (autocast to bfloat16/float16, or TF32),
``channels_last``, pinned memory with non-blocking copies, one DataLoader for the
whole run (workers start once; ``prefetch_factor``), optional ``torch.compile``,
decoding JPEGs on the device (``decode="device"``: nvJPEG on CUDA), and an
out-of-memory backoff that halves the batch and carries on.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) chunks are sharded across
ranks round robin; each rank writes its chunks into the shared cache folder; after
a barrier rank 0 assembles them and returns the result, the other ranks return
``None``. See :mod:`auditor.distributed`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data import ProbeSet
from .errors import ConfigError, DataError, LayerError, ModelError
from .models import Preprocessing, resolve_layer

CACHE_FORMAT = 2
MAX_MAP_SIDE = 16  # spatial maps of top images are pooled down to at most this size
MAX_PREFIX_TOKENS = 8  # CLS, distillation and register tokens before the patch tokens
PRECISIONS = ("float32", "tf32", "bfloat16", "float16", "auto")
DECODERS = ("pil", "device")
FINGERPRINTS = ("stat", "content")
STALE_TMP_S = 3600.0  # leftover temp files older than this are removed

# -- reductions (registered by name) -------------------------------------------

#: name -> fn(x, dim) reducing the positions (spatial cells or tokens) along ``dim``
#: of a layer output to one float32 number per neuron: (B, K).
REDUCTIONS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {}
#: name -> the layer kinds it applies to ("spatial": (B, C, H, W); "tokens": (B, T, D)).
REDUCTION_KINDS: dict[str, frozenset[str]] = {}


def register_reduction(name: str, kinds: Sequence[str] = ("spatial", "tokens")):
    """Register ``fn(x, dim) -> (B, K) float32`` under ``name``.

    ``x`` is the layer output with its positions along ``dim``: (B, C, H·W) with
    ``dim=2`` for conv outputs, (B, T, D) with ``dim=1`` for token outputs.
    """
    def deco(fn: Callable[[torch.Tensor, int], torch.Tensor]):
        REDUCTIONS[name] = fn
        REDUCTION_KINDS[name] = frozenset(kinds)
        return fn
    return deco


@register_reduction("mean")
def _mean(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.mean(dim=dim, dtype=torch.float32)


@register_reduction("max")
def _max(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.amax(dim=dim).float()


@register_reduction("cls", kinds=("tokens",))
def _cls(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.select(dim, 0).float()


def layer_kind(ndim: int) -> str:
    return {2: "linear", 3: "tokens", 4: "spatial"}.get(ndim, "unsupported")


# -- images -----------------------------------------------------------------------

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


def content_fingerprint(probe: ProbeSet) -> str:
    """sha256 over every image file's bytes (and its relative path): stricter than size + mtime."""
    h = hashlib.sha256(b"content\n")
    for rel in probe.paths:
        f = hashlib.sha256()
        with open(probe.root / rel, "rb") as fh:
            while block := fh.read(1 << 20):
                f.update(block)
        h.update(f"{rel}\0{f.hexdigest()}\n".encode())
    return h.hexdigest()


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
                return torch.frombuffer(data, dtype=torch.uint8), idx, ""
            with Image.open(path) as im:
                im = im.convert("RGB")
                x = self.transform(im) if self.transform is not None else _to_tensor(im)
            return x, idx, ""
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            return None, idx, f"{type(exc).__name__}: {exc}"


def _to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def _collate(batch, stack: bool = True):
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


def _decode_on_device(datas: list[torch.Tensor], rows: list[int], dev: torch.device, pre: Preprocessing | None,
                      normalize: bool = True):
    """Decode raw image bytes on ``dev`` (nvJPEG on CUDA) and preprocess there.

    Returns (batch tensor or None, good rows, [(row, reason)] of failures).
    Non-JPEG files, and JPEGs the GPU decoder rejects, are decoded on the CPU.
    """
    import warnings

    with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; these decoders still work
        warnings.simplefilter("ignore", DeprecationWarning)
        return _decode_batch(datas, rows, dev, pre, normalize)


def _decode_batch(datas, rows, dev, pre, normalize):
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    from torchvision.transforms.v2 import functional as F

    imgs: list[torch.Tensor | None] = [None] * len(datas)
    failed: list[tuple[int, str]] = []
    jpeg = [i for i, d in enumerate(datas) if d.numel() > 2 and int(d[0]) == 0xFF and int(d[1]) == 0xD8]
    if dev.type == "cuda" and jpeg:
        try:
            out = decode_jpeg([datas[i] for i in jpeg], mode=ImageReadMode.RGB, device=dev)
            for i, im in zip(jpeg, out):
                imgs[i] = im
        except RuntimeError:
            pass  # one bad file fails the batch call: decode these one by one below
    for i, d in enumerate(datas):
        if imgs[i] is not None:
            continue
        try:
            imgs[i] = decode_image(d.cpu(), mode=ImageReadMode.RGB).to(dev, non_blocking=True)
        except (RuntimeError, ValueError) as exc:
            failed.append((rows[i], f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"))
    out_imgs, good = [], []
    for i, im in enumerate(imgs):
        if im is None:
            continue
        x = im.float()
        if pre is not None and pre.resize:
            x = F.resize(x, [pre.resize], antialias=True,
                         interpolation=F.InterpolationMode.BICUBIC if pre.interpolation == "bicubic"
                         else F.InterpolationMode.BILINEAR)
        if pre is not None and pre.crop:
            x = F.center_crop(x, [pre.crop])
        out_imgs.append(x)
        good.append(rows[i])
    if not out_imgs:
        return None, good, failed
    shapes = {tuple(x.shape) for x in out_imgs}
    if len(shapes) > 1:
        raise DataError("probe images have different sizes after preprocessing "
                        f"({', '.join(str(s) for s in sorted(shapes)[:3])}); pass --resize and --crop "
                        "so every image reaches the model at the same size")
    x = torch.stack(out_imgs).div_(255.0)
    if normalize and pre is not None and pre.mean is not None and pre.std is not None:
        mean = torch.tensor(pre.mean, device=dev, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(pre.std, device=dev, dtype=x.dtype).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x, good, failed


# -- hooks -------------------------------------------------------------------------

class _StopForward(Exception):
    """Raised by the hook once every audited layer has produced its output."""


@contextlib.contextmanager
def capture(model: nn.Module, layers: list[str], stop_early: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks that store each layer's output; always removed, mode restored.

    A module that runs several times in one forward pass is recorded at its first
    call. With ``stop_early`` the forward pass ends (by :class:`_StopForward`, which
    :func:`forward_until` swallows) as soon as every layer has been recorded, so the
    rest of the network is not computed.
    """
    store: dict[str, torch.Tensor] = {}
    handles = []
    was_training = model.training
    wanted = set(layers)
    try:
        for name in layers:
            module = resolve_layer(model, name)

            def hook(_m, _i, out, name=name):
                if name in store:
                    return
                if isinstance(out, (tuple, list)):
                    out = out[0]
                store[name] = out
                if stop_early and wanted <= store.keys():
                    raise _StopForward
            handles.append(module.register_forward_hook(hook))
        model.eval()
        yield store
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def forward_until(model: nn.Module | Callable, x: torch.Tensor) -> None:
    try:
        model(x)
    except _StopForward:
        pass


# -- reducing a layer's output ----------------------------------------------------------

class _MapSource:
    """Pooled spatial maps for chosen (image, neuron) pairs, extracted only when needed.

    ``take(b)`` with ``b`` (k, K) image positions in the batch -> (k, K, h, w) float32:
    neuron j's map on image ``b[i, j]``.
    """

    def __init__(self, out: torch.Tensor, kind: str, prefix: int = 0, side: int = 0):
        self.out, self.kind, self.prefix, self.side = out, kind, prefix, side

    def take(self, b: torch.Tensor) -> torch.Tensor:
        out = self.out
        if self.kind == "spatial":
            K = out.shape[1]
            maps = out[b, torch.arange(K, device=out.device).view(1, -1)]
        else:  # tokens (B, T, D): patch tokens laid out on the patch grid
            K = out.shape[2]
            G = self.side * self.side
            tok = (self.prefix + torch.arange(G, device=out.device)).view(1, 1, -1)
            maps = out[b.unsqueeze(-1), tok, torch.arange(K, device=out.device).view(1, -1, 1)]
            maps = maps.view(b.shape[0], K, self.side, self.side)
        maps = maps.float()
        h, w = maps.shape[-2:]
        if h > MAX_MAP_SIDE or w > MAX_MAP_SIDE:
            maps = torch.nn.functional.adaptive_avg_pool2d(maps, (min(h, MAX_MAP_SIDE), min(w, MAX_MAP_SIDE)))
        return maps

    def all(self) -> torch.Tensor:
        B, K = self.out.shape[0], (self.out.shape[1] if self.kind == "spatial" else self.out.shape[2])
        return self.take(torch.arange(B, device=self.out.device).view(-1, 1).expand(B, K))


def patch_grid(n_tokens: int) -> tuple[int, int] | None:
    """(prefix tokens, grid side) when ``n_tokens`` = a few prefix tokens + a square patch grid.

    Prefix tokens (CLS, distillation, registers) come first, at most
    ``MAX_PREFIX_TOKENS`` and fewer than the grid's side; otherwise None (no maps).
    """
    for prefix in range(0, MAX_PREFIX_TOKENS + 1):
        g = math.isqrt(max(n_tokens - prefix, 0))
        if g >= 2 and g * g == n_tokens - prefix and prefix < g:
            return prefix, g
    return None


def _reduce(out: Any, name: str, reduction: str, batch: int | None = None
            ) -> tuple[torch.Tensor, _MapSource | None, str, tuple[int, ...]]:
    """(B, K) float32 neuron values, a map source for the top images, the layer kind, per-image shape."""
    if not isinstance(out, torch.Tensor):
        raise LayerError(f"layer {name!r} returned {type(out).__name__}, not a tensor; pick another layer")
    kind = layer_kind(out.dim())
    if kind == "unsupported":
        raise LayerError(f"layer {name!r} has output shape {tuple(out.shape)}; supported: (B, C, H, W) conv, "
                         "(B, T, D) token and (B, D) linear outputs")
    if kind != "linear" and kind not in REDUCTION_KINDS[reduction]:
        what = {"spatial": "a (B, C, H, W) conv output", "tokens": "a (B, T, D) token output"}[kind]
        fits = sorted(r for r, kinds in REDUCTION_KINDS.items() if kind in kinds)
        raise LayerError(f"reduction {reduction!r} does not apply to layer {name!r}, which has {what} "
                         f"{tuple(out.shape)}; use one of {fits}")
    if kind == "linear":
        return out.float(), None, kind, tuple(out.shape[1:])
    if kind == "spatial":
        values = REDUCTIONS[reduction](out.flatten(2), 2)
        return values, _MapSource(out, "spatial"), kind, tuple(out.shape[1:])
    # tokens: batch first (B, T, D); a sequence-first (T, B, D) output is turned around
    if batch is not None and out.shape[0] != batch and out.shape[1] == batch:
        out = out.transpose(0, 1)
    values = REDUCTIONS[reduction](out, 1)
    grid = patch_grid(out.shape[1])
    maps = _MapSource(out, "tokens", *grid) if grid else None
    return values, maps, kind, tuple(out.shape[1:])


def reduce_output(out: torch.Tensor, name: str, reduction: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, K) neuron values and, where the layer has a spatial layout, (B, K, h, w) maps."""
    values, maps, _, _ = _reduce(out, name, reduction)
    return values, (maps.all() if maps is not None else None)


class TopK:
    """Streaming top-k rows per neuron (values, probe indices, optional maps).

    Order: highest value first, ties by the lower probe index, so the result does
    not depend on batch or chunk boundaries. :meth:`propose` computes the next state
    without changing this one; :meth:`commit` adopts it (an out-of-memory retry can
    drop a proposal).
    """

    def __init__(self, k: int):
        self.k = k
        self.values: torch.Tensor | None = None  # (k', K)
        self.index: torch.Tensor | None = None  # (k', K) int64
        self.maps: torch.Tensor | None = None  # (k', K, h, w) float32

    def propose(self, values: torch.Tensor, index: torch.Tensor, maps: _MapSource | torch.Tensor | None):
        if self.k == 0:
            return None
        # values (B, K); index (B,) probe rows
        idx = index.view(-1, 1).expand_as(values)
        kprev = 0 if self.values is None else self.values.shape[0]
        if kprev:
            values = torch.cat([self.values, values])
            idx = torch.cat([self.index, idx])
        k = min(self.k, values.shape[0])
        order = torch.argsort(idx, dim=0, stable=True)
        order = torch.gather(order, 0, torch.argsort(-torch.gather(values, 0, order), dim=0, stable=True))
        sel = order[:k]
        new_maps = None
        if maps is not None:
            K = values.shape[1]
            cols = torch.arange(K, device=sel.device).view(1, -1)
            from_batch = (sel - kprev).clamp_min(0)
            if isinstance(maps, torch.Tensor):
                fresh = maps[from_batch, cols].float()
            else:
                fresh = maps.take(from_batch)
            if kprev and self.maps is not None:
                old = self.maps[sel.clamp_max(kprev - 1), cols]
                new_maps = torch.where((sel < kprev).view(*sel.shape, 1, 1), old, fresh)
            else:
                new_maps = fresh
        return torch.gather(values, 0, sel), torch.gather(idx, 0, sel), new_maps

    def commit(self, state) -> None:
        if state is not None:
            self.values, self.index, self.maps = state

    def update(self, values: torch.Tensor, index: torch.Tensor, maps: _MapSource | torch.Tensor | None) -> None:
        self.commit(self.propose(values, index, maps))

    def numpy(self) -> dict[str, np.ndarray]:
        if self.values is None:
            return {}
        out = {"top_values": self.values.cpu().numpy().astype(np.float32),
               "top_index": self.index.cpu().numpy().astype(np.int64)}
        if self.maps is not None:
            maps = self.maps.cpu().numpy()
            # float16 halves the cache; activations beyond its range keep float32
            small = maps.size == 0 or float(np.nanmax(np.abs(maps))) < 60000.0
            out["top_maps"] = maps.astype(np.float16) if small else maps.astype(np.float32)
        return out


def _merge_top(parts: list[dict[str, np.ndarray]], k: int) -> dict[str, np.ndarray | None]:
    """Top-k of the union of several top-k's (same order as :class:`TopK`)."""
    parts = [p for p in parts if p and p.get("top_values") is not None]
    if k == 0 or not parts:
        return {"top_index": None, "top_values": None, "top_maps": None}
    vals = np.concatenate([p["top_values"] for p in parts])
    idx = np.concatenate([p["top_index"] for p in parts])
    has_maps = all(p.get("top_maps") is not None for p in parts)
    maps = np.concatenate([p["top_maps"] for p in parts]) if has_maps else None
    K = vals.shape[1]
    kk = min(k, vals.shape[0])
    order = np.lexsort((idx, -vals), axis=0)[:kk]  # value desc, then probe index asc
    cols = np.arange(K)[None, :]
    return {"top_index": idx[order, cols], "top_values": vals[order, cols],
            "top_maps": maps[order, cols] if maps is not None else None}


# -- results -------------------------------------------------------------------------

@dataclass
class LayerActivations:
    name: str
    values: np.ndarray  # (N, K) float32, rows in probe order (unread images: NaN rows); a read-only memmap
    output_shape: tuple[int, ...]
    top_index: np.ndarray | None = None  # (k, K) probe rows, best first
    top_values: np.ndarray | None = None  # (k, K)
    top_maps: np.ndarray | None = None  # (k, K, h, w) float16
    kind: str | None = None  # "spatial" (B, C, H, W), "tokens" (B, T, D) or "linear" (B, D)
    reduction: str | None = None  # the reduction applied ("mean", "max", "cls"; linear layers: none needed)


@dataclass
class Collected:
    layers: dict[str, LayerActivations]
    ok: np.ndarray  # (N,) bool: image was read
    bad: list[tuple[str, str]]  # (path, reason) of unreadable images
    cache: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    device: str = "cpu"
    images_per_second: float = 0.0
    precision: str = "float32"  # the precision actually used ("auto" resolved)
    batch_size: int = 0  # the batch size in use at the end (smaller than asked after out-of-memory backoff)
    world_size: int = 1  # processes that computed the activations (torchrun)


# -- cache keys ----------------------------------------------------------------------------

def state_hash(model: nn.Module) -> str:
    """sha256 of the model's parameters and buffers (names, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def architecture_hash(model: nn.Module) -> str:
    """sha256 of what the weights do not show: the module tree with its hyperparameters
    (strides, activations, …), the model's class, and TorchScript code."""
    h = hashlib.sha256()
    cls = type(model)
    h.update(f"{cls.__module__}.{cls.__qualname__}\n".encode())
    h.update(repr(model).encode())
    code = getattr(model, "code", None)
    if isinstance(code, str):
        h.update(code.encode())
    return h.hexdigest()


def cache_key(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_chunk(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:
        return None  # unreadable chunk: recompute it


def _chunk_valid(chunk: dict[str, np.ndarray] | None, n: int, n_layers: int) -> bool:
    if chunk is None or "ok" not in chunk or len(chunk["ok"]) != n:
        return False
    for li in range(n_layers):
        v = chunk.get(f"L{li}/values")
        if v is None or v.ndim != 2 or v.shape[0] != n:
            return False
    return True


def _clean_stale_tmp(folder: Path) -> None:
    now = time.time()
    for p in folder.glob(".tmp-*"):
        try:
            if now - p.stat().st_mtime > STALE_TMP_S:
                p.unlink()
        except OSError:
            pass


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
    return torch.device(device)


def resolve_precision(precision: str, dev: torch.device) -> str:
    """The precision to run at; ``auto`` is float32 on every device, for now.

    ``auto`` is where a measured policy goes. Measured so far (docs/activations.md,
    ``bench/bench_activations.py precision --demo``): under bfloat16 autocast the demo
    audit lost 2 of its 64 neurons' artifact flags, under float16 one, so reduced
    precision is not on by default anywhere: ask for ``bfloat16`` (or ``tf32``)
    explicitly, and check your model with the precision benchmark first.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
    if precision == "auto":
        return "float32"
    return precision


def _numerics(precision: str, dev: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for bfloat16/float16; TF32 on or off (CUDA) for float32/tf32, restored afterwards."""
    stack = contextlib.ExitStack()
    if dev.type == "cuda":
        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)

        def restore():
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
        stack.callback(restore)
        tf32 = precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    return stack


def _autocast(precision: str, dev: torch.device):
    if precision in ("bfloat16", "float16"):
        return torch.autocast(device_type=dev.type, dtype=getattr(torch, precision))
    return contextlib.nullcontext()


def _normalise_reductions(reduction: str | Mapping[str, str], layers: list[str]) -> dict[str, str]:
    if isinstance(reduction, str):
        per = {name: reduction for name in layers}
    else:
        unknown = sorted(set(reduction) - set(layers))
        if unknown:
            raise ConfigError(f"reduction given for {unknown}, which are not among the audited layers {layers}")
        per = {name: reduction.get(name, "mean") for name in layers}
    for name, red in per.items():
        if red not in REDUCTIONS:
            raise ConfigError(f"unknown reduction {red!r} for layer {name!r}; available: {sorted(REDUCTIONS)}")
    return per


# -- assembling the final arrays ----------------------------------------------------------

def _values_file(folder: Path, li: int) -> Path:
    return folder / f"values-{li:03d}.npy"


class _Assembler:
    """Writes chunks' rows into each layer's (N, K) ``.npy`` (under a temp name) and merges top-k;
    :meth:`commit` renames the arrays into place and writes ``summary.npz`` last."""

    def __init__(self, folder: Path, layers: list[str], n: int, k: int):
        self.folder, self.layers, self.n, self.k = folder, layers, n, k
        self.ok = np.zeros(n, dtype=bool)
        self.seen = np.zeros(n, dtype=bool)
        self.bad_index: list[int] = []
        self.bad_reason: list[str] = []
        self.files: dict[int, tuple[Path, int, int, int]] = {}  # li -> (tmp path, fd, data offset, K)
        self.meta: dict[int, dict[str, np.ndarray]] = {}
        self.tops: dict[int, dict[str, np.ndarray | None]] = {}

    def _open(self, li: int, K: int) -> tuple[Path, int, int, int]:
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-values-", suffix=".npy")
        os.close(fd)
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(self.n, K))
        offset = int(mm.offset)
        del mm
        # Rows go in with plain positional writes, not through the mapping: written
        # pages then live in the page cache, not in this process's resident memory.
        fd = os.open(tmp, os.O_RDWR)
        self.files[li] = (Path(tmp), fd, offset, K)
        return self.files[li]

    def add(self, start: int, chunk: dict[str, np.ndarray]) -> None:
        n = len(chunk["ok"])
        self.ok[start:start + n] = chunk["ok"]
        self.seen[start:start + n] = True
        self.bad_index.extend(int(i) for i in chunk.get("bad_index", []))
        self.bad_reason.extend(str(r) for r in chunk.get("bad_reason", []))
        for li in range(len(self.layers)):
            vals = np.ascontiguousarray(chunk[f"L{li}/values"], dtype=np.float32)
            _, fd, offset, K = self.files.get(li) or self._open(li, vals.shape[1])
            if vals.shape[1] != K:
                raise LayerError(f"layer {self.layers[li]!r} gave {vals.shape[1]} neurons in one chunk and {K} in "
                                 "another; its output size must not depend on the input")
            _pwrite_all(fd, memoryview(vals).cast("B"), offset + start * K * 4)
            self.meta[li] = {key: chunk[f"L{li}/{key}"] for key in ("shape", "kind", "reduction")
                             if f"L{li}/{key}" in chunk}
            part = {key: chunk.get(f"L{li}/{key}") for key in ("top_values", "top_index", "top_maps")}
            self.tops[li] = _merge_top([self.tops.get(li) or {}, part], self.k)

    def commit(self) -> None:
        if not self.seen.all():
            raise RuntimeError(f"internal error: {int((~self.seen).sum())} rows were never assembled")
        for li, (tmp, fd, _, _) in sorted(self.files.items()):
            os.fsync(fd)
            os.close(fd)
            os.replace(tmp, _values_file(self.folder, li))
        self.files = {}
        arrays: dict[str, np.ndarray] = {
            "format": np.asarray(CACHE_FORMAT), "n": np.asarray(self.n), "ok": self.ok,
            "layers": np.asarray(self.layers, dtype=str),
            "bad_index": np.asarray(self.bad_index, dtype=np.int64),
            "bad_reason": np.asarray(self.bad_reason, dtype=str)}
        for li in range(len(self.layers)):
            for key, v in self.meta[li].items():
                arrays[f"L{li}/{key}"] = v
            for key, v in self.tops[li].items():
                if v is not None:
                    arrays[f"L{li}/{key}"] = v
        _atomic_savez(self.folder / "summary.npz", **arrays)

    def abort(self) -> None:
        for tmp, fd, _, _ in self.files.values():
            with contextlib.suppress(OSError):
                os.close(fd)
            tmp.unlink(missing_ok=True)
        self.files = {}


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data[:1 << 30], offset)
        data, offset = data[n:], offset + n


def _load_final(folder: Path, layers: list[str], n: int) -> tuple[dict[str, LayerActivations], dict] | None:
    """The committed result in ``folder`` (memory-mapped), or None if absent or unusable."""
    summary = _load_chunk(folder / "summary.npz") if (folder / "summary.npz").exists() else None
    if summary is None:
        return None
    try:
        if list(summary["layers"]) != list(layers) or int(summary["n"]) != n or len(summary["ok"]) != n:
            return None
        out: dict[str, LayerActivations] = {}
        for li, name in enumerate(layers):
            values = np.load(_values_file(folder, li), mmap_mode="r")
            if values.dtype != np.float32 or values.ndim != 2 or values.shape[0] != n:
                return None
            get = summary.get
            out[name] = LayerActivations(
                name=name, values=values, output_shape=tuple(int(s) for s in summary[f"L{li}/shape"]),
                top_index=get(f"L{li}/top_index"), top_values=get(f"L{li}/top_values"),
                top_maps=get(f"L{li}/top_maps"),
                kind=str(summary[f"L{li}/kind"]) if f"L{li}/kind" in summary else None,
                reduction=str(summary[f"L{li}/reduction"]) if f"L{li}/reduction" in summary else None)
    except (OSError, ValueError, KeyError):
        return None
    return out, {"ok": summary["ok"].astype(bool), "bad_index": summary["bad_index"],
                 "bad_reason": summary["bad_reason"]}


# -- the run ---------------------------------------------------------------------------------

class _BatchPlan:
    """Batches (lists of probe rows) of the chunks to compute, never crossing a chunk boundary;
    usable as a DataLoader ``batch_sampler``. ``with_chunks()`` yields (chunk, rows)."""

    def __init__(self, chunks: list[tuple[int, int]], todo: list[int], batch_size: int):
        self.chunks, self.todo, self.batch_size = chunks, todo, batch_size

    def with_chunks(self) -> Iterator[tuple[int, list[int]]]:
        for ci in self.todo:
            start, stop = self.chunks[ci]
            for s in range(start, stop, self.batch_size):
                yield ci, list(range(s, min(s + self.batch_size, stop)))

    def __iter__(self) -> Iterator[list[int]]:
        return (rows for _, rows in self.with_chunks())

    def __len__(self) -> int:
        return sum(math.ceil((self.chunks[ci][1] - self.chunks[ci][0]) / self.batch_size) for ci in self.todo)


class _Runner:
    """Computes chunks: forward passes, reductions, top-k, out-of-memory backoff."""

    def __init__(self, model, layers, reductions, probe, transform, dev, *, precision, channels_last, compiled,
                 batch_size, workers, pin_memory, prefetch_factor, top_k, decode, preprocessing, normalize,
                 on_bad_image, log, bar):
        self.model, self.layers, self.reductions = model, layers, reductions
        self.probe, self.transform, self.dev = probe, transform, dev
        self.precision, self.channels_last, self.compiled = precision, channels_last, compiled
        self.batch_size, self.micro = batch_size, batch_size
        self.workers, self.pin_memory, self.prefetch_factor = workers, pin_memory, prefetch_factor
        self.top_k, self.decode, self.preprocessing, self.normalize = top_k, decode, preprocessing, normalize
        self.on_bad_image, self.log, self.bar = on_bad_image, log, bar
        self.images_done = 0

    def loader(self, plan: _BatchPlan) -> DataLoader:
        raw = self.decode == "device"
        ds = ProbeImages(self.probe, None if raw else self.transform, raw=raw)
        # One loader spans every chunk of the run, so its worker processes start once and
        # live until the last batch (what persistent_workers gives across epochs).
        kw: dict[str, Any] = {}
        if self.workers > 0:
            kw = {"prefetch_factor": self.prefetch_factor, "persistent_workers": False}
        return DataLoader(ds, batch_sampler=plan, num_workers=self.workers,
                          collate_fn=functools.partial(_collate, stack=not raw),
                          pin_memory=self.pin_memory and self.dev.type == "cuda", **kw)

    @torch.inference_mode()
    def run(self, chunks: list[tuple[int, int]], todo: list[int],
            on_chunk: Callable[[int, dict[str, np.ndarray]], None]) -> None:
        if not todo:
            return
        plan = _BatchPlan(chunks, todo, self.batch_size)
        forward = self.model
        if self.compiled:
            backend = self.compiled if isinstance(self.compiled, str) else "inductor"
            forward = torch.compile(self.model, backend=backend)
        cur: int | None = None
        state: dict[str, Any] = {}
        with capture(self.model, self.layers, stop_early=True) as store, _numerics(self.precision, self.dev):
            self.store, self.forward = store, forward
            for (ci, rows_all), (x, rows, failed) in zip(plan.with_chunks(), self.loader(plan)):
                if ci != cur:
                    if cur is not None:
                        on_chunk(cur, self._finish(state))
                    cur = ci
                    state = self._begin(*chunks[ci])
                for i, why in failed:
                    state["bad"].append((i, why))
                    if self.on_bad_image == "error":
                        raise DataError(f"cannot read image {self.probe.root / self.probe.paths[i]}: {why}; fix or "
                                        "remove it, or set on_bad_image: skip to leave unreadable images out")
                if self.decode == "device" and x:
                    # decode_jpeg takes the bytes on the CPU, whatever device decodes them
                    x, rows, more = _decode_on_device(x, rows, self.dev, self.preprocessing, self.normalize)
                    for i, why in more:
                        state["bad"].append((i, why))
                        if self.on_bad_image == "error":
                            raise DataError(f"cannot read image {self.probe.root / self.probe.paths[i]}: {why}; "
                                            "fix or remove it, or set on_bad_image: skip")
                elif self.decode == "device":
                    x = None
                if x is not None and len(rows):
                    self._batch(x, rows, state)
                self.images_done += len(rows)
                self.bar.update(len(rows_all))
            if cur is not None:
                on_chunk(cur, self._finish(state))

    def _begin(self, start: int, stop: int) -> dict[str, Any]:
        return {"start": start, "n": stop - start, "values": {}, "meta": {},
                "tops": {name: TopK(self.top_k) for name in self.layers},
                "ok": torch.zeros(stop - start, dtype=torch.bool, device=self.dev), "bad": []}

    def _batch(self, x: torch.Tensor, rows: list[int], state: dict[str, Any]) -> None:
        x = x.to(self.dev, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        rows_t = torch.as_tensor(rows, dtype=torch.long).to(self.dev, non_blocking=True)
        pos, B = 0, x.shape[0]
        while pos < B:
            bs = min(self.micro, B - pos)
            try:
                proposal = self._forward(x[pos:pos + bs], rows_t[pos:pos + bs], state)
            except torch.OutOfMemoryError:
                self.store.clear()
                if self.dev.type == "cuda":
                    torch.cuda.empty_cache()
                if bs <= 1:
                    raise ModelError(f"out of memory on {self.dev} even with a batch of one image; audit an "
                                     "earlier layer, use a smaller input size or precision bfloat16") from None
                self.micro = max(1, bs // 2)
                self.log(f"out of memory on {self.dev} with a batch of {bs} images; continuing with batches "
                         f"of {self.micro}")
                continue
            self._commit(proposal, rows_t[pos:pos + bs], state)
            pos += bs

    def _forward(self, x: torch.Tensor, rows: torch.Tensor, state: dict[str, Any]):
        self.store.clear()
        try:
            with _autocast(self.precision, self.dev):
                forward_until(self.forward, x)
        except (DataError, torch.OutOfMemoryError):
            raise
        except RuntimeError as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"the model's forward pass failed on a batch of shape {tuple(x.shape)}: "
                             f"{msg[:300]} — check --resize/--crop and the model's expected input") from None
        out = {}
        for name in self.layers:
            if name not in self.store:
                raise LayerError(f"layer {name!r} was not called during the forward pass; pick a layer "
                                 "that the model's forward uses")
            values, maps, kind, shape = _reduce(self.store[name], name, self.reductions[name], x.shape[0])
            out[name] = (values, state["tops"][name].propose(values, rows, maps), kind, shape)
        self.store.clear()
        return out

    def _commit(self, proposal, rows: torch.Tensor, state: dict[str, Any]) -> None:
        local = rows - state["start"]
        for name, (values, top, kind, shape) in proposal.items():
            if name not in state["values"]:
                state["values"][name] = torch.full((state["n"], values.shape[1]), float("nan"),
                                                   dtype=torch.float32, device=self.dev)
                state["meta"][name] = (kind, shape)
            elif state["values"][name].shape[1] != values.shape[1]:
                raise LayerError(f"layer {name!r} gave {values.shape[1]} neurons on one batch and "
                                 f"{state['values'][name].shape[1]} on another")
            state["values"][name][local] = values
            state["tops"][name].commit(top)
        state["ok"][local] = True

    def _finish(self, state: dict[str, Any]) -> dict[str, np.ndarray]:
        ok = state["ok"].cpu().numpy()
        bad = state["bad"]
        chunk: dict[str, np.ndarray] = {"ok": ok, "bad_index": np.asarray([i for i, _ in bad], dtype=np.int64),
                                        "bad_reason": np.asarray([r for _, r in bad], dtype=str)}
        start, n = state["start"], state["n"]
        for li, name in enumerate(self.layers):
            if name not in state["values"]:  # every image in the chunk was unreadable
                raise DataError(f"no image between rows {start} and {start + n} could be read")
            values = state["values"][name].cpu().numpy()
            if not np.isfinite(values[ok]).all():
                raise ModelError(f"layer {name!r} produced non-finite activations (inf or NaN) on images "
                                 f"{start}–{start + n - 1}" + (f" at precision {self.precision}; use float32 or "
                                                               "bfloat16" if self.precision == "float16" else ""))
            kind, shape = state["meta"][name]
            chunk[f"L{li}/values"] = values
            chunk[f"L{li}/shape"] = np.asarray(shape, dtype=np.int64)
            chunk[f"L{li}/kind"] = np.asarray(kind)
            chunk[f"L{li}/reduction"] = np.asarray(self.reductions[name] if kind != "linear" else "none")
            for key, v in state["tops"][name].numpy().items():
                chunk[f"L{li}/{key}"] = v
        return chunk


def collect(model: nn.Module, layers: list[str], probe: ProbeSet | TensorImages, *, transform,
            transform_desc: dict[str, Any], model_hash: str, reduction: str | Mapping[str, str] = "mean",
            batch_size: int = 64, workers: int = 0, device: str = "auto", top_k: int = 9,
            cache_dir: Path | None = None, chunk_size: int = 2048, on_bad_image: str = "error",
            log: Callable[[str], None] = lambda m: None, progress: bool = True,
            precision: str = "float32", channels_last: bool = False, compile: bool | str = False,
            pin_memory: bool = True, prefetch_factor: int = 2, decode: str = "pil",
            preprocessing: Preprocessing | None = None, normalize: bool = True, fingerprint: str = "stat",
            distributed: bool | None = None, scratch_dir: Path | None = None) -> Collected | None:
    """Run the model over the probe set and return each layer's (N, K) activations.

    Returns None on the ranks other than 0 of a distributed (torchrun) run.

    Keyword arguments beyond the original ones (all optional):

    - ``reduction``: a name for every layer, or ``{layer: name}`` (others: ``mean``).
      ``cls`` takes token 0 of a (B, T, D) output; linear (B, D) outputs need none.
    - ``precision``: ``float32`` (strict: TF32 off on CUDA), ``tf32``, ``bfloat16``,
      ``float16`` (autocast) or ``auto`` (float32 today: reduced precision changed demo flags,
      see :func:`resolve_precision`). Part of the cache key.
    - ``channels_last``: model and inputs in channels-last memory format (faster convs on GPUs).
    - ``compile``: ``torch.compile`` the model (True: inductor; or a backend name).
    - ``pin_memory``, ``prefetch_factor``: DataLoader settings (pinning only on CUDA;
      prefetching only with ``workers`` > 0, whose processes live for the whole run).
    - ``decode``: ``pil`` (in the DataLoader) or ``device`` (raw bytes in the loader,
      decoded and resized on the model's device: nvJPEG on CUDA); ``device`` needs
      ``preprocessing`` (and ``normalize``) instead of ``transform``.
    - ``fingerprint``: ``stat`` (paths, sizes, mtimes) or ``content`` (file hashes).
    - ``distributed``: None = follow torchrun's ``WORLD_SIZE``; False = single process.
      A distributed run needs ``cache_dir`` on storage every rank shares.
    - ``scratch_dir``: where the temporary arrays go when there is no cache folder.
    """
    t0 = time.perf_counter()
    reductions = _normalise_reductions(reduction, list(layers))
    _check_args(batch_size=batch_size, chunk_size=chunk_size, top_k=top_k, workers=workers,
                prefetch_factor=prefetch_factor, on_bad_image=on_bad_image, decode=decode,
                fingerprint=fingerprint, preprocessing=preprocessing)
    for name in layers:
        resolve_layer(model, name)
    from . import distributed as _dist

    wants_dist = _dist.is_distributed() if distributed is None else bool(distributed)
    if wants_dist and cache_dir is None:
        raise ConfigError(f"a distributed run (WORLD_SIZE={os.environ.get('WORLD_SIZE', '?')}) needs a cache "
                          "folder that every rank can read and write: pass --cache-dir on shared storage "
                          "(and do not pass --no-cache)")
    dev = resolve_device(device)
    dinfo = _dist.setup(dev.type) if wants_dist else None
    try:
        if dinfo is not None and dev.type == "cuda":
            dev = torch.device("cuda", dinfo.local_rank)
        return _collect(model, list(layers), probe, reductions, dev, dinfo, t0, transform=transform,
                        transform_desc=transform_desc, model_hash=model_hash, batch_size=batch_size,
                        workers=workers, top_k=top_k, cache_dir=cache_dir, chunk_size=chunk_size,
                        on_bad_image=on_bad_image, log=log, progress=progress, precision=precision,
                        channels_last=channels_last, compile=compile, pin_memory=pin_memory,
                        prefetch_factor=prefetch_factor, decode=decode, preprocessing=preprocessing,
                        normalize=normalize, fingerprint=fingerprint, scratch_dir=scratch_dir)
    finally:
        if dinfo is not None:
            dinfo.teardown()


def _check_args(**kw) -> None:
    for name in ("batch_size", "chunk_size", "prefetch_factor"):
        if not isinstance(kw[name], int) or kw[name] < 1:
            raise ConfigError(f"{name} must be a positive integer, got {kw[name]!r}")
    for name in ("top_k", "workers"):
        if not isinstance(kw[name], int) or kw[name] < 0:
            raise ConfigError(f"{name} must be a non-negative integer, got {kw[name]!r}")
    choices = {"on_bad_image": ("error", "skip"), "decode": DECODERS, "fingerprint": FINGERPRINTS}
    for name, allowed in choices.items():
        if kw[name] not in allowed:
            raise ConfigError(f"{name} must be one of {list(allowed)}, got {kw[name]!r}")
    if kw["decode"] == "device" and kw["preprocessing"] is None:
        raise ConfigError("decode='device' resizes and normalises on the device: pass preprocessing= "
                          "(the Preprocessing the transform was built from)")


def _collect(model, layers, probe, reductions, dev, dinfo, t0, *, transform, transform_desc, model_hash, batch_size,
             workers, top_k, cache_dir, chunk_size, on_bad_image, log, progress, precision, channels_last, compile,
             pin_memory, prefetch_factor, decode, preprocessing, normalize, fingerprint, scratch_dir):
    N = len(probe)
    if N == 0:
        raise DataError("the probe set has no images")
    precision = resolve_precision(precision, dev)
    main = dinfo is None or dinfo.is_main
    world = 1 if dinfo is None else dinfo.world
    if fingerprint == "content" and isinstance(probe, ProbeSet):
        images_fp = content_fingerprint(probe)
    else:
        images_fp = probe.image_fingerprint()
    manifest = {"format": CACHE_FORMAT, "model": model_hash, "architecture": architecture_hash(model),
                "layers": list(layers), "reduction": reductions, "transform": transform_desc,
                "transform_repr": repr(transform), "decode": decode, "normalize": normalize if decode == "device"
                else None, "images": images_fp, "fingerprint": fingerprint, "n": N, "top_k": top_k,
                "precision": precision, "channels_last": bool(channels_last), "compile": compile or False,
                "torch": torch.__version__.split("+")[0], "chunk_size": chunk_size, "max_map_side": MAX_MAP_SIDE,
                "max_prefix_tokens": MAX_PREFIX_TOKENS}
    key = cache_key(manifest)
    if dinfo is not None:
        keys = dinfo.gather(key)
        if len(set(keys)) > 1:
            differ = [r for r, k in enumerate(keys) if k != keys[0]]
            raise ConfigError(f"ranks {differ} computed a different activation cache key than rank 0: they see "
                              "different weights, images or settings (a model with random weights differs per "
                              "rank: pass --weights)")

    scratch: Path | None = None
    if cache_dir is not None:
        folder = Path(cache_dir) / key
        if main:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                _atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True,
                                                                        default=str))
            except OSError as exc:
                raise ConfigError(f"cannot write the activation cache in {cache_dir}: {exc}; "
                                  "pass --cache-dir to a writable folder or --no-cache") from None
            _clean_stale_tmp(folder)
    else:
        scratch = Path(tempfile.mkdtemp(prefix="auditor-activations-", dir=scratch_dir))
        folder = scratch
    chunks = [(s, min(s + chunk_size, N)) for s in range(0, N, chunk_size)]

    def chunk_path(ci: int) -> Path:
        return folder / f"chunk-{ci:05d}.npz"

    try:
        # -- a committed result: reuse it
        final = _load_final(folder, layers, N) if (main and scratch is None) else None
        if dinfo is not None:
            hit = dinfo.broadcast(final is not None)
            sees = (folder / "manifest.json").is_file()
            seen = dinfo.gather(sees)
            if not all(seen):
                raise ConfigError(f"ranks {[r for r, s in enumerate(seen) if not s]} cannot see the cache folder "
                                  f"{folder} written by rank 0; every rank needs the same shared --cache-dir")
            if hit and not main:
                return None
        if final is not None:
            log(f"activation cache hit: {N} images × {len(layers)} layer(s) reused from {folder}")
            return _result(final, probe, on_bad_image, dev, precision, batch_size, world, t0, 0,
                           {"status": "hit", "key": key, "dir": str(folder), "chunks": len(chunks),
                            "reused": len(chunks), "images_fingerprint": images_fp})

        # -- chunks: reuse the committed ones, compute the rest (this rank's share)
        mine = list(range(len(chunks))) if dinfo is None else dinfo.shard(list(range(len(chunks))))
        reused: list[int] = []
        todo: list[int] = []
        for ci in mine:
            path = chunk_path(ci)
            if scratch is None and path.exists():
                start, stop = chunks[ci]
                if _chunk_valid(_load_chunk(path), stop - start, len(layers)):
                    reused.append(ci)
                    continue
            todo.append(ci)
        n_todo = sum(chunks[ci][1] - chunks[ci][0] for ci in todo)
        n_reused_all = len(reused) if dinfo is None else sum(dinfo.gather(len(reused)))
        if main and scratch is None:
            if n_reused_all:
                log(f"activation cache partial: {n_reused_all}/{len(chunks)} chunk(s) reused from {folder}"
                    + (f"; computing the rest across {world} ranks" if dinfo else ""))
            else:
                log(f"activation cache miss: computing {N} images into {folder}"
                    + (f" across {world} ranks" if dinfo else ""))

        asm = _Assembler(folder, layers, N, top_k) if dinfo is None else None
        try:
            if asm is not None:
                for ci in reused:
                    asm.add(chunks[ci][0], _load_chunk(chunk_path(ci)))
            compute_s, batch_used = _compute(model, layers, reductions, probe, transform, dev, chunks, todo, asm, folder,
                               scratch is None, precision=precision, channels_last=channels_last,
                               compiled=compile, batch_size=batch_size, workers=workers, pin_memory=pin_memory,
                               prefetch_factor=prefetch_factor, top_k=top_k, decode=decode,
                               preprocessing=preprocessing, normalize=normalize, on_bad_image=on_bad_image,
                               log=log, progress=progress and main, chunk_path=chunk_path, n_todo=n_todo)
            n_reused = len(reused)
            if dinfo is not None:
                counts = dinfo.gather((n_todo, len(reused)))
                n_done, n_reused = sum(c[0] for c in counts), sum(c[1] for c in counts)
                dinfo.barrier()  # every rank's chunks are on disk
                if not main:
                    return None
                asm = _Assembler(folder, layers, N, top_k)
                for ci, (start, stop) in enumerate(chunks):
                    chunk = _load_chunk(chunk_path(ci))
                    if not _chunk_valid(chunk, stop - start, len(layers)):
                        raise DataError(f"chunk {ci} of the activation cache {folder} is missing or unreadable "
                                        "after every rank finished: is --cache-dir on storage all ranks share?")
                    asm.add(start, chunk)
            else:
                n_done = n_todo
            asm.commit()
        except BaseException:
            if asm is not None:
                asm.abort()
            raise
        for ci in range(len(chunks)):
            chunk_path(ci).unlink(missing_ok=True)
        final = _load_final(folder, layers, N)
        if final is None:
            raise DataError(f"the activation cache {folder} could not be read back after writing it; is the "
                            "disk full, or is another process deleting it?")
        status = "partial" if n_reused else "miss"
        return _result(final, probe, on_bad_image, dev, precision, batch_used, world, t0, n_done,
                       {"status": status, "key": key, "dir": None if scratch else str(folder), "chunks": len(chunks),
                        "reused": n_reused, "images_fingerprint": images_fp},
                       compute_seconds=compute_s if dinfo is None else time.perf_counter() - t0)
    finally:
        if scratch is not None:
            _remove_scratch(scratch)


def _remove_scratch(scratch: Path) -> None:
    if os.name == "nt":  # open memory maps pin their files on Windows: remove at exit
        import atexit
        atexit.register(shutil.rmtree, scratch, True)
    else:  # POSIX: the mapped data stays readable after the files are unlinked
        shutil.rmtree(scratch, ignore_errors=True)


def _compute(model, layers, reductions, probe, transform, dev, chunks, todo, asm, folder, keep_chunks, *,
             precision, channels_last, compiled, batch_size, workers, pin_memory, prefetch_factor, top_k, decode,
             preprocessing, normalize, on_bad_image, log, progress, chunk_path, n_todo) -> tuple[float, int]:
    """Compute ``todo`` chunks; each goes to its chunk file (cache) and/or the assembler."""
    if not todo:
        return 0.0, batch_size
    from tqdm.auto import tqdm

    t = time.perf_counter()
    model = model.to(dev)
    restore_format = channels_last and not _is_channels_last(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    bar = tqdm(total=n_todo, desc="activations", unit="img", disable=not progress, file=sys.stderr, leave=False)
    runner = _Runner(model, layers, reductions, probe, transform, dev, precision=precision,
                     channels_last=channels_last, compiled=compiled, batch_size=batch_size, workers=workers,
                     pin_memory=pin_memory, prefetch_factor=prefetch_factor, top_k=top_k, decode=decode,
                     preprocessing=preprocessing, normalize=normalize, on_bad_image=on_bad_image, log=log, bar=bar)

    def on_chunk(ci: int, chunk: dict[str, np.ndarray]) -> None:
        if keep_chunks:
            _atomic_savez(chunk_path(ci), **chunk)
        if asm is not None:
            asm.add(chunks[ci][0], chunk)

    try:
        runner.run(chunks, todo, on_chunk)
    finally:
        bar.close()
        if restore_format:
            model.to(memory_format=torch.contiguous_format)
    return time.perf_counter() - t, runner.micro


def _is_channels_last(model: nn.Module) -> bool:
    convs = [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] * p.shape[-2] > 1]
    return bool(convs) and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                               for p in convs)


def _result(final, probe, on_bad_image, dev, precision, batch_size, world, t0, n_computed, cache,
            compute_seconds: float = 0.0) -> Collected:
    layers, rest = final
    ok = rest["ok"]
    reasons = {int(i): str(r) for i, r in zip(rest["bad_index"], rest["bad_reason"])}
    bad = [(probe.paths[int(i)], reasons.get(int(i), "")) for i in np.flatnonzero(~ok)]
    if bad and on_bad_image == "error":
        p, why = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"cannot read image {probe.root / p}: {why}{more}; fix or remove it, or set "
                        "on_bad_image: skip to leave unreadable images out")
    seconds = time.perf_counter() - t0
    return Collected(layers=layers, ok=ok, bad=bad, cache=cache, seconds=seconds, device=str(dev),
                     images_per_second=(n_computed / compute_seconds if n_computed and compute_seconds > 0 else 0.0),
                     precision=precision, batch_size=batch_size, world_size=world)


def clear_cache(cache_dir: Path) -> None:
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
