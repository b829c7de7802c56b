"""Where and at what precision the model runs: device, autocast, TF32, memory format."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import ConfigError

PRECISIONS = ("float32", "tf32", "bfloat16", "float16", "auto")

def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
    return torch.device(device)


def resolve_precision(precision: str, dev: torch.device) -> str:
    """The precision to run at; ``auto`` is float32 on every device, for now.

    ``auto`` is where a measured policy goes. Measured so far (docs/activations.md,
    ``bench/bench_activations.py precision --demo``): under bfloat16 autocast the demo
    audit lost 2 of its 64 neurons' artifact flags, under float16 one, so reduced
    precision is not on by default anywhere: ask for ``bfloat16`` (or ``tf32``)
    explicitly, and check your model with the precision benchmark first.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
    if precision == "auto":
        return "float32"
    return precision


def numerics(precision: str, dev: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for bfloat16/float16; TF32 on or off (CUDA) for float32/tf32, restored afterwards."""
    stack = contextlib.ExitStack()
    if dev.type == "cuda":
        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)

        def restore():
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
        stack.callback(restore)
        tf32 = precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    return stack


def autocast(precision: str, dev: torch.device):
    if precision in ("bfloat16", "float16"):
        return torch.autocast(device_type=dev.type, dtype=getattr(torch, precision))
    return contextlib.nullcontext()


def is_channels_last(model: nn.Module) -> bool:
    convs = [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] * p.shape[-2] > 1]
    return bool(convs) and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                               for p in convs)
