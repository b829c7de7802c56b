"""The channel objective: the audit's reduction of each neuron, read with a forward hook.

A neuron's value on an image is exactly what the activation collection records for
it (:mod:`auditor.activations`): the registered reduction (``mean`` / ``max`` over
the H×W map of a conv channel; ``cls`` / ``mean`` / ``max`` over the tokens of a
token layer) or the unit itself for a (B, D) linear output. During s-AMS generation
each image in the batch carries the neuron it is made for, and the objective is the
sum over images of *that image's own neuron's* value, so one batch optimises many
neurons at once.
"""

from __future__ import annotations

import torch
from torch import nn

from ..activations import REDUCTION_KINDS, REDUCTIONS, capture, forward_until, layer_kind
from ..errors import LayerError


def reduce_values(out, name: str, reduction: str, batch: int) -> torch.Tensor:
    """(B, K) float32 neuron values of a layer output, as the activation collection reduces it."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise LayerError(f"layer {name!r} returned {type(out).__name__}, not a tensor; pick another layer")
    kind = layer_kind(out.dim())
    if kind == "unsupported":
        raise LayerError(f"layer {name!r} has output shape {tuple(out.shape)}; supported: (B, C, H, W) conv, "
                         "(B, T, D) token and (B, D) linear outputs")
    if kind == "linear":
        return out.float()
    if reduction not in REDUCTIONS:
        raise LayerError(f"unknown reduction {reduction!r}; registered: {sorted(REDUCTIONS)}")
    if kind not in REDUCTION_KINDS[reduction]:
        fits = sorted(r for r, kinds in REDUCTION_KINDS.items() if kind in kinds)
        raise LayerError(f"reduction {reduction!r} does not apply to layer {name!r} with output "
                         f"{tuple(out.shape)}; use one of {fits}")
    if kind == "spatial":
        return REDUCTIONS[reduction](out.flatten(2), 2)
    if out.shape[0] != batch and out.shape[1] == batch:  # sequence-first (T, B, D)
        out = out.transpose(0, 1)
    return REDUCTIONS[reduction](out, 1)


def layer_values(model: nn.Module, layer: str, reduction: str, x: torch.Tensor) -> torch.Tensor:
    """(B, K) values of ``layer`` on inputs ``x``; the forward pass stops after the layer.

    Gradients flow when the caller has them enabled. Hooks come off and the model's
    train/eval mode is restored (by :func:`auditor.activations.capture`).
    """
    with capture(model, [layer], stop_early=True) as store:
        forward_until(model, x)
        if layer not in store:
            raise LayerError(f"layer {layer!r} did not run in the model's forward pass")
        return reduce_values(store[layer], layer, reduction, x.shape[0])


def own_neuron_objective(values: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of each image's own neuron's value: ``values[b, neurons[b]]``."""
    return values.gather(1, neurons.view(-1, 1)).sum()
