"""s-AMS: synthetic activation-maximisation signals, batched over neurons.

For every neuron of a layer, ``signals`` images are optimised from different random
starts to maximise the neuron's value (the audit's reduction, see
:mod:`.objective`). Images are Fourier-parameterised in a decorrelated colour space
(:mod:`.image`), pass random pad / jitter / scale / rotation before the model
(:mod:`.transforms`), and are optimised with Adam. One optimisation batch holds
many neurons' images; each image's loss term is its own neuron's value, and Adam
and the parameterisation act per element, so images do not interact: a neuron's
s-AMS depends on the seed, its index and the parameters, not on the batch.

The result is quantised to 8 bits (what is cached, shown and fed back to the model).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from . import image as _image
from . import transforms as _tf
from .objective import layer_info, layer_values, objective_values


@dataclass(frozen=True)
class SamsParams:
    """Everything that shapes an s-AMS (all of it goes into the cache key)."""

    size: int = 224  # image side in pixels
    steps: int = 90  # Adam steps
    lr: float = 0.05  # Adam learning rate (lucent's default for this parameterisation; see docs/dora.md)
    signals: int = 3  # s-AMS per neuron, from different random starts
    seed: int = 0
    batch_size: int = 64  # images per optimisation batch (neurons × signals are packed into batches)
    init_sd: float = 0.01  # SD of the initial spectrum (lucid)
    decay_power: float = 1.0  # 1/f^decay spectrum scaling
    robustness: _tf.Robustness | None = field(default_factory=_tf.Robustness)

    def __post_init__(self) -> None:
        for name in ("size", "steps", "signals", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"dora {name} must be a positive integer, got {v!r}")
        if self.size < 8:
            raise ConfigError(f"dora size must be at least 8 pixels, got {self.size}")
        if not self.lr > 0:
            raise ConfigError(f"dora lr must be positive, got {self.lr!r}")
        if not self.init_sd > 0:
            raise ConfigError(f"dora init_sd must be positive, got {self.init_sd!r}")

    def plain(self) -> dict:
        d = asdict(self)
        d["robustness"] = self.robustness.plain() if self.robustness is not None else None
        return d



def normaliser(mean: Sequence[float] | None, std: Sequence[float] | None):
    """[0, 1] RGB -> the model's input (the audit's mean/std normalisation, or none)."""
    if mean is None or std is None:
        return lambda x: x
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)
    return lambda x: (x - m.to(x.device)) / s.to(x.device)


def image_seed(seed: int, neuron: int, signal: int) -> int:
    return _tf.hash_seed(seed, 1, neuron, signal)


def generate(model: nn.Module, layer: str, reduction: str, neurons: Sequence[int], params: SamsParams, *,
             mean=None, std=None, device: torch.device | str = "cpu", progress: bool = True) -> np.ndarray:
    """s-AMS of ``neurons``: a (len(neurons), signals, 3, size, size) uint8 array.

    The model's parameters are frozen during the optimisation and unfrozen after;
    hooks come off and train/eval mode is restored even when something fails.
    """
    from tqdm.auto import tqdm

    dev = torch.device(device)
    neurons = [int(k) for k in neurons]
    model.to(dev)
    norm = normaliser(mean, std)
    K, layout = layer_info(model, layer, reduction, norm(torch.full((1, 3, params.size, params.size), 0.5, device=dev)))
    if any(not 0 <= k < K for k in neurons):
        raise ConfigError(f"neurons must lie in 0–{K - 1} (layer {layer!r} has {K}), got {neurons}")
    if len(set(neurons)) != len(neurons):
        raise ConfigError(f"neurons lists a neuron twice: {neurons}")
    S, H = params.signals, params.size
    items = [(k, s) for k in neurons for s in range(S)]
    out = np.empty((len(neurons), S, 3, H, H), dtype=np.uint8)
    scale = _image.frequency_scale(H, H, params.decay_power).to(dev)
    batches = [items[i:i + params.batch_size] for i in range(0, len(items), params.batch_size)]
    bar = tqdm(total=len(batches) * params.steps, desc=f"s-AMS {layer}", unit="step", disable=not progress,
               file=sys.stderr, leave=False)
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        model.to(dev)
        pos = {k: i for i, k in enumerate(neurons)}
        for batch in batches:
            seeds = [image_seed(params.seed, k, s) for k, s in batch]
            spec = _image.init_spectrum(len(batch), H, H, params.init_sd, seeds).to(dev).requires_grad_(True)
            own = torch.tensor([k for k, _ in batch], dtype=torch.long, device=dev)
            opt = torch.optim.Adam([spec], lr=params.lr)
            with torch.enable_grad():
                for step in range(params.steps):
                    opt.zero_grad(set_to_none=True)
                    rgb = _image.to_rgb(spec, H, H, scale)
                    x = _tf.apply(rgb, params.robustness, params.seed, step)
                    loss = -objective_values(model, layer, reduction, norm(x), own, layout).sum()
                    loss.backward()
                    opt.step()
                    bar.update(1)
            with torch.no_grad():
                rgb = _image.to_rgb(spec, H, H, scale)
                u8 = (rgb * 255.0).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()
            for j, (k, s) in enumerate(batch):
                out[pos[k], s] = u8[j]
    finally:
        bar.close()
        for p, flag in grads:
            p.requires_grad_(flag)
    return out


@torch.no_grad()
def activations_on(model: nn.Module, layer: str, reduction: str, images_u8: np.ndarray, *, mean=None, std=None,
                   device: torch.device | str = "cpu", batch_size: int = 64) -> np.ndarray:
    """Every neuron's value on each of ``images_u8`` ((M, 3, H, W) uint8) -> (M, K) float64."""
    dev = torch.device(device)
    norm = normaliser(mean, std)
    model.to(dev)
    rows = []
    layout = None
    for i in range(0, len(images_u8), batch_size):
        x = norm(torch.from_numpy(np.ascontiguousarray(images_u8[i:i + batch_size])).to(dev).float().div_(255.0))
        if layout is None:
            layout = layer_info(model, layer, reduction, x[:1])[1]
        rows.append(layer_values(model, layer, reduction, x, layout).double().cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 0))
