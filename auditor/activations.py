"""Collecting a layer's activations over the probe set.

One forward pass per batch with forward hooks on the audited layers; each layer's
output is reduced on the device (spatial mean or max for (B, C, H, W); (B, D) as
it is), so only N×K numbers come back. While collecting, a streaming top-k of the
most-activating images per neuron and their (downsampled) spatial maps is kept,
so the report needs no second pass.

Results are cached on disk under a key that covers everything that changes them
(weights, layer, reduction, preprocessing, images). Work is committed in chunks,
each written atomically, so an interrupted run resumes from the last chunk and a
torn write is never read as data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
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

CACHE_FORMAT = 1
MAX_MAP_SIDE = 16  # spatial maps of top images are pooled down to at most this size

# -- reductions (registered by name) -------------------------------------------

REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}


def register_reduction(name: str):
    def deco(fn: Callable[[torch.Tensor], torch.Tensor]):
        REDUCTIONS[name] = fn
        return fn
    return deco


@register_reduction("mean")
def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).mean(dim=2)


@register_reduction("max")
def _max(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).amax(dim=2)


# -- images -----------------------------------------------------------------------

def build_transform(pre: Preprocessing, normalize: bool = True):
    from torchvision import transforms as T

    steps: list[Any] = []
    if pre.resize:
        steps.append(T.Resize(pre.resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True))
    if pre.crop:
        steps.append(T.CenterCrop(pre.crop))
    geometry = T.Compose(list(steps))
    steps.append(T.ToTensor())
    if normalize and pre.mean is not None and pre.std is not None:
        steps.append(T.Normalize(pre.mean, pre.std))
    return geometry, T.Compose(steps)


class ProbeImages(Dataset):
    """Returns (tensor, index, error message or "")."""

    def __init__(self, probe: ProbeSet, transform, indices: list[int]):
        self.probe = probe
        self.transform = transform
        self.indices = indices
        self._shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        idx = self.indices[i]
        path = self.probe.full_path(idx)
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                x = self.transform(im)
            return x, idx, ""
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            return None, idx, f"{type(exc).__name__}: {exc}"


def _collate(batch):
    good = [b for b in batch if b[0] is not None]
    shapes = {tuple(b[0].shape) for b in good}
    if len(shapes) > 1:
        raise DataError("probe images have different sizes after preprocessing "
                        f"({', '.join(str(s) for s in sorted(shapes)[:3])}); pass --resize and --crop "
                        "so every image reaches the model at the same size")
    x = torch.stack([b[0] for b in good]) if good else None
    return x, [b[1] for b in good], [(b[1], b[2]) for b in batch if b[0] is None]


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


def forward_until(model: nn.Module, x: torch.Tensor) -> None:
    try:
        model(x)
    except _StopForward:
        pass


def reduce_output(out: torch.Tensor, name: str, reduction: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, K) neuron values and, for spatial outputs, (B, K, h, w) maps for the top images."""
    if not isinstance(out, torch.Tensor):
        raise LayerError(f"layer {name!r} returned {type(out).__name__}, not a tensor; pick another layer")
    if out.dim() == 2:
        return out.float(), None
    if out.dim() == 4:
        out = out.float()
        values = REDUCTIONS[reduction](out)
        h, w = out.shape[-2:]
        if h > MAX_MAP_SIDE or w > MAX_MAP_SIDE:
            maps = torch.nn.functional.adaptive_avg_pool2d(out, (min(h, MAX_MAP_SIDE), min(w, MAX_MAP_SIDE)))
        else:
            maps = out
        return values, maps
    raise LayerError(f"layer {name!r} has output shape {tuple(out.shape)}; supported: (B, C, H, W) and (B, D)")


class TopK:
    """Streaming top-k rows per neuron (values, probe indices, optional maps)."""

    def __init__(self, k: int):
        self.k = k
        self.values: torch.Tensor | None = None  # (k', K)
        self.index: torch.Tensor | None = None  # (k', K) int64
        self.maps: torch.Tensor | None = None  # (k', K, h, w)

    def update(self, values: torch.Tensor, index: torch.Tensor, maps: torch.Tensor | None) -> None:
        if self.k == 0:
            return
        # values (B, K); index (B,); maps (B, K, h, w)
        idx = index.view(-1, 1).expand_as(values)
        if self.values is not None:
            values = torch.cat([self.values, values])
            idx = torch.cat([self.index, idx])
            if maps is not None:
                maps = torch.cat([self.maps, maps])
        k = min(self.k, values.shape[0])
        # Total order: highest value first, ties by lower probe index (two stable sorts).
        order = torch.argsort(idx, dim=0, stable=True)
        order = torch.gather(order, 0, torch.argsort(-torch.gather(values, 0, order), dim=0, stable=True))
        sel = order[:k]
        sel_vals = torch.gather(values, 0, sel)
        sel_idx = torch.gather(idx, 0, sel)
        self.values, self.index = sel_vals, sel_idx
        if maps is not None:
            K = values.shape[1]
            self.maps = maps[sel, torch.arange(K, device=maps.device).view(1, -1)]

    def numpy(self) -> dict[str, np.ndarray]:
        if self.values is None:
            return {}
        out = {"top_values": self.values.cpu().numpy().astype(np.float32),
               "top_index": self.index.cpu().numpy().astype(np.int64)}
        if self.maps is not None:
            out["top_maps"] = self.maps.cpu().numpy().astype(np.float16)
        return out


# -- results -------------------------------------------------------------------------

@dataclass
class LayerActivations:
    name: str
    values: np.ndarray  # (N, K) float32, rows in probe order (unread images: NaN rows)
    output_shape: tuple[int, ...]
    top_index: np.ndarray | None = None  # (k, K) probe rows, best first
    top_values: np.ndarray | None = None  # (k, K)
    top_maps: np.ndarray | None = None  # (k, K, h, w)


@dataclass
class Collected:
    layers: dict[str, LayerActivations]
    ok: np.ndarray  # (N,) bool: image was read
    bad: list[tuple[str, str]]  # (path, reason) of unreadable images
    cache: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    device: str = "cpu"
    images_per_second: float = 0.0


# -- cache ----------------------------------------------------------------------------

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


def cache_key(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:24]


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


def _load_chunk(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:
        return None  # unreadable chunk: recompute it


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
    return torch.device(device)


def collect(model: nn.Module, layers: list[str], probe: ProbeSet, *, transform, transform_desc: dict[str, Any],
            model_hash: str, reduction: str = "mean", batch_size: int = 64, workers: int = 0,
            device: str = "auto", top_k: int = 9, cache_dir: Path | None = None, chunk_size: int = 2048,
            on_bad_image: str = "error", log: Callable[[str], None] = lambda m: None,
            progress: bool = True) -> Collected:
    """Run the model over the probe set and return each layer's (N, K) activations."""
    if reduction not in REDUCTIONS:
        raise ConfigError(f"unknown reduction {reduction!r}; available: {sorted(REDUCTIONS)}")
    for name in layers:
        resolve_layer(model, name)
    dev = resolve_device(device)
    N = len(probe)
    manifest = {"format": CACHE_FORMAT, "model": model_hash, "layers": list(layers), "reduction": reduction,
                "transform": transform_desc, "images": probe.image_fingerprint(), "n": N, "top_k": top_k,
                "precision": "float32", "chunk_size": chunk_size, "max_map_side": MAX_MAP_SIDE}
    key = cache_key(manifest)
    cdir: Path | None = None
    if cache_dir is not None:
        cdir = Path(cache_dir) / key
        try:
            cdir.mkdir(parents=True, exist_ok=True)
            (cdir / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        except OSError as exc:
            raise ConfigError(f"cannot write the activation cache in {cache_dir}: {exc}; "
                              "pass --cache-dir to a writable folder or --no-cache") from None
    chunks = [(s, min(s + chunk_size, N)) for s in range(0, N, chunk_size)]
    t0 = time.perf_counter()
    model = model.to(dev)
    results: list[dict[str, np.ndarray]] = []
    reused = 0
    bad: list[tuple[str, str]] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=N, desc="activations", unit="img", disable=not progress, file=sys.stderr, leave=False)
    try:
        for ci, (start, stop) in enumerate(chunks):
            path = cdir / f"chunk-{ci:05d}.npz" if cdir else None
            if path is not None and path.exists():
                chunk = _load_chunk(path)
                if chunk is not None and chunk.get("ok") is not None and len(chunk["ok"]) == stop - start:
                    results.append(chunk)
                    reused += 1
                    bar.update(stop - start)
                    continue
            chunk = _run_chunk(model, layers, probe, transform, dev, start, stop, reduction=reduction,
                               batch_size=batch_size, workers=workers, top_k=top_k, bar=bar)
            if path is not None:
                _atomic_savez(path, **chunk)
            results.append(chunk)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    ok = np.concatenate([c["ok"] for c in results]).astype(bool)
    for i in np.flatnonzero(~ok):
        reason = ""
        for c in results:
            if "bad_index" in c and i in c["bad_index"]:
                reason = str(c["bad_reason"][list(c["bad_index"]).index(i)])
        bad.append((probe.paths[i], reason))
    if bad and on_bad_image == "error":
        p, why = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"cannot read image {probe.root / p}: {why}{more}; fix or remove it, or set "
                        "on_bad_image: skip to leave unreadable images out")
    out: dict[str, LayerActivations] = {}
    for name in layers:
        vals = np.concatenate([c[f"{name}/values"] for c in results])
        shape = tuple(int(s) for s in results[0][f"{name}/shape"])
        top = _merge_top([c for c in results], name, top_k)
        out[name] = LayerActivations(name=name, values=vals, output_shape=shape, **top)
    status = "hit" if reused == len(chunks) else ("partial" if reused else "miss")
    if cdir is not None:
        log(f"activation cache {status}: {reused}/{len(chunks)} chunk(s) reused from {cdir}")
    n_new = sum(stop - start for (start, stop) in chunks) if status == "miss" else None
    return Collected(layers=out, ok=ok, bad=bad, seconds=seconds, device=str(dev),
                     cache={"status": status, "key": key, "dir": str(cdir) if cdir else None,
                            "chunks": len(chunks), "reused": reused},
                     images_per_second=(n_new / seconds if n_new and seconds > 0 else 0.0))


def _merge_top(chunks: list[dict[str, np.ndarray]], name: str, k: int) -> dict[str, np.ndarray | None]:
    if k == 0 or f"{name}/top_values" not in chunks[0]:
        return {"top_index": None, "top_values": None, "top_maps": None}
    vals = np.concatenate([c[f"{name}/top_values"] for c in chunks])
    idx = np.concatenate([c[f"{name}/top_index"] for c in chunks])
    has_maps = f"{name}/top_maps" in chunks[0]
    maps = np.concatenate([c[f"{name}/top_maps"] for c in chunks]) if has_maps else None
    K = vals.shape[1]
    kk = min(k, vals.shape[0])
    order = np.lexsort((idx, -vals), axis=0)[:kk]  # value desc, then probe index asc
    cols = np.arange(K)[None, :]
    return {"top_index": idx[order, cols], "top_values": vals[order, cols],
            "top_maps": maps[order, cols] if maps is not None else None}


@torch.no_grad()
def _run_chunk(model, layers, probe, transform, dev, start, stop, *, reduction, batch_size, workers, top_k,
               bar) -> dict[str, np.ndarray]:
    ds = ProbeImages(probe, transform, list(range(start, stop)))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate,
                        pin_memory=dev.type == "cuda", persistent_workers=False)
    n = stop - start
    values: dict[str, np.ndarray] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    tops = {name: TopK(top_k) for name in layers}
    ok = np.zeros(n, dtype=bool)
    bad_index: list[int] = []
    bad_reason: list[str] = []
    with capture(model, layers, stop_early=True) as store:
        for x, idx, failed in loader:
            for i, why in failed:
                bad_index.append(i)
                bad_reason.append(why)
            if x is None:
                bar.update(len(failed))
                continue
            x = x.to(dev, non_blocking=True)
            store.clear()
            try:
                forward_until(model, x)
            except DataError:
                raise
            except RuntimeError as exc:
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ModelError(f"the model's forward pass failed on a batch of shape {tuple(x.shape)}: "
                                 f"{msg[:300]} — check --resize/--crop and the model's expected input") from None
            rows = torch.as_tensor(idx, dtype=torch.long)
            for name in layers:
                if name not in store:
                    raise LayerError(f"layer {name!r} was not called during the forward pass; pick a layer "
                                     "that the model's forward uses")
                out = store[name]
                vals, maps = reduce_output(out, name, reduction)
                if name not in values:
                    shapes[name] = tuple(out.shape[1:])
                    values[name] = np.full((n, vals.shape[1]), np.nan, dtype=np.float32)
                values[name][(rows - start).numpy()] = vals.cpu().numpy()
                tops[name].update(vals, rows.to(vals.device), maps)
            ok[(rows - start).numpy()] = True
            bar.update(len(idx) + len(failed))
    chunk: dict[str, np.ndarray] = {"ok": ok, "bad_index": np.asarray(bad_index, dtype=np.int64),
                                    "bad_reason": np.asarray(bad_reason, dtype=str)}
    for name in layers:
        if name not in values:  # every image in the chunk was unreadable
            raise DataError(f"no image between rows {start} and {stop} could be read")
        chunk[f"{name}/values"] = values[name]
        chunk[f"{name}/shape"] = np.asarray(shapes[name], dtype=np.int64)
        for k, v in tops[name].numpy().items():
            chunk[f"{name}/{k}"] = v
    return chunk


def clear_cache(cache_dir: Path) -> None:
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
