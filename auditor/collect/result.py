"""What a collection returns: each layer's (N, K) activations with its top images."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import DataError

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
    layout: str | None = None  # where the output held the batch: "batch_first", or "sequence_first" (T, B, D)
    calls: int | None = None  # how many times the layer's module runs in one forward pass


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
    warnings: list[str] = field(default_factory=list)  # for the user and the report (reused modules, no cache)


def make_result(final, probe, on_bad_image, dev, precision, batch_size, world, t0, n_computed, cache,
                compute_seconds: float = 0.0, warnings: list[str] | None = None) -> Collected:
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
                     precision=precision, batch_size=batch_size, world_size=world, warnings=list(warnings or []))
