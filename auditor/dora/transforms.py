"""Transformation robustness: random pad, jitter, scale and rotation, one draw per step.

lucent's ``standard_transforms`` at 224 pixels: pad 12 (constant 0.5), jitter 8,
scale by one of 0.90 … 1.10, rotate by one of −10 … 10 degrees (0 five times more
often), jitter 4. Pixel amounts are given at 224 pixels and scaled with the image
side (at 64 pixels: pad 3, jitter 2 and 1). After the transforms the batch is
resized back to the input size, so models that need a fixed input size (vision
transformers) work too.

Every image of the optimisation batch gets the same draw, taken from a generator
seeded by (seed, step): an image's result does not depend on which other images
share its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SCALES = tuple(1 + (i - 5) / 50.0 for i in range(11))
ANGLES = tuple(range(-10, 11)) + (0,) * 5


@dataclass(frozen=True)
class Robustness:
    """Transformation amounts; pixel values at a 224-pixel side (scaled with the image)."""

    pad: float = 12.0
    jitter: float = 8.0
    jitter_after: float = 4.0
    scales: tuple[float, ...] = SCALES
    angles: tuple[float, ...] = ANGLES

    def plain(self) -> dict:
        return {"pad": self.pad, "jitter": self.jitter, "jitter_after": self.jitter_after,
                "scales": list(self.scales), "angles": list(self.angles)}


def _px(amount: float, side: int) -> int:
    return int(round(amount * side / 224.0)) if amount > 0 else 0


def _jitter(x: torch.Tensor, d: int, g: torch.Generator) -> torch.Tensor:
    if d <= 0:
        return x
    dy, dx = (int(v) for v in torch.randint(0, d + 1, (2,), generator=g))
    h, w = x.shape[-2:]
    return x[..., dy:dy + h - d, dx:dx + w - d]


def apply(x: torch.Tensor, robustness: Robustness | None, seed: int, step: int) -> torch.Tensor:
    """Transform the batch ``x`` (B, 3, H, W) with the draw for ``(seed, step)``; same size out."""
    if robustness is None:
        return x
    h, w = x.shape[-2:]
    side = max(h, w)
    g = torch.Generator().manual_seed(hash_seed(seed, step))
    p = _px(robustness.pad, side)
    if p:
        x = F.pad(x, (p, p, p, p), mode="constant", value=0.5)
    x = _jitter(x, _px(robustness.jitter, side), g)
    scale = robustness.scales[int(torch.randint(len(robustness.scales), (1,), generator=g))] \
        if robustness.scales else 1.0
    angle = robustness.angles[int(torch.randint(len(robustness.angles), (1,), generator=g))] \
        if robustness.angles else 0.0
    if scale != 1.0 or angle != 0:
        a = math.radians(angle)
        # Output pixel -> input pixel: rotate by -angle, shrink by 1/scale (enlarges the content by scale).
        theta = torch.tensor([[math.cos(a) / scale, -math.sin(a) / scale, 0.0],
                              [math.sin(a) / scale, math.cos(a) / scale, 0.0]], dtype=x.dtype, device=x.device)
        grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = _jitter(x, _px(robustness.jitter_after, side), g)
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    import hashlib

    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
