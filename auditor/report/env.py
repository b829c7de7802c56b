"""The one jinja2 environment, the templates folder, and the number filters.

Templates live in the repository's top-level ``templates/`` folder, which the wheel
ships as the data package ``auditor._templates``. Formatting numbers is done here, as
filters that return plain text; the templates add all markup, and autoescape is on.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import re
from pathlib import Path
from typing import Any

import jinja2

from ..errors import ReportError

MAIN_TEMPLATE = "report.html.j2"
DASH = "—"

_DATA_IMAGE_RE = re.compile(r"data:image/(?:png|jpeg|gif|webp);base64,[A-Za-z0-9+/]+={0,2}")


def _package_dir() -> Path | None:
    """The installed data package ``auditor._templates`` as a folder, if there is one."""
    try:
        res = importlib.resources.files("auditor._templates")
    except ModuleNotFoundError:
        return None
    if isinstance(res, Path):
        return res
    try:  # a namespace package: joinpath gives the real file of the first portion
        return Path(str(res.joinpath(MAIN_TEMPLATE))).parent
    except Exception:  # noqa: BLE001 - any odd loader: fall back to the source tree
        return None


@functools.lru_cache(maxsize=1)
def templates_dir() -> Path:
    """The folder holding the report templates and the shared CSS/JS.

    The installed data package ``auditor._templates`` when importable, else the
    repository's ``templates/`` next to the ``auditor`` package (a source checkout).
    """
    candidate = _package_dir()
    if candidate is not None and (candidate / MAIN_TEMPLATE).is_file():
        return candidate
    import auditor

    fallback = Path(auditor.__file__).resolve().parents[1] / "templates"
    if not (fallback / MAIN_TEMPLATE).is_file():
        raise ReportError(
            f"report templates not found: neither the package 'auditor._templates' nor {fallback} "
            f"holds {MAIN_TEMPLATE} (reinstall auditor)"
        )
    return fallback


# -- filters: numbers in, plain text out -------------------------------------------
def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def fmt_auroc(x: Any, digits: int = 3) -> str:
    """AUROC with a fixed number of decimals: ``0.912``."""
    if _missing(x):
        return DASH
    return f"{float(x):.{digits}f}"


def fmt_pvalue(p: Any, log10_p: Any = None) -> str:
    """A p-value for humans.

    ``0.032``, ``4.1e-7``; when ``p`` underflowed to 0 (or is subnormal) and
    ``log10_p`` is known, it is written from the logarithm (``3.6e-1235``); without
    it, ``<1e-300``.
    """
    if _missing(p) and _missing(log10_p):
        return DASH
    if not _missing(p) and float(p) >= 1e-300:
        p = float(p)
        if p >= 0.001:
            return f"{p:.3f}" if p < 0.1 else f"{p:.2f}"
        return f"{p:.1e}".replace("e-0", "e-")
    if not _missing(log10_p):
        lg = float(log10_p)
        exponent = math.floor(lg)
        mantissa = 10 ** (lg - exponent)
        if mantissa >= 9.95:  # rounding would print 10.0
            mantissa, exponent = 1.0, exponent + 1
        return f"{mantissa:.1f}e{exponent}"
    return "<1e-300"


def fmt_pct(x: Any, digits: int = 1) -> str:
    """A fraction in [0, 1] as a percentage: ``12.3%``; tiny non-zero ones keep a digit."""
    if _missing(x):
        return DASH
    v = float(x) * 100
    if 0 < abs(v) < 10 ** -digits:
        return f"{v:.{digits}g}%"
    return f"{v:.{digits}f}%"


def fmt_int(x: Any) -> str:
    """An integer with thousands separators: ``12,345``."""
    if _missing(x):
        return DASH
    return f"{int(round(float(x))):,}"


def fmt_num(x: Any, digits: int = 3) -> str:
    """A general number: integers stay integers, floats get ``digits`` significant digits."""
    if _missing(x):
        return DASH
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return f"{x:,}"
    return f"{float(x):.{digits}g}"


def fmt_seconds(x: Any) -> str:
    """Seconds as ``4.6 s``, ``3 min 05 s`` or ``2 h 03 min``."""
    if _missing(x):
        return DASH
    s = float(x)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def data_image(uri: Any) -> str | None:
    """``uri`` when it is a base64 ``data:image/...`` URI we can embed, else None.

    The value is still autoescaped by the template (it needs no escaping); this only
    keeps anything that is not an embedded raster image out of ``src`` attributes.
    """
    if isinstance(uri, str) and _DATA_IMAGE_RE.fullmatch(uri):
        return uri
    return None


FILTERS = {
    "auroc": fmt_auroc,
    "pvalue": fmt_pvalue,
    "pct": fmt_pct,
    "int": fmt_int,
    "num": fmt_num,
    "seconds": fmt_seconds,
    "data_image": data_image,
}


@functools.lru_cache(maxsize=4)
def _environment(folder: str) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(folder),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "htm", "xml", "j2"), default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters.update(FILTERS)
    return env


def environment() -> jinja2.Environment:
    """The shared jinja2 environment on :func:`templates_dir`."""
    return _environment(str(templates_dir()))


def static_text(name: str) -> str:
    """The text of a static asset (CSS, JS) from the templates folder."""
    path = templates_dir() / name
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"cannot read report asset {path}: {exc}") from None
