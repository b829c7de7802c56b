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
from ..collect.reduce import batch_axis, reduce_layer_output
from ..errors import LayerError, ModelError
from ..models import layer_call


def reduce_values(out, name: str, reduction: str, layout: str = "batch_first") -> torch.Tensor:
    """(B, K) float32 neuron values of a layer output, exactly as the activation collection reduces it.

    ``layout`` says where a token output holds its batch (see :func:`layer_info`)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if reduction not in REDUCTIONS:
        raise LayerError(f"unknown reduction {reduction!r}; registered: {sorted(REDUCTIONS)}")
    return reduce_layer_output(out, name, reduction, layout)[0]


def _forward(model: nn.Module, x: torch.Tensor) -> None:
    try:
        forward_until(model, x)
    except RuntimeError as exc:  # a size the model does not take, out of memory, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(f"a forward pass on {tuple(x.shape)} s-AMS inputs failed: {first}; set dora.size to "
                         "the model's input size, or lower dora.batch_size if memory ran out") from None


def layer_info(model: nn.Module, layer: str, reduction: str, x1: torch.Tensor) -> tuple[int, str]:
    """(K neurons, token layout) of ``layer``, from forward passes on ``x1`` (one image) and two copies of it.

    The layout of a 3-D (token) output is measured as the activation collection
    measures it: the axis whose size follows the batch size (``batch_first`` or
    ``sequence_first``); other outputs are ``batch_first``.
    """
    shapes = {}
    with torch.no_grad():
        for b in (1, 2):
            with capture(model, [layer], stop_early=True, process=lambda _n, out: tuple(out.shape)) as store:
                _forward(model, x1.expand(b, *x1.shape[1:]))
                if layer not in store:
                    raise LayerError(f"layer {layer!r} did not run in the model's forward pass")
                shapes[b] = store[layer]
    layout = "batch_first"
    if len(shapes[1]) == 3 and batch_axis(shapes[1], shapes[2], 1, 2) == 1:
        layout = "sequence_first"
    with torch.no_grad():
        K = layer_values(model, layer, reduction, x1, layout).shape[1]
    return int(K), layout


def layer_values(model: nn.Module, layer: str, reduction: str, x: torch.Tensor,
                 layout: str = "batch_first") -> torch.Tensor:
    """(B, K) values of ``layer`` on inputs ``x``, reduced inside the hook; the forward pass stops after the layer.

    Gradients flow when the caller has them enabled. Hooks come off and the model's
    train/eval mode is restored (by :func:`auditor.collect.capture`).
    """
    def reduce(name, out):
        return reduce_values(out, name, reduction, layout)

    with capture(model, [layer], stop_early=True, process=reduce) as store:
        _forward(model, x)
        if layer not in store:
            raise LayerError(f"layer {layer!r} did not run in the model's forward pass")
        return store[layer]


def objective_values(model: nn.Module, layer: str, reduction: str, x: torch.Tensor, neurons: torch.Tensor,
                     layout: str = "batch_first") -> torch.Tensor:
    """(B,) each image's own neuron's value, redirected through a silent ReLU (see the module doc)."""
    module_name, call = layer_call(model, layer)
    module = model.get_submodule(module_name)
    pre: list[torch.Tensor] = []
    seen = [0]
    handle = None
    if isinstance(module, nn.ReLU):
        def keep_input(_m, args):
            k, seen[0] = seen[0], seen[0] + 1
            if k == call and args and isinstance(args[0], torch.Tensor):
                pre.append(args[0].clone() if module.inplace else args[0])
        handle = module.register_forward_pre_hook(keep_input)
    try:
        values = layer_values(model, layer, reduction, x, layout)
    finally:
        if handle is not None:
            handle.remove()
    own = values.gather(1, neurons.view(-1, 1)).squeeze(1)
    if pre:
        before = reduce_values(pre[0], layer, reduction, layout).gather(1, neurons.view(-1, 1)).squeeze(1)
        own = torch.where(own > 0, own, before)
    return own
