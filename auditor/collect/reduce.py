"""Reductions: one number per neuron from a layer's output.

- (B, C, H, W) conv outputs: a reduction over the H×W positions (``mean``, ``max``);
- (B, T, D) transformer token outputs: ``cls`` (token 0), ``mean`` or ``max`` over
  tokens (a (T, B, D) sequence-first output is turned around first);
- (B, D) linear outputs: as they are.

Reductions are registered by name (:func:`register_reduction`). A :class:`MapSource`
keeps a layer output's spatial layout (conv positions, or patch tokens laid out on
the patch grid) so the top images' maps can be taken later, pooled to at most
``MAX_MAP_SIDE`` per side.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..errors import ConfigError, LayerError

MAX_MAP_SIDE = 16  # spatial maps of top images are pooled down to at most this size
MAX_PREFIX_TOKENS = 8  # CLS, distillation and register tokens before the patch tokens

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


def normalise_reductions(reduction: str | Mapping[str, str], layers: list[str]) -> dict[str, str]:
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


# -- reducing a layer's output ----------------------------------------------------------

class MapSource:
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


def reduce_layer_output(out: Any, name: str, reduction: str, batch: int | None = None
            ) -> tuple[torch.Tensor, MapSource | None, str, tuple[int, ...]]:
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
        return values, MapSource(out, "spatial"), kind, tuple(out.shape[1:])
    # tokens: batch first (B, T, D); a sequence-first (T, B, D) output is turned around
    if batch is not None and out.shape[0] != batch and out.shape[1] == batch:
        out = out.transpose(0, 1)
    values = REDUCTIONS[reduction](out, 1)
    grid = patch_grid(out.shape[1])
    maps = MapSource(out, "tokens", *grid) if grid else None
    return values, maps, kind, tuple(out.shape[1:])


def reduce_output(out: torch.Tensor, name: str, reduction: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, K) neuron values and, where the layer has a spatial layout, (B, K, h, w) maps."""
    values, maps, _, _ = reduce_layer_output(out, name, reduction)
    return values, (maps.all() if maps is not None else None)
