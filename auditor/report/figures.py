"""Report figures: seaborn on matplotlib's Agg canvas, returned as PNG data URIs.

One style for every figure (:func:`_style`), no pyplot state, no user text drawn into
an image (concept names stay in the HTML where they are escaped), and PNGs reduced to
an adaptive palette so a layer with many flagged neurons stays small.
"""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import Iterator, Sequence

from ..results import Distribution

DPI = 110
PALETTE = {
    "inside": "#0173b2",  # images where the formula holds
    "outside": "#9a9a9a",
    "flagged": "#d55e00",
    "neuron": "#0173b2",
    "threshold": "#444444",
}
_COLOURS = 96  # palette size of the quantised PNG


@contextlib.contextmanager
def _style() -> Iterator[None]:
    import matplotlib
    import seaborn as sns

    rc = {
        "font.family": "DejaVu Sans",
        "font.size": 9,
        "axes.titlesize": 9,
        "axes.labelsize": 9,
        "legend.fontsize": 8,
        "xtick.labelsize": 8,
        "ytick.labelsize": 8,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "figure.dpi": DPI,
        "savefig.dpi": DPI,
    }
    with sns.axes_style("whitegrid"), matplotlib.rc_context(rc):
        yield


def _figure(width_in: float, height_in: float, left: float = 0.55, bottom: float = 0.45, top: float = 0.3):
    """A figure with fixed margins in inches (a layout engine would double the render time).

    ``top`` leaves room for the legend, which always sits above the axes (see
    :func:`_legend`) so that it never hides data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=left / width_in, bottom=bottom / height_in, right=1 - 0.12 / width_in,
                        top=1 - top / height_in)
    return fig


def _legend(ax) -> None:
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, frameon=False, borderaxespad=0.2,
              handlelength=1.4, columnspacing=1.2)


def png_data_uri(fig) -> str:
    """Render ``fig`` to a palette PNG and return it as a ``data:image/png`` URI."""
    from PIL import Image

    raw = io.BytesIO()
    fig.savefig(raw, format="png", dpi=DPI, facecolor="white")
    raw.seek(0)
    with Image.open(raw) as img:
        small = img.convert("RGB").quantize(colors=_COLOURS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        out = io.BytesIO()
        small.save(out, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def distribution_plot(dist: Distribution) -> str | None:
    """Activation density inside vs outside the formula's support (from histogram counts)."""
    edges = list(dist.edges)
    if len(edges) < 2 or len(dist.inside) != len(edges) - 1 or len(dist.outside) != len(edges) - 1:
        return None
    n_in, n_out = sum(dist.inside), sum(dist.outside)
    if n_in + n_out == 0:
        return None
    with _style():
        fig = _figure(4.0, 2.2)
        ax = fig.add_subplot()
        for counts, key, label in (
            (dist.outside, "outside", f"formula false (n={n_out:,})"),
            (dist.inside, "inside", f"formula true (n={n_in:,})"),
        ):
            total = sum(counts)
            if total == 0:
                continue
            # Pre-binned counts: draw the density as steps (seaborn's histplot would re-bin).
            density = [c / (total * (b - a)) if b > a else 0.0 for c, a, b in zip(counts, edges[:-1], edges[1:])]
            ax.stairs(density, edges, fill=True, alpha=0.3, color=PALETTE[key])
            ax.stairs(density, edges, color=PALETTE[key], linewidth=1.2, label=label)
        ax.set_xlabel("activation")
        ax.set_ylabel("density")
        _legend(ax)
        return png_data_uri(fig)


def auroc_histogram(aurocs: Sequence[float], flagged: Sequence[float], threshold: float | None = None) -> str | None:
    """Histogram of the best-formula AUROC of every live neuron; flagged ones stacked in colour."""
    if not aurocs:
        return None
    import seaborn as sns

    with _style():
        fig = _figure(4.0, 2.4)
        ax = fig.add_subplot()
        lo = min(0.5, min(aurocs))
        bins = [lo + (1 - lo) * i / 25 for i in range(26)]
        sns.histplot(x=list(aurocs), bins=bins, color=PALETTE["neuron"], alpha=0.6, ax=ax, label="all neurons")
        if flagged:
            sns.histplot(x=list(flagged), bins=bins, color=PALETTE["flagged"], alpha=0.9, ax=ax, label="flagged")
        if threshold is not None:
            ax.axvline(threshold, color=PALETTE["threshold"], linestyle="--", linewidth=0.9, label="AUROC threshold")
        ax.set_xlabel("AUROC of best formula")
        ax.set_ylabel("neurons")
        ax.yaxis.set_major_locator(_integer_locator())
        _legend(ax)
        return png_data_uri(fig)


def auroc_fraction_scatter(fractions: Sequence[float], aurocs: Sequence[float], flagged: Sequence[bool],
                           threshold: float | None = None) -> str | None:
    """Best-formula AUROC against the fraction of images where the formula holds."""
    if not aurocs:
        return None
    import seaborn as sns

    with _style():
        fig = _figure(4.0, 2.4)
        ax = fig.add_subplot()
        plain = [(f, a) for f, a, fl in zip(fractions, aurocs, flagged) if not fl]
        marked = [(f, a) for f, a, fl in zip(fractions, aurocs, flagged) if fl]
        size = 10 if len(aurocs) > 500 else 18
        if plain:
            sns.scatterplot(x=[p[0] for p in plain], y=[p[1] for p in plain], color=PALETTE["neuron"], alpha=0.5,
                            s=size, linewidth=0, ax=ax, label="neuron")
        if marked:
            sns.scatterplot(x=[p[0] for p in marked], y=[p[1] for p in marked], color=PALETTE["flagged"], s=size * 2,
                            marker="D", linewidth=0.4, edgecolor="black", ax=ax, label="flagged")
        if threshold is not None:
            ax.axhline(threshold, color=PALETTE["threshold"], linestyle="--", linewidth=0.9, label="AUROC threshold")
        ax.set_xlabel("fraction of probe images where the formula holds")
        ax.set_ylabel("AUROC")
        ax.xaxis.set_major_formatter(_percent_formatter())
        _legend(ax)
        return png_data_uri(fig)


def _integer_locator():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _percent_formatter():
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(xmax=1.0, decimals=0)
