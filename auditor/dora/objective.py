"""The channel objective: the audit's reduction of each neuron, read with a forward hook.

A neuron's value on an image is exactly what the activation collection records for
it (:mod:`auditor.collect`): the registered reduction (``mean`` / ``max`` over
the H×W map of a conv channel; ``cls`` / ``mean`` / ``max`` over the tokens of a
token layer) or the unit itself for a (B, D) linear output. During s-AMS generation
each image in the batch carries the neuron it is made for, and the objective is the
sum over images of *that image's own neuron's* value, so one batch optimises many
neurons at once.

A rectified neuron that is zero on every position of an image gives no gradient
(the grey starting image often does that). When the audited layer is itself an
``nn.ReLU`` module, the objective of such an image is the same reduction of the
ReLU's *input* (negative, rising towards zero) until the neuron switches on, after
which it is the neuron's value again: a redirected ReLU in the spirit of lucid's,
for the audited layer only. The values recorded in A are always the layer's output.
"""

from __future__ import annotations

import torch
from torch import nn

from ..collect import REDUCTIONS, capture, forward_until
from ..collect.reduce import reduce_layer_output
from ..errors import LayerError, ModelError


def reduce_values(out, name: str, reduction: str, batch: int) -> torch.Tensor:
    """(B, K) float32 neuron values of a layer output, exactly as the activation collection reduces it."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if reduction not in REDUCTIONS:
        raise LayerError(f"unknown reduction {reduction!r}; registered: {sorted(REDUCTIONS)}")
    return reduce_layer_output(out, name, reduction, batch)[0]


def layer_values(model: nn.Module, layer: str, reduction: str, x: torch.Tensor) -> torch.Tensor:
    """(B, K) values of ``layer`` on inputs ``x``; the forward pass stops after the layer.

    Gradients flow when the caller has them enabled. Hooks come off and the model's
    train/eval mode is restored (by :func:`auditor.collect.capture`).
    """
    with capture(model, [layer], stop_early=True) as store:
        try:
            forward_until(model, x)
        except RuntimeError as exc:  # a size the model does not take, out of memory, ...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ModelError(f"a forward pass on {tuple(x.shape)} s-AMS inputs failed: {first}; set dora.size to "
                             "the model's input size, or lower dora.batch_size if memory ran out") from None
        if layer not in store:
            raise LayerError(f"layer {layer!r} did not run in the model's forward pass")
        return reduce_values(store[layer], layer, reduction, x.shape[0])


def objective_values(model: nn.Module, layer: str, reduction: str, x: torch.Tensor,
                     neurons: torch.Tensor) -> torch.Tensor:
    """(B,) each image's own neuron's value, redirected through a silent ReLU (see the module doc)."""
    from ..models import resolve_layer

    module = resolve_layer(model, layer)
    pre: list[torch.Tensor] = []
    handle = None
    if isinstance(module, nn.ReLU):
        def keep_input(_m, args):
            if not pre and args and isinstance(args[0], torch.Tensor):
                pre.append(args[0].clone() if module.inplace else args[0])
        handle = module.register_forward_pre_hook(keep_input)
    try:
        values = layer_values(model, layer, reduction, x)
    finally:
        if handle is not None:
            handle.remove()
    own = values.gather(1, neurons.view(-1, 1)).squeeze(1)
    if pre:
        before = reduce_values(pre[0], layer, reduction, x.shape[0]).gather(1, neurons.view(-1, 1)).squeeze(1)
        own = torch.where(own > 0, own, before)
    return own
