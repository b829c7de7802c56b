"""Forward hooks that capture the audited layers' outputs during one forward pass.

A layer is a module's call: ``layer4.1.relu`` is the first call of that module in
a forward pass, ``layer4.1.relu_1`` its second (torchvision feature_extraction's
names; see :func:`auditor.models.layer_call`). Each hook hands the output to a
``process`` function *inside the hook*, before any later operation of the
forward pass runs: a later in-place operation (``out += identity``,
``ReLU(inplace=True)``) would otherwise overwrite what was captured. Without a
``process`` function the hook stores a copy (``clone``) of the output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..models import hook_points, layer_call


class StopForward(Exception):
    """Raised by the hook once every audited layer has produced its output."""


class Store(dict):
    """name -> what the hook kept for that layer; ``calls``: how often each hooked module ran so far.

    :meth:`clear` forgets both, ready for the next forward pass.
    """

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def clear(self) -> None:
        super().clear()
        self.calls.clear()


def _copy(_name: str, out: Any) -> Any:
    return out.detach().clone() if isinstance(out, torch.Tensor) else out


@contextlib.contextmanager
def capture(model: nn.Module, layers: list[str], stop_early: bool = False,
            process: Callable[[str, Any], Any] | None = None) -> Iterator[Store]:
    """Forward hooks that keep ``process(name, output)`` of each layer; always removed, mode restored.

    With ``stop_early`` the forward pass ends (by :class:`StopForward`, which
    :func:`forward_until` swallows) as soon as every layer has been recorded, so the
    rest of the network is not computed. ``store.calls`` counts the calls of every
    hooked module (complete only for a pass that was not stopped early).
    """
    process = process or _copy
    wanted: dict[tuple[str, int], list[str]] = {}
    for name in layers:
        wanted.setdefault(layer_call(model, name), []).append(name)
    n_wanted = len(set(layers))
    store = Store()
    handles = []
    was_training = model.training
    try:
        with hook_points(model, sorted({m for m, _ in wanted})) as points:
            for module_name, point in points.items():
                def hook(_m, _i, out, module_name=module_name):
                    k = store.calls.get(module_name, 0)
                    store.calls[module_name] = k + 1
                    names = wanted.get((module_name, k))
                    if not names:
                        return
                    if isinstance(out, (tuple, list)):
                        out = out[0]
                    for name in names:
                        store[name] = process(name, out)
                    if stop_early and len(store) >= n_wanted:
                        raise StopForward
                handles.append(point.register_forward_hook(hook))
            model.eval()
            try:
                yield store
            finally:
                for h in handles:
                    h.remove()
    finally:
        model.train(was_training)


def check_hookable(model: nn.Module, layers: list[str]) -> None:
    """Raise the :class:`~auditor.errors.ModelError` :func:`capture` would, before any work is done."""
    with hook_points(model, sorted({layer_call(model, name)[0] for name in layers})):
        pass


def reuse_warning(model: nn.Module, name: str, calls: int | None) -> str | None:
    """The warning for a layer named by a module that runs more than once (its bare name is the first call)."""
    module, k = layer_call(model, name)
    if not calls or calls < 2 or k != 0 or name != module:
        return None
    later = ", ".join(f"{module}_{i}" for i in range(1, calls))
    return (f"module {module!r} runs {calls} times per forward pass: layer {name!r} is its first call; "
            f"ask for {later} for the later call(s)")


def forward_until(model: nn.Module | Callable, x: torch.Tensor) -> None:
    try:
        model(x)
    except StopForward:
        pass
