"""Calibration: one look at the model before the first batch, to learn what the batches cannot tell.

- How often each audited layer's module runs in one forward pass (a module called
  twice is two layers, ``name`` and ``name_1``; asking for a call that never
  happens is an error).
- Which axis of each layer's output holds the batch. The first image goes through
  the model at two batch sizes; the axis whose size follows the batch size is the
  batch axis. A token output's layout, (B, T, D) or (T, B, D), is decided here and
  kept for every batch, so a batch that holds as many images as the layer has
  tokens (the last one included) is never mistaken for the other layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..errors import LayerError, ModelError
from ..models import layer_call
from .capture import capture
from .reduce import batch_axis

#: batch sizes of the two calibration passes; the second pair when three images do not fit in memory
CALIBRATION_SIZES = ((2, 3), (1, 2))


def _shape_of(name: str, out) -> tuple[int, ...]:
    if not isinstance(out, torch.Tensor):
        raise LayerError(f"layer {name!r} returned {type(out).__name__}, not a tensor; pick another layer")
    return tuple(out.shape)


def _passes(model: nn.Module, layers: list[str], one: torch.Tensor, sizes: tuple[int, int], prepare, run):
    """{batch size: {layer: output shape}} and {module: calls per forward pass}, from full forward passes."""
    seen: dict[int, dict[str, tuple[int, ...]]] = {}
    calls: dict[str, int] = {}
    for b in sizes:
        xb = prepare(one.expand(b, *one.shape[1:]).contiguous())
        with capture(model, layers, process=_shape_of) as store:
            run(xb)
            seen[b] = dict(store)
            calls = dict(store.calls)
    return seen, calls


def calibrate(model: nn.Module, layers: list[str], one: torch.Tensor, token_layouts: Mapping[str, str], *,
              prepare: Callable[[torch.Tensor], torch.Tensor], run: Callable[[torch.Tensor], None],
              dev: torch.device) -> tuple[dict[str, str], dict[str, int]]:
    """({layer: "batch_first" | "sequence_first"}, {layer: calls of its module per forward pass}).

    ``one`` is one input image (1, C, H, W); ``prepare`` moves a batch to the
    device, ``run`` runs the model on it. ``token_layouts`` (per layer: ``auto`` or
    a layout) overrides the measurement for token outputs.
    """
    for sizes in CALIBRATION_SIZES:
        try:
            seen, calls = _passes(model, layers, one, sizes, prepare, run)
            break
        except torch.OutOfMemoryError:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    else:
        raise ModelError(f"out of memory on {dev} even with a batch of one image; audit an "
                         "earlier layer, use a smaller input size or precision bfloat16")
    b1, b2 = sizes
    layouts: dict[str, str] = {}
    n_calls: dict[str, int] = {}
    for name in layers:
        module, k = layer_call(model, name)
        n = calls.get(module, 0)
        n_calls[name] = n
        if n == 0:
            raise LayerError(f"layer {name!r} was not called during the forward pass; pick a layer that the "
                             "model's forward uses")
        if name not in seen[b1] or name not in seen[b2]:
            later = ", ".join([module] + [f"{module}_{i}" for i in range(1, n)])
            raise LayerError(f"layer {name!r} asks for call {k + 1} of module {module!r}, which runs {n} "
                             f"time(s) per forward pass; its calls are {later}")
        s1, s2 = seen[b1][name], seen[b2][name]
        axis = batch_axis(s1, s2, b1, b2)
        if len(s1) == 3:
            given = token_layouts.get(name, "auto")
            if given != "auto":
                layouts[name] = given
            elif axis in (0, 1):
                layouts[name] = "batch_first" if axis == 0 else "sequence_first"
            else:
                raise LayerError(f"cannot tell which axis of layer {name!r}'s output holds the batch (shape "
                                 f"{s1} for {b1} image(s), {s2} for {b2}); set token_layout: batch_first or "
                                 "sequence_first")
        else:
            if axis != 0 and len(s1) in (2, 4):
                raise LayerError(f"layer {name!r}'s output (shape {s1} for {b1} image(s), {s2} for {b2}) does "
                                 "not hold the batch on its first axis; pick another layer")
            layouts[name] = "batch_first"
    return layouts, n_calls
