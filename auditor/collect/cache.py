"""The activation cache key: everything that decides the numbers, in one manifest.

:func:`cache_manifest` is the one place that says what the key covers; the key is
a hash of the manifest, and the manifest is written next to the cached arrays.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from ..data import ProbeSet
from .reduce import MAX_MAP_SIDE, MAX_PREFIX_TOKENS

CACHE_FORMAT = 2

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


def images_fingerprint(probe, fingerprint: str) -> str:
    """The images' part of the key: paths, sizes and mtimes (``stat``) or file hashes (``content``)."""
    if fingerprint == "content" and isinstance(probe, ProbeSet):
        return content_fingerprint(probe)
    return probe.image_fingerprint()


def cache_manifest(model: nn.Module, *, model_hash: str, layers: list[str], reductions: dict[str, str], transform,
                   transform_desc: dict[str, Any], decode: str, normalize: bool, images_fp: str, fingerprint: str,
                   n: int, top_k: int, precision: str, channels_last: bool, compile: bool | str,
                   chunk_size: int) -> dict[str, Any]:
    """Everything that decides the cached numbers; the cache key is :func:`cache_key` of this."""
    return {"format": CACHE_FORMAT, "model": model_hash, "architecture": architecture_hash(model),
            "layers": list(layers), "reduction": reductions, "transform": transform_desc,
            "transform_repr": repr(transform), "decode": decode, "normalize": normalize if decode == "device"
            else None, "images": images_fp, "fingerprint": fingerprint, "n": n, "top_k": top_k,
            "precision": precision, "channels_last": bool(channels_last), "compile": compile or False,
            "torch": torch.__version__.split("+")[0], "chunk_size": chunk_size, "max_map_side": MAX_MAP_SIDE,
            "max_prefix_tokens": MAX_PREFIX_TOKENS}
