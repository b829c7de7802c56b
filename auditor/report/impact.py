"""Report data for the impact test (``AuditResult.impact``): the page-1 block, the section, card extras.

Plain dicts for ``templates/_impact.html.j2``; no torch, no figures (the flow plot
is drawn in HTML, so class names stay escaped text).
"""

from __future__ import annotations

from typing import Any

from ..results import AuditResult, LayerResult, NeuronResult
from .env import data_image, fmt_num, fmt_pct


def impact_context(result: AuditResult) -> list[dict[str, Any]]:
    gate = (result.config or {}).get("fail_on_impact")
    out = []
    for imp in getattr(result, "impact", None) or []:
        a = imp.ablation or None
        exceeded = imp.flip_rate is not None and isinstance(gate, (int, float)) and imp.flip_rate > gate
        flows = [dict(f, width=round(100 * float(f.get("share") or 0.0), 1)) for f in imp.flows]
        out.append({
            "artifact": imp.artifact,
            "anchor": f"impact-{imp.artifact}",
            "kind": imp.output_kind,
            "summary": imp.summary,
            "flip_rate": imp.flip_rate, "flip_ci": imp.flip_ci, "n_flips": imp.n_flips,
            "control_flip_rate": imp.control_flip_rate, "control_ci": imp.control_ci,
            "n_images": imp.n_images,
            "generator": imp.generator,
            "params": ", ".join(f"{k}={v}" for k, v in (imp.generator.get("params") or {}).items()) or "defaults",
            "flows": flows, "towards": [t for t in imp.towards if t.get("n_to")][:6],
            "score_change": imp.score_change[:6], "score_kind": imp.score_kind,
            "output_change": imp.output_change or {}, "control_output_change": imp.control_output_change or {},
            "class_names_source": imp.class_names_source,
            "clean_accuracy": imp.clean_accuracy, "pasted_accuracy": imp.pasted_accuracy,
            "n_labelled": imp.n_labelled,
            "ablation": a, "random": (a or {}).get("random") or {},
            "n_ablated": len((a or {}).get("neurons") or []),
            "gate": gate, "exceeded": exceeded,
            "headline": _headline(imp),
        })
    return out


def _headline(imp) -> str:
    """The banner's words after the artifact's name."""
    if imp.flip_rate is None:
        head, c = next(iter((imp.output_change or {}).items()), (None, None))
        return f"moves the output by a mean cosine distance of {fmt_num(c.get('mean_cosine_distance'))}" \
            if c else "was tested (no comparable output)"
    s = f"flips {fmt_pct(imp.flip_rate)} of predictions (occlusion control {fmt_pct(imp.control_flip_rate)})"
    a = imp.ablation or {}
    if a.get("share_carried") is not None:
        s += f", the flagged neurons carry {fmt_pct(a['share_carried'])}"
    return s


def card_extras(result: AuditResult, layer: LayerResult, neuron: NeuronResult) -> dict[str, Any]:
    """For a flagged card: the clean/pasted pairs of the impact test where the artifact raised this
    neuron most (the "k of n top images carry it" line is the card's base-rate line, context.base_rates)."""
    pairs = []
    for imp in getattr(result, "impact", None) or []:
        for ex in imp.examples:
            if ex.get("layer") == layer.name and ex.get("neuron") == neuron.index:
                pairs.append({"artifact": imp.artifact, "mean_rise": ex.get("mean_rise"),
                              "frac_rise": ex.get("frac_rise"),
                              "pairs": [dict(p, clean=data_image(p.get("clean")), pasted=data_image(p.get("pasted")))
                                        for p in ex.get("pairs", [])]})
    return {"impact_pairs": pairs}
