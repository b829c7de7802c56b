"""The report's DORA view: outlier neurons with their s-AMS, the 2-D map, and the overlap with INVERT.

Plain data for ``templates/_dora.html.j2`` (and the s-AMS strip on flagged neurons'
cards). No torch; the map is drawn from the coordinates stored in the results.
"""

from __future__ import annotations

from typing import Any

from ..results import AuditResult, DoraLayer, NeuronResult
from .env import data_image

OUTLIER_IMAGES = 4  # top probe images shown per outlier row
MAX_OUTLIER_ROWS = 50


def _atoms(ast: Any) -> set[str]:
    if isinstance(ast, str):
        return {ast}
    if isinstance(ast, (list, tuple)) and ast:
        return set().union(*(_atoms(a) for a in ast[1:]))
    return set()


def artifact_explained(neuron: NeuronResult, artifacts: list[str]) -> bool:
    """The neuron's best INVERT formula names an artifact concept (flagged or not)."""
    best = neuron.best
    return bool(best is not None and _atoms(best.ast) & set(artifacts))


def dora_map(dl: DoraLayer, flagged: set[int], explained: set[int]) -> str | None:
    """MDS map of the EA distances: outliers, INVERT-flagged and artifact-explained neurons marked."""
    if not dl.neurons:
        return None
    from .figures import PALETTE, _figure, _legend, _style, png_data_uri

    groups = [
        ("neuron", "#9a9a9a", "o", 14, lambda n: True),
        ("best formula names an artifact", "#0173b2", "s", 22, lambda n: n.index in explained),
        ("DORA outlier", "#cc78bc", "^", 34, lambda n: n.outlier),
        ("INVERT-flagged", PALETTE["flagged"], "D", 24, lambda n: n.index in flagged),
    ]
    with _style():
        fig = _figure(4.4, 3.4, left=0.35, bottom=0.35)
        ax = fig.add_subplot()
        for label, colour, marker, size, keep in groups:
            pts = [(n.x, n.y) for n in dl.neurons if keep(n)]
            if not pts:
                continue
            face = colour if marker != "D" else "none"
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=size, marker=marker, c=face,
                       edgecolors=colour, linewidths=0.9, alpha=0.85, label=label)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("MDS 1 (EA distance)")
        ax.set_ylabel("MDS 2")
        _legend(ax)
        return png_data_uri(fig)


def dora_view(result: AuditResult, anchor, tokens, render_figures: bool = True) -> dict[str, Any] | None:
    """The template's data; ``anchor(layer_pos, neuron)`` and ``tokens(expl)`` come from the report builder."""
    dora = result.dora
    if dora is None:
        return None
    layers, cards = [], {}
    pos = {lyr.name: i for i, lyr in enumerate(result.layers)}
    for dl in dora.layers:
        lyr = next((x for x in result.layers if x.name == dl.name), None)
        by_index = {n.index: n for n in (lyr.neurons if lyr is not None else [])}
        flagged = {i for i, n in by_index.items() if n.flags}
        explained = {i for i, n in by_index.items() if artifact_explained(n, result.artifacts)}
        rows = []
        for k in dl.outliers[:MAX_OUTLIER_ROWS]:
            d = next(n for n in dl.neurons if n.index == k)
            nr = by_index.get(k)
            rows.append({
                "neuron": k, "rank": d.rank, "score": d.score,
                "anchor": anchor(pos[dl.name], k) if dl.name in pos else None,
                "sams": [u for u in (data_image(s) for s in d.sams) if u],
                "tokens": tokens(nr.best) if nr is not None else [],
                "auroc": nr.best.auroc if nr is not None and nr.best is not None else None,
                "images": [{"thumbnail": data_image(t.thumbnail), "index": t.index, "activation": t.activation,
                            "artifacts": list(t.artifacts)} for t in (nr.top_images if nr else [])][:OUTLIER_IMAGES],
                "flagged": k in flagged, "explained": k in explained,
            })
        for d in dl.neurons:
            if d.index in flagged and dl.name in pos:
                cards[anchor(pos[dl.name], d.index)] = {
                    "sams": [u for u in (data_image(s) for s in d.sams) if u], "rank": d.rank,
                    "n_neurons": dl.n_neurons, "outlier": d.outlier, "score": d.score}
        both = sorted(set(dl.outliers) & flagged)
        layers.append({
            "name": dl.name, "n_neurons": dl.n_neurons, "n_outliers": len(dl.outliers), "rows": rows,
            "n_more": max(0, len(dl.outliers) - MAX_OUTLIER_ROWS), "both": both,
            "flagged_not_outlier": sorted(flagged - set(dl.outliers)),
            "unnamed": [r["neuron"] for r in rows if not r["flagged"] and not r["explained"]],
            "inactive": dl.inactive, "threshold": dl.threshold, "n_neighbors": dl.n_neighbors,
            "map": dora_map(dl, flagged, explained) if render_figures else None,
        })
    p = dora.params or {}
    return {"layers": layers, "cards": cards, "distance": dora.distance, "method": dora.method,
            "contamination": dora.contamination, "signals": p.get("signals"), "steps": p.get("steps"),
            "size": p.get("size"), "lr": p.get("lr"), "seed": p.get("seed")}
