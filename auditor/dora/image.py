"""Fourier-parameterised images in a decorrelated colour space (lucid / lucent style).

An image is held as its real 2-D spectrum (``(B, 3, H, W//2+1)`` complex numbers,
stored as a real tensor with a trailing axis of 2). Each frequency is scaled by
``1 / max(f, 1/max(H, W)) ** decay``, so low frequencies dominate as in natural
images (1/f spectrum) and gradient steps do not pile up high-frequency noise.
The inverse FFT gives three channels in a *decorrelated* colour basis; a fixed
3×3 matrix (the square root of ImageNet's colour correlation, normalised) maps
them to RGB, and a sigmoid keeps every pixel in [0, 1].

Reference: Olah et al., "Feature Visualization", Distill 2017 (lucid), and its
PyTorch port lucent (``lucent.optvis.param.spatial.fft_image``,
``lucent.optvis.param.color``), whose constants are used here.
"""

from __future__ import annotations

import numpy as np
import torch

#: lucid's square root of ImageNet's RGB colour correlation (columns: decorrelated axes).
COLOR_CORRELATION_SVD_SQRT = np.asarray([[0.26, 0.09, 0.02],
                                         [0.27, 0.00, -0.05],
                                         [0.27, -0.09, 0.03]], dtype=np.float32)
_MAX_NORM = float(np.max(np.linalg.norm(COLOR_CORRELATION_SVD_SQRT, axis=0)))
COLOR_MATRIX = COLOR_CORRELATION_SVD_SQRT / _MAX_NORM
#: lucid divides the inverse FFT by 4 ("magic" constant) to start at a sensible contrast.
FFT_MAGIC = 4.0


def spectrum_shape(h: int, w: int) -> tuple[int, int, int, int]:
    """Per-image parameter shape: (3 channels, H, W//2+1 frequencies, 2 for re/im)."""
    return (3, h, w // 2 + 1, 2)


def frequency_scale(h: int, w: int, decay_power: float = 1.0) -> torch.Tensor:
    """(H, W//2+1) scale: 1 / max(|f|, 1/max(H, W)) ** decay_power (with an orthonormal inverse FFT)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    freqs = np.sqrt(fx * fx + fy * fy)
    scale = 1.0 / np.maximum(freqs, 1.0 / max(w, h)) ** decay_power
    return torch.from_numpy(scale.astype(np.float32))


def init_spectrum(n: int, h: int, w: int, sd: float, seeds: list[int]) -> torch.Tensor:
    """(n, 3, H, W//2+1, 2) normal(0, sd) spectra; image ``i`` from its own seed ``seeds[i]``.

    One generator per image makes an image's start (and so its result) independent of
    which other images share its optimisation batch.
    """
    shape = spectrum_shape(h, w)
    out = torch.empty((n, *shape), dtype=torch.float32)
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(int(s))
        out[i] = torch.randn(shape, generator=g) * sd
    return out


def to_rgb(spectrum: torch.Tensor, h: int, w: int, scale: torch.Tensor) -> torch.Tensor:
    """Spectrum parameters (B, 3, H, W//2+1, 2) -> RGB images (B, 3, H, W) in [0, 1]."""
    z = torch.view_as_complex((spectrum * scale[..., None]).contiguous())
    img = torch.fft.irfftn(z, s=(h, w), norm="ortho") / FFT_MAGIC
    color = torch.as_tensor(COLOR_MATRIX, device=img.device, dtype=img.dtype)
    img = torch.einsum("bchw,rc->brhw", img, color)
    return torch.sigmoid(img)
