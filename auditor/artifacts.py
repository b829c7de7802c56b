"""Artifact concepts: generators that paste "Clever Hans" artifacts onto images.

An *artifact generator* takes a PIL image and a :class:`numpy.random.Generator`
and returns a **new** image of the same size and mode with an artifact pasted
on (a stock-photo watermark, overlaid words, a coloured frame, a camera date
stamp). The input image is never modified, and the output depends only on the
input, the parameters and the state of the generator, so a seeded generator
gives byte-identical images.

Generators live in a registry filled by a decorator, so users can add their own::

    from auditor.artifacts import register_artifact

    @register_artifact("sticker")
    def sticker(image, rng, *, size=(0.1, 0.2)):
        '''A round price sticker.  size: diameter as a fraction of the width.'''
        ...
        return new_image

    get_artifact("sticker")(img, np.random.default_rng(0), size=0.15)

Unknown generator names and unknown parameters raise
:class:`auditor.errors.ConfigError` with the closest matches.

Parameter conventions shared by the built-ins:

* A *range* parameter accepts a number (used as is) or a ``(low, high)`` pair
  (drawn uniformly from the generator on every call).
* Sizes and positions are fractions of the image, so the same parameters work at
  any resolution. ``position`` is the ``(x, y)`` centre of the artifact as
  fractions of width and height; ``None`` draws it at random.
* Colours are ``(r, g, b)`` tuples of 0-255 integers; ``None`` draws one.
* Text is drawn with Pillow's built-in scalable font (``ImageFont.load_default``,
  Pillow >= 10.1), so images are identical on every machine with the same
  Pillow/FreeType; pass ``font="path/to/font.ttf"`` to use another font.
"""

from __future__ import annotations

import datetime as _dt
import functools
import inspect
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, features

from auditor.errors import ConfigError, did_you_mean

__all__ = [
    "ARTIFACTS",
    "ArtifactGenerator",
    "BUILTIN_ARTIFACTS",
    "apply_artifact",
    "available_artifacts",
    "border",
    "get_artifact",
    "register_artifact",
    "text",
    "timestamp",
    "watermark",
]

Range = Union[float, int, Sequence[float]]
Color = Sequence[int]

#: Names of the generators shipped with auditor (all of them are artifact concepts).
BUILTIN_ARTIFACTS: tuple[str, ...] = ("watermark", "text", "border", "timestamp")


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ArtifactGenerator:
    """A registered artifact generator.

    Call it like the wrapped function: ``gen(image, rng, **params)``. The wrapper
    checks the arguments (unknown parameters raise :class:`ConfigError` naming
    the closest valid ones), hands the function a copy of the image so the
    caller's image cannot be modified, and checks that the result is a PIL image
    of the same size and mode.
    """

    name: str
    func: Callable[..., Image.Image]
    params: tuple[str, ...]
    accepts_any: bool = False
    doc: str = field(default="", repr=False)

    def __call__(self, image: Image.Image, rng: np.random.Generator | int, **params: Any) -> Image.Image:
        if not isinstance(image, Image.Image):
            raise TypeError(f"artifact {self.name!r} expects a PIL.Image.Image, got {type(image).__name__}")
        if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
            rng = np.random.default_rng(int(rng))
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"artifact {self.name!r} expects a numpy.random.Generator, got {type(rng).__name__}")
        if not self.accepts_any:
            unknown = [k for k in params if k not in self.params]
            if unknown:
                key = unknown[0]
                raise ConfigError(
                    f"artifact {self.name!r} has no parameter {key!r}{did_you_mean(key, self.params)}; "
                    f"expected one of: {', '.join(self.params) or '(none)'}"
                )
        out = self.func(image.copy(), rng, **params)
        if not isinstance(out, Image.Image):
            raise ConfigError(
                f"artifact generator {self.name!r} returned {type(out).__name__}, expected a PIL.Image.Image"
            )
        if out.size != image.size or out.mode != image.mode:
            raise ConfigError(
                f"artifact generator {self.name!r} returned a {out.mode} image of size {out.size}, "
                f"expected the input's mode {image.mode} and size {image.size}"
            )
        return out

    def describe(self) -> str:
        """The first paragraph of the generator's docstring."""
        return (self.doc or "").strip().split("\n\n")[0].replace("\n", " ").strip()


#: The registry: artifact name -> generator. Fill it with :func:`register_artifact`.
ARTIFACTS: dict[str, ArtifactGenerator] = {}


def register_artifact(
    name: str, *, overwrite: bool = False
) -> Callable[[Callable[..., Image.Image]], ArtifactGenerator]:
    """Decorator registering ``func(image, rng, **params) -> Image`` under ``name``.

    The decorated name is bound to the :class:`ArtifactGenerator` wrapper.
    Registering a name twice raises :class:`ConfigError` unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ConfigError(f"artifact name must be a non-empty string without surrounding spaces, got {name!r}")

    def decorator(func: Callable[..., Image.Image]) -> ArtifactGenerator:
        if name in ARTIFACTS and not overwrite:
            raise ConfigError(
                f"artifact {name!r} is already registered; pass overwrite=True to replace it"
            )
        sig = inspect.signature(func)
        plist = list(sig.parameters.values())
        if len(plist) < 2 or any(
            p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in plist[:2]
        ):
            raise ConfigError(
                f"artifact generator {name!r} must take (image, rng, **params), got {func.__name__}{sig}"
            )
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in plist)
        params = tuple(
            p.name for p in plist[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        )
        gen = ArtifactGenerator(
            name=name, func=func, params=params, accepts_any=accepts_any, doc=inspect.getdoc(func) or ""
        )
        ARTIFACTS[name] = gen
        return gen

    return decorator


def get_artifact(name: str) -> ArtifactGenerator:
    """The registered generator called ``name``; :class:`ConfigError` if there is none."""
    try:
        return ARTIFACTS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown artifact {name!r}{did_you_mean(str(name), ARTIFACTS)}; "
            f"registered: {', '.join(sorted(ARTIFACTS)) or '(none)'}"
        ) from None


def available_artifacts() -> list[str]:
    """Sorted names of the registered generators."""
    return sorted(ARTIFACTS)


def apply_artifact(
    name: str, image: Image.Image, rng: np.random.Generator | int, **params: Any
) -> Image.Image:
    """Shorthand for ``get_artifact(name)(image, rng, **params)``."""
    return get_artifact(name)(image, rng, **params)


# --------------------------------------------------------------------------- helpers


def _draw(rng: np.random.Generator, value: Any, name: str, *, lo: float | None = None, hi: float | None = None) -> float:
    """A number, or a uniform draw from a ``(low, high)`` pair; checked against [lo, hi]."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        x = float(value)
    elif (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in value)
    ):
        a, b = float(value[0]), float(value[1])
        if a > b:
            raise ConfigError(f"{name}: expected (low, high) with low <= high, got {tuple(value)}")
        x = float(rng.uniform(a, b)) if a < b else a
        if lo is not None and a < lo or hi is not None and b > hi:
            raise ConfigError(f"{name}: expected a range within [{lo}, {hi}], got {tuple(value)}")
    else:
        raise ConfigError(f"{name}: expected a number or a (low, high) pair, got {value!r}")
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise ConfigError(f"{name}: expected a value in [{lo}, {hi}], got {x}")
    return x


def _color(value: Any, name: str) -> tuple[int, int, int]:
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) in (3, 4)
        and all(isinstance(v, (int, np.integer)) and 0 <= int(v) <= 255 for v in value)
    ):
        return (int(value[0]), int(value[1]), int(value[2]))
    raise ConfigError(f"{name}: expected an (r, g, b) tuple of integers 0-255, got {value!r}")


def _position(rng: np.random.Generator, value: Any, name: str, margin: tuple[float, float]) -> tuple[float, float]:
    """Centre as fractions; ``None`` draws it uniformly inside the given margins."""
    if value is None:
        mx, my = (min(max(m, 0.0), 0.5) for m in margin)
        return float(rng.uniform(mx, 1 - mx)), float(rng.uniform(my, 1 - my))
    if value == "center" or value == "centre":
        return 0.5, 0.5
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in value)
    ):
        x, y = float(value[0]), float(value[1])
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            raise ConfigError(f"{name}: expected fractions in [0, 1], got {tuple(value)}")
        return x, y
    raise ConfigError(f"{name}: expected None, 'center' or an (x, y) pair of fractions, got {value!r}")


_BITMAP_WARNED = False


@functools.lru_cache(maxsize=256)
def _font(size: int, path: str | None = None) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    size = max(1, int(size))
    if path is not None:
        try:
            return ImageFont.truetype(path, size)
        except OSError as exc:
            raise ConfigError(f"font: cannot load {path!r} ({exc})") from None
    if features.check("freetype2"):
        return ImageFont.load_default(size=size)
    global _BITMAP_WARNED
    if not _BITMAP_WARNED:  # pragma: no cover - Pillow without FreeType
        warnings.warn("Pillow has no FreeType: artifact text uses the fixed-size bitmap font", stacklevel=3)
        _BITMAP_WARNED = True
    return ImageFont.load_default()  # pragma: no cover


def _font_arg(font: Any) -> str | None:
    if font is None:
        return None
    if isinstance(font, (str, os.PathLike)):
        return os.fspath(font)
    raise ConfigError(f"font: expected None or a path to a .ttf/.otf file, got {font!r}")


def _text_mask(text: str, font: Any, stroke: int = 0) -> Image.Image:
    """An ``L`` image, tight around ``text``: 255 where the glyphs are."""
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
    pad = 1 + stroke
    mask = Image.new("L", (max(1, right - left + 2 * pad), max(1, bottom - top + 2 * pad)), 0)
    ImageDraw.Draw(mask).text(
        (pad - left, pad - top), text, fill=255, font=font, stroke_width=stroke, stroke_fill=255
    )
    return mask


def _fit_font_size(text: str, target_width: float, font_path: str | None, min_size: int = 5) -> int:
    """The font size at which ``text`` is about ``target_width`` pixels wide."""
    ref = 100
    left, _, right, _ = _font(ref, font_path).getbbox(text)
    width = max(1, right - left)
    return max(min_size, int(round(ref * target_width / width)))


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode == "RGB":
        return np.asarray(image, dtype=np.float32)
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _from_rgb(rgb: np.ndarray, like: Image.Image) -> Image.Image:
    """Back to ``like``'s mode; an alpha channel of ``like`` is kept as it was."""
    out = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    if like.mode == "RGB":
        return out
    if like.mode == "RGBA":
        out.putalpha(like.getchannel("A"))
        return out
    if like.mode == "LA":
        la = out.convert("L").convert("LA")
        la.putalpha(like.getchannel("A"))
        return la
    return out.convert(like.mode)


def _composite(image: Image.Image, alpha: np.ndarray, ink: np.ndarray | Sequence[int]) -> Image.Image:
    """``image * (1 - alpha) + ink * alpha`` with ``alpha`` (H x W) in [0, 1]."""
    base = _to_rgb(image)
    a = alpha.astype(np.float32)[..., None]
    ink_arr = np.asarray(ink, dtype=np.float32)
    return _from_rgb(base * (1.0 - a) + ink_arr * a, image)


def _place(canvas_size: tuple[int, int], mask: Image.Image, centre: tuple[float, float]) -> np.ndarray:
    """Paste ``mask`` centred at ``centre`` (pixels) on an empty canvas; returns floats in [0, 1]."""
    canvas = Image.new("L", canvas_size, 0)
    x0 = int(round(centre[0] - mask.width / 2))
    y0 = int(round(centre[1] - mask.height / 2))
    canvas.paste(mask, (x0, y0))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _choice(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _check_str(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name}: expected a non-empty string, got {value!r}")
    return value


# --------------------------------------------------------------------------- watermark

_BOLD_MIN, _BOLD_DIV = 2, 8  # bold outline (at twice the size): max(min, size / div)
WATERMARK_TEXTS: tuple[str, ...] = (
    "\u00a9 STOCK",
    "SAMPLE",
    "PREVIEW",
    "\u00a9 PHOTOBANK",
    "stockery",
    "\u00a9 pixelmart",
    "PROOF",
    "DO NOT COPY",
)


@functools.lru_cache(maxsize=32)
def _load_logo(path: str, mtime: float) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            logo = im
    except (OSError, ValueError) as exc:
        raise ConfigError(f"watermark logo: cannot read {path!r} ({exc})") from None
    return _logo_rgba(logo)


def _logo_rgba(logo: Image.Image) -> Image.Image:
    has_alpha = logo.mode in ("RGBA", "LA", "PA") or (logo.mode == "P" and "transparency" in logo.info)
    if has_alpha:
        rgba = logo.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            return rgba
    # No transparency: treat it as dark ink on a light background.
    rgba = logo.convert("RGBA")
    rgba.putalpha(Image.eval(logo.convert("L"), lambda v: 255 - v))
    return rgba


@register_artifact("watermark")
def watermark(
    image: Image.Image,
    rng: np.random.Generator,
    text: str | None = None,
    logo: str | os.PathLike | Image.Image | None = None,
    opacity: Range = (0.3, 0.6),
    scale: Range | None = None,
    angle: Range = (-40.0, 40.0),
    position: Any = None,
    tiled: bool | None = None,
    color: Color = (255, 255, 255),
    bold: bool = True,
    font: str | os.PathLike | None = None,
) -> Image.Image:
    """Stock-photo watermark: semi-transparent text or logo, single or tiled.

    The mark is alpha-composited (``out = image * (1 - a) + ink * a`` with
    ``a = opacity * glyph coverage``), so the photo stays visible through it;
    it is never a filled box.

    Parameters:
        text: the words of the mark. ``None`` draws one of ``WATERMARK_TEXTS``
            ("© STOCK", "SAMPLE", "PREVIEW", ...). Ignored when ``logo`` is given.
        logo: a PNG path (or PIL image) used instead of text. Its own colours and
            alpha channel are used (alpha scaled by ``opacity``); a logo without
            transparency is read as dark ink on white (luminance gives the mask).
        opacity: range in (0, 1], default ``(0.3, 0.6)``: the alpha of fully
            covered pixels.
        scale: range, the width of one mark (before rotation) as a fraction of
            the image width. Default ``(0.5, 0.95)`` single, ``(0.3, 0.5)`` tiled.
        angle: range in degrees, counter-clockwise, default ``(-40, 40)``.
        position: ``(x, y)`` centre as fractions of the image, ``"center"``, or
            ``None`` (default): uniform in the middle half of the image. For a
            tiled mark it shifts the tiling.
        tiled: repeat the mark over the whole image in staggered rows.
            ``None`` (default): tiled with probability 0.25.
        color: ink colour of a text mark, default white ``(255, 255, 255)``.
        bold: thicken the letters (by about 1/16 of the font size, at least one
            pixel, on each side), as stock watermarks usually are. Default True.
        font: a .ttf/.otf path; default Pillow's built-in font.
    """
    w, h = image.size
    op = _draw(rng, opacity, "watermark opacity", lo=0.0, hi=1.0)
    if tiled is None:
        is_tiled = bool(rng.random() < 0.25)
    elif isinstance(tiled, (bool, np.bool_)):
        is_tiled = bool(tiled)
    else:
        raise ConfigError(f"watermark tiled: expected True, False or None, got {tiled!r}")
    sc = _draw(rng, scale if scale is not None else ((0.3, 0.5) if is_tiled else (0.5, 0.95)),
               "watermark scale", lo=0.01, hi=4.0)
    ang = _draw(rng, angle, "watermark angle", lo=-360.0, hi=360.0)
    cx, cy = _position(rng, position, "watermark position", (0.25, 0.25))
    target_w = max(4.0, sc * w)

    if logo is not None:
        if isinstance(logo, Image.Image):
            src = _logo_rgba(logo)
        elif isinstance(logo, (str, os.PathLike)):
            path = os.fspath(logo)
            if not os.path.isfile(path):
                raise ConfigError(f"watermark logo: file not found: {path!r}")
            src = _load_logo(path, os.path.getmtime(path))
        else:
            raise ConfigError(f"watermark logo: expected a path or a PIL image, got {type(logo).__name__}")
        lw = max(2, int(round(target_w)))
        lh = max(2, int(round(src.height * lw / src.width)))
        mark = src.convert("RGBa").resize((lw, lh), Image.Resampling.LANCZOS)
    else:
        words = _check_str(text, "watermark text") if text is not None else _choice(rng, WATERMARK_TEXTS)
        font_path = _font_arg(font)
        size = _fit_font_size(words, target_w, font_path)
        if not isinstance(bold, (bool, np.bool_)):
            raise ConfigError(f"watermark bold: expected True or False, got {bold!r}")
        if bold:
            # Render at twice the size with an outline and shrink: about size/16
            # (at least 1) extra pixels on each side of every stroke.
            thick = max(_BOLD_MIN, int(round(size / _BOLD_DIV)))
            size2 = max(10, int(round(2 * size * target_w / (target_w + thick))))
            big = _text_mask(words, _font(size2, font_path), thick)
            mask = big.resize((max(1, big.width // 2), max(1, big.height // 2)), Image.Resampling.BOX)
        else:
            mask = _text_mask(words, _font(size, font_path))
        ink = _color(color, "watermark color")
        mark = Image.new("RGBA", mask.size, ink + (255,))
        mark.putalpha(mask)
        mark = mark.convert("RGBa")
    # ``mark`` is premultiplied ("RGBa"), so resampling never bleeds the colour of
    # transparent pixels into the edges of the letters.

    if is_tiled:
        diag = int(math.ceil(math.hypot(w, h)))
        step_x = int(round(mark.width * 1.35)) + 2
        step_y = int(round(mark.height * 2.2)) + 2
        big_side = diag + 2 * max(step_x, step_y)
        sheet = np.zeros((big_side, big_side, 4), dtype=np.float32)
        tile = np.asarray(mark, dtype=np.float32)
        ox = int(round(cx * step_x)) - step_x
        oy = int(round(cy * step_y)) - step_y
        for row, y in enumerate(range(oy, big_side, step_y)):
            shift = (step_x // 2) if row % 2 else 0
            for x in range(ox - shift, big_side, step_x):
                _over(sheet, tile, x, y)
        rotated = _rgba_image(sheet).rotate(ang, resample=Image.Resampling.BICUBIC)
        left, top = (big_side - w) // 2, (big_side - h) // 2
        layer = np.asarray(rotated.crop((left, top, left + w, top + h)), dtype=np.float32)
    else:
        rotated = mark.rotate(ang, resample=Image.Resampling.BICUBIC, expand=True)
        layer = np.zeros((h, w, 4), dtype=np.float32)
        x0 = int(round(cx * w - rotated.width / 2))
        y0 = int(round(cy * h - rotated.height / 2))
        _over(layer, np.asarray(rotated, dtype=np.float32), x0, y0)

    alpha = layer[..., 3] / 255.0
    premultiplied = np.minimum(layer[..., :3], layer[..., 3:4])  # colour * alpha, in 0..255
    base = _to_rgb(image)
    return _from_rgb(base * (1.0 - op * alpha[..., None]) + op * premultiplied, image)


def _over(dst: np.ndarray, src: np.ndarray, x: int, y: int) -> None:
    """Premultiplied "over": paint ``src`` (h x w x 4, 0..255) onto ``dst`` at ``(x, y)``, clipped."""
    h, w = src.shape[:2]
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, dst.shape[1]), min(y + h, dst.shape[0])
    if x0 >= x1 or y0 >= y1:
        return
    s = src[y0 - y : y1 - y, x0 - x : x1 - x]
    d = dst[y0:y1, x0:x1]
    d *= 1.0 - s[..., 3:4] / 255.0
    d += s


def _rgba_image(premultiplied: np.ndarray) -> Image.Image:
    """A premultiplied float array (0..255) as an ``RGBa`` image."""
    arr = np.clip(np.rint(premultiplied), 0, 255).astype(np.uint8)
    return Image.frombytes("RGBa", (arr.shape[1], arr.shape[0]), arr.tobytes())


# --------------------------------------------------------------------------- text

TEXT_WORDS: tuple[str, ...] = (
    "SALE", "NEW", "hello", "lorem", "ipsum", "FREE", "50% OFF", "summer", "best", "LOL",
    "Day 1", "wow", "click", "HOT", "news", "cat", "#tbt", "love", "GO", "top 10",
)

TEXT_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 255, 255), (0, 0, 0), (255, 230, 0), (230, 20, 20), (20, 200, 255), (255, 0, 200),
)


@register_artifact("text")
def text(
    image: Image.Image,
    rng: np.random.Generator,
    text: str | None = None,
    size: Range = (0.13, 0.22),
    color: Color | None = None,
    stroke: int | None = None,
    angle: Range = 0.0,
    position: Any = None,
    font: str | os.PathLike | None = None,
) -> Image.Image:
    """Opaque overlaid words, like a caption or a meme line (no background bar).

    Parameters:
        text: the words. ``None`` draws 1-3 words from ``TEXT_WORDS``.
        size: range, the font size as a fraction of the image height, default
            ``(0.13, 0.22)``. The size shrinks if the line would not fit in 95%
            of the width.
        color: fill colour; ``None`` draws one of ``TEXT_COLORS``.
        stroke: outline width in pixels (in a contrasting black or white);
            ``None`` draws 0 or 1.
        angle: range in degrees, default 0 (horizontal).
        position: ``(x, y)`` centre as fractions, ``"center"``, or ``None``
            (default): anywhere the line fits.
        font: a .ttf/.otf path; default Pillow's built-in font.
    """
    w, h = image.size
    if text is None:
        n_words = int(rng.integers(1, 4))
        words = " ".join(_choice(rng, TEXT_WORDS) for _ in range(n_words))
    else:
        words = _check_str(text, "text text")
    font_path = _font_arg(font)
    frac = _draw(rng, size, "text size", lo=0.01, hi=2.0)
    fill = _color(color, "text color") if color is not None else _choice(rng, TEXT_COLORS)
    if stroke is None:
        stroke_w = int(rng.integers(0, 2))
    elif isinstance(stroke, (int, np.integer)) and not isinstance(stroke, bool) and stroke >= 0:
        stroke_w = int(stroke)
    else:
        raise ConfigError(f"text stroke: expected a non-negative integer or None, got {stroke!r}")
    ang = _draw(rng, angle, "text angle", lo=-360.0, hi=360.0)

    fsize = max(5, int(round(frac * h)))
    fsize = min(fsize, _fit_font_size(words, 0.95 * w, font_path))
    fnt = _font(fsize, font_path)
    glyphs = _text_mask(words, fnt, 0)
    outline = _text_mask(words, fnt, stroke_w) if stroke_w else None
    if ang:
        glyphs = glyphs.rotate(ang, resample=Image.Resampling.BICUBIC, expand=True)
        outline = outline.rotate(ang, resample=Image.Resampling.BICUBIC, expand=True) if outline else None
    mw, mh = (outline or glyphs).size
    cx, cy = _position(rng, position, "text position", (mw / (2 * w), mh / (2 * h)))
    centre = (cx * w, cy * h)

    out = image
    if outline is not None:
        lum = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
        edge = (0, 0, 0) if lum > 110 else (255, 255, 255)
        out = _composite(out, _place((w, h), outline, centre), edge)
    return _composite(out, _place((w, h), glyphs, centre), fill)


# --------------------------------------------------------------------------- border

BORDER_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 255, 255), (0, 0, 0), (240, 235, 220), (200, 30, 30), (30, 60, 200), (250, 200, 0),
)


@register_artifact("border")
def border(
    image: Image.Image,
    rng: np.random.Generator,
    width: Range = (0.04, 0.1),
    color: Color | None = None,
) -> Image.Image:
    """A solid coloured frame around the image.

    Parameters:
        width: range, the frame's thickness as a fraction of the shorter side,
            default ``(0.04, 0.1)``; at least 1 pixel.
        color: frame colour; ``None`` draws one of ``BORDER_COLORS`` (white,
            black, cream, red, blue, yellow) with a little jitter.
    """
    w, h = image.size
    frac = _draw(rng, width, "border width", lo=0.0, hi=0.5)
    if color is None:
        base = np.asarray(_choice(rng, BORDER_COLORS), dtype=np.int64)
        fill = tuple(int(v) for v in np.clip(base + rng.integers(-15, 16, size=3), 0, 255))
    else:
        fill = _color(color, "border color")
    px = max(1, int(round(frac * min(w, h))))
    alpha = np.ones((h, w), dtype=np.float32)
    alpha[px : h - px, px : w - px] = 0.0
    return _composite(image, alpha, fill)


# --------------------------------------------------------------------------- timestamp

_CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")
_TS_STYLES = ("ymd", "short", "dmy", "mdy")


@register_artifact("timestamp")
def timestamp(
    image: Image.Image,
    rng: np.random.Generator,
    date: str | _dt.date | None = None,
    style: str | None = None,
    corner: str | None = None,
    size: Range = (0.1, 0.14),
    color: Color | None = None,
    glow: bool | None = None,
    font: str | os.PathLike | None = None,
) -> Image.Image:
    """A camera-style date stamp: orange digits in a corner.

    Parameters:
        date: a ``datetime.date`` or a literal string to print; ``None`` draws a
            date between 1995 and 2022.
        style: how a date is printed: ``"ymd"`` ("2019 08 14"), ``"short"``
            ("'19 8 14"), ``"dmy"`` ("14 08 2019") or ``"mdy"`` ("08 14 2019");
            ``None`` draws one. Ignored when ``date`` is a string.
        corner: ``"bottom-right"``, ``"bottom-left"``, ``"top-right"`` or
            ``"top-left"``; ``None``: bottom-right 70% of the time, else another.
        size: range, the digit height (font size) as a fraction of the image
            height, default ``(0.1, 0.14)``.
        color: ``None`` draws an orange around (255, 150, 40).
        glow: a soft halo around the digits like film date stamps; ``None``
            draws it half the time.
        font: a .ttf/.otf path; default Pillow's built-in font.
    """
    w, h = image.size
    if isinstance(date, str):
        label = _check_str(date, "timestamp date")
    else:
        if date is None:
            d = _dt.date(1995, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 28 * 365)))
        elif isinstance(date, _dt.date):
            d = date
        else:
            raise ConfigError(f"timestamp date: expected None, a datetime.date or a string, got {date!r}")
        st = style if style is not None else _choice(rng, _TS_STYLES)
        if st == "ymd":
            label = f"{d.year} {d.month:02d} {d.day:02d}"
        elif st == "short":
            label = f"'{d.year % 100:02d} {d.month} {d.day}"
        elif st == "dmy":
            label = f"{d.day:02d} {d.month:02d} {d.year}"
        elif st == "mdy":
            label = f"{d.month:02d} {d.day:02d} {d.year}"
        else:
            raise ConfigError(f"timestamp style: unknown {st!r}{did_you_mean(str(st), _TS_STYLES)}; expected one of {', '.join(_TS_STYLES)}")
    if corner is None:
        where = "bottom-right" if rng.random() < 0.7 else _choice(rng, _CORNERS[1:])
    elif corner in _CORNERS:
        where = corner
    else:
        raise ConfigError(f"timestamp corner: unknown {corner!r}{did_you_mean(str(corner), _CORNERS)}; expected one of {', '.join(_CORNERS)}")
    frac = _draw(rng, size, "timestamp size", lo=0.01, hi=1.0)
    if color is None:
        jitter = rng.integers(-12, 13, size=3)
        fill = (int(np.clip(255 + jitter[0], 230, 255)), int(np.clip(150 + jitter[1], 0, 255)),
                int(np.clip(40 + jitter[2], 0, 255)))
    else:
        fill = _color(color, "timestamp color")
    use_glow = bool(rng.random() < 0.5) if glow is None else bool(glow)

    font_path = _font_arg(font)
    fsize = max(5, int(round(frac * h)))
    fsize = min(fsize, _fit_font_size(label, 0.6 * w, font_path))
    mask = _text_mask(label, _font(fsize, font_path))
    margin = max(1, int(round(0.04 * min(w, h))))
    cx = (w - margin - mask.width / 2) if where.endswith("right") else (margin + mask.width / 2)
    cy = (h - margin - mask.height / 2) if where.startswith("bottom") else (margin + mask.height / 2)
    alpha = _place((w, h), mask, (cx, cy))
    if use_glow:
        halo = Image.fromarray(np.uint8(np.rint(alpha * 255))).filter(ImageFilter.GaussianBlur(max(0.6, fsize / 10)))
        alpha = np.maximum(alpha, 0.45 * np.asarray(halo, dtype=np.float32) / 255.0)
    return _composite(image, alpha, fill)
