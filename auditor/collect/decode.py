"""Decoding and preprocessing raw image bytes on the model's device (nvJPEG on CUDA)."""

from __future__ import annotations

import torch

from ..errors import DataError
from ..models import Preprocessing

def decode_on_device(datas: list[torch.Tensor], rows: list[int], dev: torch.device, pre: Preprocessing | None,
                      normalize: bool = True):
    """Decode raw image bytes on ``dev`` (nvJPEG on CUDA) and preprocess there.

    Returns (batch tensor or None, good rows, [(row, reason)] of failures).
    Non-JPEG files, and JPEGs the GPU decoder rejects, are decoded on the CPU.
    """
    import warnings

    with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; these decoders still work
        warnings.simplefilter("ignore", DeprecationWarning)
        return _decode_batch(datas, rows, dev, pre, normalize)


def _decode_batch(datas, rows, dev, pre, normalize):
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    from torchvision.transforms.v2 import functional as F

    imgs: list[torch.Tensor | None] = [None] * len(datas)
    failed: list[tuple[int, str]] = []
    jpeg = [i for i, d in enumerate(datas) if d.numel() > 2 and int(d[0]) == 0xFF and int(d[1]) == 0xD8]
    if dev.type == "cuda" and jpeg:
        try:
            out = decode_jpeg([datas[i] for i in jpeg], mode=ImageReadMode.RGB, device=dev)
            for i, im in zip(jpeg, out):
                imgs[i] = im
        except RuntimeError:
            pass  # one bad file fails the batch call: decode these one by one below
    for i, d in enumerate(datas):
        if imgs[i] is not None:
            continue
        try:
            imgs[i] = decode_image(d.cpu(), mode=ImageReadMode.RGB).to(dev, non_blocking=True)
        except (RuntimeError, ValueError) as exc:
            failed.append((rows[i], f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"))
    out_imgs, good = [], []
    for i, im in enumerate(imgs):
        if im is None:
            continue
        x = im.float() if im.dtype != torch.uint16 else im.float().div_(257.0)  # 16-bit PNG: scale to 0-255
        if pre is not None and pre.resize:
            x = F.resize(x, [pre.resize], antialias=True,
                         interpolation=F.InterpolationMode.BICUBIC if getattr(pre, "interpolation", "bilinear")
                         == "bicubic" else F.InterpolationMode.BILINEAR)
        if pre is not None and pre.crop:
            x = F.center_crop(x, [pre.crop])
        out_imgs.append(x)
        good.append(rows[i])
    if not out_imgs:
        return None, good, failed
    shapes = {tuple(x.shape) for x in out_imgs}
    if len(shapes) > 1:
        raise DataError("probe images have different sizes after preprocessing "
                        f"({', '.join(str(s) for s in sorted(shapes)[:3])}); pass --resize and --crop "
                        "so every image reaches the model at the same size")
    x = torch.stack(out_imgs).div_(255.0)
    if normalize and pre is not None and pre.mean is not None and pre.std is not None:
        mean = torch.tensor(pre.mean, device=dev, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(pre.std, device=dev, dtype=x.dtype).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x, good, failed
