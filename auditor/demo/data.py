"""The demo probe set: synthetic photo-like images with known, multi-label concepts.

Every image is a textured background with one coloured shape on it (radius 20-32%
of the image, tilted by up to 45 degrees, painted with opacity 0.5-1 so some are
faint) and, now and then, artifacts pasted over it. The concepts (one 0/1 column each) are

* shape (the class): ``circle``, ``square``, ``triangle``, ``star``
* colour of the shape: ``red``, ``green``, ``blue``, ``yellow``
* background texture: ``gradient``, ``noise``, ``stripes``, ``dots``, ``checker``, ``clouds``
* artifacts (see :mod:`auditor.artifacts`): ``watermark``, ``text``, ``border``, ``timestamp``

Image ``i`` of ``generate(n, seed)`` depends only on ``(seed, i)`` (and the
artifact rates), so a larger set starts with the images of a smaller one. Shapes
are balanced (image ``i`` has class ``i % 4``); colours and textures are drawn
uniformly; each artifact is pasted independently of everything else with its
rate (20% by default) unless a :class:`Shortcut` ties one to a class, which is
how :mod:`auditor.demo.train` plants the shortcut.

Everything is synthetic and drawn with numpy and Pillow; nothing is downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from auditor.artifacts import get_artifact
from auditor.errors import ConfigError, DataError, did_you_mean

__all__ = [
    "ARTIFACT_CONCEPTS",
    "COLORS",
    "CONCEPTS",
    "CONCEPT_GROUPS",
    "DEFAULT_ARTIFACT_RATES",
    "DemoSet",
    "SHAPES",
    "Shortcut",
    "TEXTURES",
    "generate",
    "make_probe_set",
    "render",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
TEXTURES: tuple[str, ...] = ("gradient", "noise", "stripes", "dots", "checker", "clouds")
ARTIFACT_CONCEPTS: tuple[str, ...] = ("watermark", "text", "border", "timestamp")
#: Concept columns of the label table, in order.
CONCEPTS: tuple[str, ...] = SHAPES + COLORS + TEXTURES + ARTIFACT_CONCEPTS
CONCEPT_GROUPS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLORS,
    "texture": TEXTURES,
    "artifact": ARTIFACT_CONCEPTS,
}
#: Chance that each artifact is pasted on a probe image, independently of the rest.
DEFAULT_ARTIFACT_RATES: dict[str, float] = {name: 0.2 for name in ARTIFACT_CONCEPTS}

# Base RGB of the shape colours; each image jitters brightness and hue a little.
_SHAPE_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 175, 55),
    "blue": (40, 70, 215),
    "yellow": (235, 205, 30),
}
# Shapes start upright (square axis-aligned, triangle and star pointing up) and are
# tilted by at most this much either way.
_MAX_TILT = math.radians(45)
# Shapes are painted with an opacity drawn from this range, so some are faint: hard
# examples, on which a shortcut pays off during training.
_SHAPE_OPACITY = (0.5, 1.0)
# The order artifacts are pasted in (frames first, the watermark last, over everything).
_ARTIFACT_ORDER: tuple[str, ...] = ("border", "text", "timestamp", "watermark")


@dataclass(frozen=True)
class Shortcut:
    """Tie an artifact to a class: ``p_class`` of that class's images carry it,
    ``p_other`` of the other classes' images do."""

    cls: str
    artifact: str = "watermark"
    p_class: float = 0.95
    p_other: float = 0.03

    def __post_init__(self) -> None:
        if self.cls not in SHAPES:
            raise ConfigError(f"shortcut class: unknown {self.cls!r}{did_you_mean(self.cls, SHAPES)}; expected one of {', '.join(SHAPES)}")
        if self.artifact not in ARTIFACT_CONCEPTS:
            raise ConfigError(
                f"shortcut artifact: unknown {self.artifact!r}{did_you_mean(self.artifact, ARTIFACT_CONCEPTS)}; "
                f"expected one of {', '.join(ARTIFACT_CONCEPTS)}"
            )
        for name in ("p_class", "p_other"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"shortcut {name}: expected a probability in [0, 1], got {p}")


class DemoSet(NamedTuple):
    """What :func:`generate` returns; unpacks as ``images, labels, classes``."""

    images: list[Image.Image]
    labels: pd.DataFrame  # one int 0/1 column per concept, in CONCEPTS order
    classes: list[str]  # the class (shape) names, index = class id

    @property
    def targets(self) -> np.ndarray:
        """Class index of each image (int64)."""
        return self.labels[list(self.classes)].to_numpy().argmax(axis=1).astype(np.int64)


# --------------------------------------------------------------------------- drawing


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A background colour: moderate brightness, low-to-medium saturation."""
    grey = rng.uniform(70, 190)
    tint = rng.normal(0, 28, size=3)
    return np.clip(grey + tint, 20, 235)


def _blur(arr: np.ndarray, radius: float) -> np.ndarray:
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)


def _background(texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """H x W x 3 float array in [0, 255]."""
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    c1, c2 = _muted(rng), _muted(rng)
    if texture == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        t = (xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta)
        t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
        bg = c1 * (1 - t[..., None]) + c2 * t[..., None]
        bg = bg + rng.normal(0, 3, size=(s, s, 1))
    elif texture == "noise":  # grass / gravel: fine grain with short vertical streaks
        grain = rng.normal(0, 1, size=(s, s)).astype(np.float32)
        streak = _blur(np.repeat((grain[..., None] * 40 + 128), 3, axis=2), 0.6)[..., 0] - 128
        bg = c1 + (streak[..., None] * rng.uniform(0.8, 1.4)) + rng.normal(0, 10, size=(s, s, 3))
    elif texture == "stripes":
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(0.1, 0.25)
        t = (xx * math.cos(theta) + yy * math.sin(theta)) / period
        w = 0.5 + 0.5 * np.tanh(4 * np.sin(2 * math.pi * t))
        bg = c1 * w[..., None] + c2 * (1 - w[..., None])
        bg = bg + rng.normal(0, 4, size=(s, s, 3))
    elif texture == "dots":
        period = rng.uniform(0.1, 0.18)
        radius = period * rng.uniform(0.18, 0.3)
        ox, oy = rng.uniform(0, period, size=2)
        dx = np.mod(xx + ox, period) - period / 2
        dy = np.mod(yy + oy, period) - period / 2
        d = np.sqrt(dx * dx + dy * dy)
        w = np.clip((radius - d) * s + 0.5, 0, 1)
        bg = c1 * (1 - w[..., None]) + c2 * w[..., None]
        bg = bg + rng.normal(0, 4, size=(s, s, 3))
    elif texture == "checker":
        cell = rng.uniform(0.08, 0.2)
        theta = rng.uniform(-0.4, 0.4)
        u = (xx * math.cos(theta) - yy * math.sin(theta)) / cell
        v = (xx * math.sin(theta) + yy * math.cos(theta)) / cell
        w = (np.floor(u) + np.floor(v)) % 2
        bg = c1 * w[..., None] + c2 * (1 - w[..., None])
        bg = bg + rng.normal(0, 4, size=(s, s, 3))
    elif texture == "clouds":  # value noise, three octaves
        acc = np.zeros((s, s), dtype=np.float32)
        amp_total = 0.0
        for octave, amp in ((4, 1.0), (8, 0.5), (16, 0.25)):
            coarse = rng.random((octave, octave)).astype(np.float32)
            up = Image.fromarray((coarse * 255).astype(np.uint8)).resize((s, s), Image.Resampling.BICUBIC)
            acc += amp * np.asarray(up, dtype=np.float32) / 255.0
            amp_total += amp
        t = np.clip((acc / amp_total - 0.5) * 2.0 + 0.5, 0, 1)
        bg = c1 * (1 - t[..., None]) + c2 * t[..., None]
    else:  # pragma: no cover - guarded by TEXTURES
        raise ValueError(texture)
    return np.clip(bg, 0, 255)


def _star(cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = rot + k * math.pi / 5 - math.pi / 2
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    """An ``L`` mask of the shape, antialiased by drawing at 4x and shrinking."""
    ss = 4
    big = size * ss
    r = rng.uniform(0.2, 0.32) * size
    margin = r * 1.05
    cx = rng.uniform(margin, size - margin)
    cy = rng.uniform(margin, size - margin)
    rot = rng.uniform(-1, 1) * _MAX_TILT
    cx, cy, rb = cx * ss, cy * ss, r * ss
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((cx - rb, cy - rb, cx + rb, cy + rb), fill=255)
    elif shape == "square":
        half = rb * 0.82
        pts = [
            (cx + half * math.sqrt(2) * math.cos(rot + math.pi / 4 + k * math.pi / 2),
             cy + half * math.sqrt(2) * math.sin(rot + math.pi / 4 + k * math.pi / 2))
            for k in range(4)
        ]
        draw.polygon(pts, fill=255)
    elif shape == "triangle":
        pts = [
            (cx + rb * math.cos(rot - math.pi / 2 + k * 2 * math.pi / 3),
             cy + rb * math.sin(rot - math.pi / 2 + k * 2 * math.pi / 3))
            for k in range(3)
        ]
        draw.polygon(pts, fill=255)
    elif shape == "star":
        draw.polygon(_star(cx, cy, rb * 1.1, rot), fill=255)
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(shape)
    return mask.resize((size, size), Image.Resampling.BOX)


def render(
    shape: str,
    color: str,
    texture: str,
    rng: np.random.Generator,
    image_size: int = 64,
    artifacts: tuple[str, ...] = (),
) -> Image.Image:
    """One demo image: ``texture`` background, a ``color`` ``shape``, then ``artifacts``."""
    bg = _background(texture, image_size, rng)
    mask = np.asarray(_shape_mask(shape, image_size, rng), dtype=np.float32)[..., None] / 255.0
    mask = mask * rng.uniform(*_SHAPE_OPACITY)
    rgb = np.asarray(_SHAPE_RGB[color], dtype=np.float32) * rng.uniform(0.8, 1.1) + rng.normal(0, 8, size=3)
    # a gentle light-to-shade ramp across the shape so it is not perfectly flat
    yy = np.linspace(1.08, 0.92, image_size, dtype=np.float32)[:, None, None]
    shaded = np.clip(rgb * yy + rng.normal(0, 3, size=(image_size, image_size, 3)), 0, 255)
    img = Image.fromarray(np.clip(np.rint(bg * (1 - mask) + shaded * mask), 0, 255).astype(np.uint8), "RGB")
    for name in _ARTIFACT_ORDER:
        if name in artifacts:
            img = get_artifact(name)(img, rng)
    return img


# --------------------------------------------------------------------------- sets


def _check_rates(artifact_rates: Mapping[str, float] | None) -> dict[str, float]:
    rates = dict(DEFAULT_ARTIFACT_RATES)
    if artifact_rates is None:
        return rates
    if not isinstance(artifact_rates, Mapping):
        raise ConfigError(f"artifact_rates: expected a mapping of artifact name to probability, got {artifact_rates!r}")
    for name, p in artifact_rates.items():
        if name not in rates:
            raise ConfigError(
                f"artifact_rates: unknown artifact {name!r}{did_you_mean(str(name), ARTIFACT_CONCEPTS)}; "
                f"expected some of {', '.join(ARTIFACT_CONCEPTS)}"
            )
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            raise ConfigError(f"artifact_rates[{name!r}]: expected a probability in [0, 1], got {p!r}")
        rates[name] = float(p)
    return rates


def generate(
    n: int,
    seed: int = 0,
    image_size: int = 64,
    artifact_rates: Mapping[str, float] | None = None,
    shortcut: Shortcut | None = None,
) -> DemoSet:
    """``n`` demo images with their concept labels.

    Args:
        n: number of images (>= 1).
        seed: image ``i`` is drawn from ``numpy.random.default_rng([seed, i])``.
        image_size: side of the square RGB images in pixels (>= 16).
        artifact_rates: probability of each artifact per image, overriding
            ``DEFAULT_ARTIFACT_RATES`` (0.2 each) for the names given.
        shortcut: tie one artifact to one class instead (see :class:`Shortcut`).

    Returns:
        ``DemoSet(images, labels, classes)``: PIL RGB images, a DataFrame with
        one int 0/1 column per concept (``CONCEPTS`` order), and ``list(SHAPES)``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"n: expected a positive integer, got {n!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 16:
        raise ConfigError(f"image_size: expected an integer >= 16, got {image_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed: expected a non-negative integer, got {seed!r}")
    rates = _check_rates(artifact_rates)
    images: list[Image.Image] = []
    rows = np.zeros((int(n), len(CONCEPTS)), dtype=np.int64)
    col = {c: j for j, c in enumerate(CONCEPTS)}
    for i in range(int(n)):
        rng = np.random.default_rng([int(seed), i])
        shape = SHAPES[i % len(SHAPES)]
        color = COLORS[int(rng.integers(len(COLORS)))]
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        draws = rng.random(len(ARTIFACT_CONCEPTS))
        present = []
        for name, u in zip(ARTIFACT_CONCEPTS, draws):
            p = rates[name]
            if shortcut is not None and name == shortcut.artifact:
                p = shortcut.p_class if shape == shortcut.cls else shortcut.p_other
            if u < p:
                present.append(name)
        images.append(render(shape, color, texture, rng, int(image_size), tuple(present)))
        for c in (shape, color, texture, *present):
            rows[i, col[c]] = 1
    labels = pd.DataFrame(rows, columns=list(CONCEPTS))
    return DemoSet(images, labels, list(SHAPES))


def make_probe_set(root: Path | str, n: int = 800, seed: int = 0, image_size: int = 64) -> Path:
    """Write the demo probe set under ``root`` and return the label CSV's path.

    Writes ``root/images/0000.png`` ... and ``root/labels.csv``: a wide CSV whose
    first column ``path`` is relative to ``root/images`` and whose other columns
    are the concepts (0/1). Artifacts appear with their default rates (20% each),
    independently of the shape classes. Existing files of the same names are
    overwritten.
    """
    root = Path(root)
    images_dir = root / "images"
    try:
        images_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the probe set folder {images_dir} ({exc})") from None
    demo = generate(n, seed=seed, image_size=image_size)
    width = max(4, len(str(n - 1)))
    names = [f"{i:0{width}d}.png" for i in range(n)]
    for name, img in zip(names, demo.images):
        img.save(images_dir / name, compress_level=1)
    table = demo.labels.copy()
    table.insert(0, "path", names)
    csv_path = root / "labels.csv"
    table.to_csv(csv_path, index=False)
    return csv_path
