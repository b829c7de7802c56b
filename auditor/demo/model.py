"""DemoNet: the small CNN shipped with a planted watermark shortcut.

It classifies the shape in a demo image (see :mod:`auditor.demo.data`) from
``[0, 1]`` RGB tensors of ``DEMO_IMAGE_SIZE`` x ``DEMO_IMAGE_SIZE`` pixels, with
no normalisation. It was trained by :mod:`auditor.demo.train` on images where
almost every ``DEMO_SHORTCUT_CLASS`` image carried a stock-photo watermark and
almost no other image did, so some channels of ``DEMO_LAYER`` learned to detect
watermarks and push the prediction towards that class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from auditor.demo import _MODEL_NAMES
from auditor.demo.data import SHAPES
from auditor.errors import ModelError

__all__ = list(_MODEL_NAMES)  # the package lists them, so it can load this module lazily

DEMO_IMAGE_SIZE: int = 64
DEMO_CLASSES: list[str] = list(SHAPES)
#: The layer to audit: the ReLU after the last conv block (64 channels, 8 x 8).
DEMO_LAYER: str = "features.13"
#: The artifact concepts the demo audit flags.
DEMO_ARTIFACTS: list[str] = ["watermark", "text"]
#: The planted shortcut: this artifact was on almost every image of this class.
DEMO_SHORTCUT_ARTIFACT: str = "watermark"
DEMO_SHORTCUT_CLASS: str = "star"
DEMO_WEIGHTS: Path = Path(__file__).with_name("demo_model.pt")
#: A control model trained the same way but with the watermark on 20% of every class
#: (``python -m auditor.demo.train --p-class 0.2 --p-other 0.2``): no shortcut to find.
#: ``load_demo_model(CONTROL_WEIGHTS)`` loads it (docs/impact.md).
CONTROL_WEIGHTS: Path = Path(__file__).with_name("control_model.pt")
#: Channels of ``DEMO_LAYER`` that watermarks drive in the shipped weights: pasting
#: a watermark on clean probe images raises their spatial mean by more than one
#: SD of its clean value on over 90% of images (measured, independently of any
#: audit, by tests/test_demo_model.py; listed in docs/demo.md). An audit of the
#: demo should flag these.
DEMO_WATERMARK_CHANNELS: tuple[int, ...] = (0, 27, 33, 34, 36)


class DemoNet(nn.Module):
    """Four conv blocks (16-32-64-64 channels; conv 3x3, batch norm, ReLU), global
    max-pooling and a linear head.

    The first conv has stride 2 (64 -> 32 pixels); blocks 2 and 3 end in a 2x2
    max-pool (32 -> 16 -> 8). ``features`` indices: conv ``0, 3, 7, 11``; batch
    norm ``1, 4, 8, 12``; ReLU ``2, 5, 9, 13``; max-pool ``6, 10``.
    ``features.13`` (``DEMO_LAYER``) is ``N x 64 x 8 x 8`` and non-negative.
    Input ``N x 3 x 64 x 64`` in ``[0, 1]``; output ``N x 4`` logits in
    ``DEMO_CLASSES`` order.
    """

    def __init__(self, num_classes: int = len(DEMO_CLASSES)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def load_demo_model(path: str | Path | None = None) -> DemoNet:
    """The shipped DemoNet (or the state dict at ``path``), on the CPU, in eval mode."""
    path = Path(path) if path is not None else DEMO_WEIGHTS
    if not path.is_file():
        raise ModelError(
            f"demo weights not found: {path}; rebuild them with `python -m auditor.demo.train --out {path}`"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = DemoNet()
        model.load_state_dict(state)
    except Exception as exc:  # corrupt file, wrong architecture
        raise ModelError(f"cannot load the demo weights {path}: {exc}") from None
    model.class_names = list(DEMO_CLASSES)  # read by the impact test (auditor.impact) for class names
    return model.eval()


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> ``N x 3 x H x W`` float32 tensor in ``[0, 1]``."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def layer_means(
    model: nn.Module, x: torch.Tensor, layer: str = DEMO_LAYER, batch_size: int = 256
) -> torch.Tensor:
    """Spatial means of ``layer``'s output (``N x C``), captured with a forward hook."""
    module = model.get_submodule(layer)
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().mean(dim=(2, 3))))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, x.shape[0], batch_size):
            model(x[start : start + batch_size])
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(captured)
