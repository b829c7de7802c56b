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
from collections.abc import Callable, Iterable, Mapping, Sequence
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


def per_layer(setting: str | Mapping[str, str], layers: list[str], key: str, default: str,
              allowed: Iterable[str]) -> dict[str, str]:
    """One value of ``key`` per audited layer: a single value for all, or a mapping (missing
    layers get ``default``); a layer not audited or a value not in ``allowed`` is a ConfigError."""
    allowed = list(allowed)
    if isinstance(setting, str):
        per = {name: setting for name in layers}
    else:
        unknown = sorted(set(setting) - set(layers))
        if unknown:
            raise ConfigError(f"{key} given for {unknown}, which are not among the audited layers {layers}")
        per = {name: setting.get(name, default) for name in layers}
    for name, value in per.items():
        if value not in allowed:
            raise ConfigError(f"unknown {key} {value!r} for layer {name!r}; expected one of {sorted(allowed)}")
    return per


def normalise_reductions(reduction: str | Mapping[str, str], layers: list[str]) -> dict[str, str]:
    return per_layer(reduction, layers, "reduction", "mean", REDUCTIONS)


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


# -- token layout -------------------------------------------------------------------------

#: How a (3-D) token output holds its batch: (B, T, D) or (T, B, D); "auto" measures it.
TOKEN_LAYOUTS = ("auto", "batch_first", "sequence_first")


def batch_axis(shape_a: tuple[int, ...], shape_b: tuple[int, ...], batch_a: int, batch_b: int) -> int | None:
    """The axis holding the batch, from one layer's output shapes at two different batch sizes.

    It is the one axis whose size follows the batch size while every other axis
    keeps its size; None when no axis, or more than one, does.
    """
    if len(shape_a) != len(shape_b) or batch_a == batch_b:
        return None
    follows = [i for i, (a, b) in enumerate(zip(shape_a, shape_b)) if a == batch_a and b == batch_b]
    fixed = all(a == b for i, (a, b) in enumerate(zip(shape_a, shape_b)) if i not in follows)
    return follows[0] if len(follows) == 1 and fixed else None


def normalise_layouts(token_layout: str | Mapping[str, str], layers: list[str]) -> dict[str, str]:
    return per_layer(token_layout, layers, "token_layout", "auto", TOKEN_LAYOUTS)


# -- reducing a layer's output ----------------------------------------------------------------

def _fresh(values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``values`` as a tensor of its own: a view of the layer output (a linear layer's output, token 0) would
    change when a later in-place operation of the forward pass changes the output."""
    if values.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
        return values.clone()
    return values


def reduce_layer_output(out: Any, name: str, reduction: str, layout: str = "batch_first"
                        ) -> tuple[torch.Tensor, MapSource | None, str, tuple[int, ...]]:
    """(B, K) float32 neuron values, a map source for the top images, the layer kind, per-image shape.

    ``layout`` says where a token output holds its batch: ``batch_first`` (B, T, D)
    or ``sequence_first`` (T, B, D), which is turned around. It is measured once per
    layer (see :func:`batch_axis`), never guessed from one batch's shape: a batch
    can hold as many images as the layer has tokens. The values never share
    memory with ``out``; the map source does, so take maps before the forward pass
    goes on.
    """
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
        return _fresh(out.float(), out), None, kind, tuple(out.shape[1:])
    if kind == "spatial":
        values = _fresh(REDUCTIONS[reduction](out.flatten(2), 2), out)
        return values, MapSource(out, "spatial"), kind, tuple(out.shape[1:])
    if layout == "sequence_first":
        out = out.transpose(0, 1)
    values = _fresh(REDUCTIONS[reduction](out, 1), out)
    grid = patch_grid(out.shape[1])
    maps = MapSource(out, "tokens", *grid) if grid else None
    return values, maps, kind, tuple(out.shape[1:])


def reduce_output(out: torch.Tensor, name: str, reduction: str, layout: str = "batch_first"
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, K) neuron values and, where the layer has a spatial layout, (B, K, h, w) maps."""
    values, maps, _, _ = reduce_layer_output(out, name, reduction, layout)
    return values, (maps.all() if maps is not None else None)
