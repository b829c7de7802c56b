"""Opening a probe image as 8-bit RGB, the way the model and the report see it (no torch).

- 16-bit and 32-bit single-channel images (PNG/TIFF modes ``I;16``, ``I;16B``, ``I``,
  ``F``) are *scaled* to 8 bits. Pillow's ``convert("RGB")`` clips them instead: every
  value above 255 — nearly all of a 16-bit image — becomes white.
- An image larger than Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``,
  about 89 megapixels) is refused with :class:`ImageTooLarge`, a ``ValueError`` the
  loaders already treat as an unreadable image (skipped under ``--on-bad-image skip``,
  otherwise exit 2 naming it). Pillow itself only warns up to twice the limit and
  decodes such an image in full.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image


class ImageTooLarge(ValueError):
    """The image is past Pillow's decompression-bomb limit."""


_SIXTEEN = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB; high-bit-depth grey images scaled to 0–255 rather than clipped."""
    if im.mode == "RGB":
        return im.copy()  # decoded, and independent of the file (which the caller closes)
    if im.mode in _SIXTEEN or im.mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        top = float(a.max()) if a.size else 0.0
        if im.mode in _SIXTEEN:
            scale = 65535.0
        elif im.mode == "I":  # 32-bit integers: 8- or 16-bit data stored wide, or anything else
            scale = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
        else:  # float: [0, 1] data, 0-255 data, or anything else
            scale = 1.0 if top <= 1.0 else 255.0 if top <= 255 else top
        a = np.clip(np.rint(a * (255.0 / scale)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    return im.convert("RGB")


def check_pixels(data: bytes) -> None:
    """Raise :class:`ImageTooLarge` if the encoded image's header declares more pixels than
    Pillow's limit (reads the header only; an undecodable header is left to the decoder)."""
    import io

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)):
                pass
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ImageTooLarge(f"image past Pillow's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} "
                                f"pixels ({exc})") from None
        except Exception:  # noqa: BLE001 - not for Pillow to judge; the device decoder reports it
            pass


def open_rgb(path: str | Path) -> Image.Image:
    """Open and decode ``path`` as 8-bit RGB (see :func:`to_rgb`); refuse decompression bombs."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                return to_rgb(im)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ImageTooLarge(f"image past Pillow's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} "
                                f"pixels ({exc})") from None
