"""Forward hooks that capture the audited layers' outputs during one forward pass."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..models import resolve_layer

class StopForward(Exception):
    """Raised by the hook once every audited layer has produced its output."""


@contextlib.contextmanager
def capture(model: nn.Module, layers: list[str], stop_early: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks that store each layer's output; always removed, mode restored.

    A module that runs several times in one forward pass is recorded at its first
    call. With ``stop_early`` the forward pass ends (by :class:`StopForward`, which
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
                    raise StopForward
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
    except StopForward:
        pass
