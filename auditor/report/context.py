"""The view model: everything the report template shows, computed once per result.

Plain Python data (dicts, lists, numbers, strings) and figure data URIs. No markup is
built here; the template does all of it with autoescape on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from ..results import AuditResult, Concept, Explanation, Flag, LayerResult, NeuronResult
from . import figures
from .dora import dora_view
from .env import data_image, fmt_num, fmt_seconds
from .tables import concept_usage, neuron_row

# Above this many flagged neurons, only the strongest get a full card; the rest are
# listed in a compact table (each card carries a plot and up to a dozen images).
MAX_CARDS = 100
# Above this many neurons in a layer, the PDF lists only flagged, sensitive and the
# top neurons by AUROC (the full table is in the HTML and neurons.csv).
PDF_TABLE_LIMIT = 250
MAX_TOP_IMAGES = 12
# Per layer: artifact-sensitive (unflagged) neurons listed with a few images, and the
# strongest unflagged neurons shown as reference cards.
MAX_SENSITIVE_ROWS = 60
SENSITIVE_IMAGES = 4
N_REFERENCE = 3


# -- small helpers ------------------------------------------------------------------
def _find(data: Any, keys: tuple[str, ...], depth: int = 0) -> Any:
    """The value under one of ``keys``: in ``data`` itself first, then in its nested dicts."""
    if not isinstance(data, dict) or depth > 4:
        return None
    for key in keys:
        if key in data and data[key] not in (None, "", {}, []):
            return data[key]
    for value in data.values():
        if isinstance(value, dict):
            found = _find(value, keys, depth + 1)
            if found is not None:
                return found
    return None


def _scalar_text(value: Any, limit: int = 400) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt_num(value, 6)
    if value is None:
        return "—"
    if isinstance(value, (list, tuple)) and all(not isinstance(v, (dict, list, tuple)) for v in value):
        text = ", ".join(_scalar_text(v) for v in value)
    elif isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, default=str, ensure_ascii=False)
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def key_values(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dicts flattened to ``(dotted.key, text)`` rows, in insertion order."""
    if not isinstance(data, dict):
        return [(prefix or "value", _scalar_text(data))]
    rows: list[tuple[str, str]] = []
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            rows.extend(key_values(value, name))
        else:
            rows.append((name, _scalar_text(value)))
    return rows


def ranges(indices: list[int]) -> str:
    """``[1, 2, 3, 7, 9, 10]`` → ``1–3, 7, 9–10``."""
    spans: list[list[int]] = []
    for i in sorted(indices):
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in spans)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _p_sort(p_adjusted: Any, log10_p: Any) -> float | None:
    """A sort key for adjusted p-values that keeps order when p underflowed to 0."""
    if _finite(p_adjusted) and p_adjusted > 0:
        return round(math.log10(p_adjusted), 4)
    if _finite(log10_p):
        return round(float(log10_p), 4)
    return -1e9 if _finite(p_adjusted) else None


# -- formulas as tokens (the template styles them) ---------------------------------
def formula_tokens(expl: Explanation | Flag | None, concepts: dict[str, Concept]) -> list[dict[str, str]]:
    """The formula as ``{"kind", "text"}`` tokens with concept display names.

    kinds: ``concept``, ``artifact``, ``op`` (AND/OR/NOT), ``paren``, ``text`` (the raw
    formula, when there is no usable AST).
    """
    if expl is None:
        return []
    ast = getattr(expl, "ast", None)
    tokens: list[dict[str, str]] = []

    def atom(name: str) -> None:
        c = concepts.get(name)
        tokens.append({"kind": "artifact" if c is not None and c.is_artifact else "concept",
                       "text": (c.display_name or name) if c is not None else name, "name": name})

    def walk(node: Any, parent: str | None) -> None:
        if isinstance(node, str):
            atom(node)
            return
        if not isinstance(node, (list, tuple)) or not node:
            raise ValueError("bad node")
        op = node[0]
        if op == "not" and len(node) == 2:
            tokens.append({"kind": "op", "text": "NOT"})
            walk(node[1], "not")
            return
        if op not in ("and", "or") or len(node) < 3:
            raise ValueError("bad node")
        wrap = parent is not None and parent != op
        if wrap:
            tokens.append({"kind": "paren", "text": "("})
        for i, child in enumerate(node[1:]):
            if i:
                tokens.append({"kind": "op", "text": op.upper()})
            walk(child, op)
        if wrap:
            tokens.append({"kind": "paren", "text": ")"})

    if ast is not None:
        try:
            walk(ast, None)
            return tokens
        except (ValueError, TypeError):
            tokens = []
    return [{"kind": "text", "text": expl.formula}]


def tokens_text(tokens: list[dict[str, str]]) -> str:
    """The token list as one plain string (``(Watermark AND NOT star) OR text``)."""
    out = ""
    for i, t in enumerate(tokens):
        if i and t["text"] != ")" and tokens[i - 1]["text"] != "(":
            out += " "
        out += t["text"]
    return out


def _display_differs(tokens: list[dict[str, str]]) -> bool:
    return any(t.get("name") not in (None, t["text"]) for t in tokens)


# -- the pieces ----------------------------------------------------------------------
def _metrics(expl: Explanation | None) -> dict[str, Any] | None:
    if expl is None:
        return None
    return {
        "formula": expl.formula,
        "length": expl.length,
        "auroc": expl.auroc,
        "auroc_ci": list(expl.auroc_ci) if expl.auroc_ci else None,
        "p_value": expl.p_value,
        "log10_p": expl.log10_p,
        "p_adjusted": expl.p_adjusted,
        "fraction": expl.fraction,
        "support": expl.support,
        "heldout_auroc": expl.heldout_auroc,
        "heldout_p_value": expl.heldout_p_value,
    }


def _images(neuron: NeuronResult) -> list[dict[str, Any]]:
    out = []
    for img in neuron.top_images[:MAX_TOP_IMAGES]:
        out.append({
            "index": img.index,
            "path": img.path,
            "activation": img.activation,
            "thumbnail": data_image(img.thumbnail),
            "heatmap": data_image(img.heatmap),
            "artifacts": list(img.artifacts),
            "concepts": list(img.concepts),
        })
    return out


class _Builder:
    def __init__(self, result: AuditResult, render_figures: bool = True):
        self.result = result
        self.render_figures = render_figures
        self.concepts = {c.name: c for c in result.concepts}
        self.thresholds = result.thresholds or {}
        self.auroc_threshold = next(
            (self.thresholds[k] for k in ("flag_min_auroc", "min_auroc", "auroc_threshold")
             if _finite(self.thresholds.get(k))),
            None,
        )

    def tokens(self, expl) -> list[dict[str, str]]:
        return formula_tokens(expl, self.concepts)

    def flag_tokens(self, neuron: NeuronResult, flag: Flag) -> list[dict[str, str]]:
        """A flag's formula as tokens: from the beam's AST when the flag names a beam formula."""
        if not flag.formula:
            return []
        for expl in neuron.explanations:
            if expl.formula == flag.formula:
                return self.tokens(expl)
        return self.tokens(flag)

    def figure(self, fn: Callable[..., str | None], *args, **kwargs) -> str | None:
        return fn(*args, **kwargs) if self.render_figures else None

    def anchor(self, layer_pos: int, neuron: int) -> str:
        return f"L{layer_pos}-n{neuron}"

    def concept_label(self, name: str) -> str:
        c = self.concepts.get(name)
        return (c.display_name or name) if c is not None else name

    # -- per neuron ------------------------------------------------------------------
    def card(self, layer_pos: int, layer: LayerResult, neuron: NeuronResult) -> dict[str, Any]:
        best = neuron.best
        tokens = self.tokens(best)
        dist = neuron.distribution
        beams = []
        for length, beam in enumerate(neuron.beams or [], start=1):
            beams.append({"length": length, "items": [self._beam_item(e) for e in beam]})
        return {
            "anchor": self.anchor(layer_pos, neuron.index),
            "layer": layer.name,
            "neuron": neuron.index,
            "tokens": tokens,
            "raw_formula": best.formula if best is not None and _display_differs(tokens) else None,
            "best": _metrics(best),
            "flags": [
                {**f.to_dict(), "label": self.concept_label(f.artifact), "tokens": self.flag_tokens(neuron, f)}
                for f in neuron.flags
            ],
            "artifact_auroc": [
                {"name": a, "label": self.concept_label(a), "auroc": v, "sensitive": a in neuron.sensitive}
                for a, v in neuron.artifact_auroc.items()
            ],
            "stats": neuron.stats,
            "distribution": self.figure(figures.distribution_plot, dist) if dist is not None else None,
            "distribution_matches_best": dist is not None and best is not None and dist.formula == best.formula,
            "distribution_formula": dist.formula if dist is not None else None,
            "images": _images(neuron),
            "n_images": len(neuron.top_images),
            "others": [self._beam_item(e) for e in neuron.explanations[1:]],
            "paired": [{"label": self.concept_label(a), **v} for a, v in sorted(neuron.paired.items())
                       if isinstance(v, dict)],
            "flagged": neuron.flagged,
            "beams": beams,
        }

    def _beam_item(self, expl: Explanation) -> dict[str, Any]:
        return {"tokens": self.tokens(expl), **(_metrics(expl) or {})}

    # -- verdict -----------------------------------------------------------------------
    def verdict(self) -> list[dict[str, Any]]:
        rows = []
        layer_pos = {lyr.name: i for i, lyr in enumerate(self.result.layers)}
        for art in self.result.artifacts:
            concept = self.concepts.get(art)
            hits: list[tuple[LayerResult, NeuronResult, Flag]] = []
            sensitive: list[tuple[str, int]] = []
            for lyr in self.result.layers:
                for n in lyr.neurons:
                    hits.extend((lyr, n, f) for f in n.flags if f.artifact == art)
                    if art in n.sensitive:
                        sensitive.append((lyr.name, n.index))
            by_rule: dict[str, int] = {}
            for _, _, f in hits:
                by_rule[f.rule] = by_rule.get(f.rule, 0) + 1
            strongest = None
            if hits:
                # Strongest: the artifact alone predicts the neuron best, then the formula's AUROC.
                lyr, n, f = max(hits, key=lambda h: (h[2].artifact_auroc if _finite(h[2].artifact_auroc) else -1,
                                                     h[2].auroc if _finite(h[2].auroc) else -1,
                                                     -(h[2].p_adjusted if _finite(h[2].p_adjusted) else 1.0)))
                strongest = {
                    "anchor": self.anchor(layer_pos[lyr.name], n.index),
                    "layer": lyr.name,
                    "neuron": n.index,
                    "tokens": self.flag_tokens(n, f),
                    "auroc": f.auroc,
                    "p_adjusted": f.p_adjusted,
                    "rule": f.rule,
                }
            if concept is not None and concept.status == "excluded":
                status = "excluded"
            elif hits:
                status = "flagged"
            elif concept is None:
                status = "unknown"
            else:
                status = "clean"
            rows.append({
                "name": art,
                "label": self.concept_label(art),
                "status": status,
                "reason": concept.reason if concept is not None else "not among the result's concepts",
                "n_flagged": len({(lyr.name, n.index) for lyr, n, _ in hits}),
                "by_rule": by_rule,
                "layers": sorted({lyr.name for lyr, _, _ in hits}, key=lambda name: layer_pos[name]),
                "n_sensitive": len(sensitive),
                "strongest": strongest,
            })
        return rows

    def facts(self) -> list[tuple[str, str]]:
        """What was audited: best effort over the free-form provenance and config.

        Knows the keys ``auditor run`` writes (docs/results-schema.md) and a few
        common alternatives; anything else is in the provenance table at the end.
        """
        r = self.result
        prov, cfg = r.provenance or {}, r.config or {}
        rows: list[tuple[str, str]] = []
        model = prov.get("model") or _find(cfg, ("model", "model_name"))
        if isinstance(model, dict):
            name = next((model[k] for k in ("spec", "name", "id", "path") if model.get(k)), None)
            kind = model.get("kind") or model.get("source")
            text = f"{name} ({kind})" if name and kind else (name or _scalar_text(model, 120))
            if _finite(model.get("n_parameters")):
                text += f", {fmt_num(int(model['n_parameters']))} parameters"
            if model.get("weights"):
                text += f"; weights {model['weights']}"
            model = text
        if model:
            rows.append(("Model", _scalar_text(model, 200)))
        weights = _find(prov, ("weights_sha256", "weights_hash", "weights_md5"))
        if weights:
            rows.append(("Weights hash", _scalar_text(weights, 100)))
        rows.append(("Layers", "; ".join(
            f"{lyr.name} ({len(lyr.neurons):,} neurons, {lyr.reduction}"
            + (f", output {'×'.join(str(d) for d in lyr.output_shape)}" if lyr.output_shape else "") + ")"
            for lyr in r.layers) or "—"))
        data = prov.get("data") if isinstance(prov.get("data"), dict) else {}
        probe = next((data[k] for k in ("name", "probe_set", "images", "path") if data.get(k)), None) \
            or _find(prov, ("probe_set", "dataset"))
        n_images = next((data[k] for k in ("n_used", "n_images") if _finite(data.get(k))), None) \
            or _find(prov, ("n_images", "num_images")) or self.probe_size()
        if probe or n_images:
            text = _scalar_text(probe, 160) if probe else "probe set"
            rows.append(("Probe set", f"{text}, {fmt_num(n_images)} images" if n_images else text))
            if _finite(data.get("n_unreadable")) and data["n_unreadable"]:
                rows.append(("Unreadable images", fmt_num(data["n_unreadable"])))
        n_ok = sum(1 for c in r.concepts if c.status != "excluded")
        n_art = sum(1 for c in r.concepts if c.is_artifact and c.status != "excluded")
        rows.append(("Concepts", f"{len(r.concepts):,} ({n_ok:,} used, {len(r.concepts) - n_ok:,} excluded; "
                                 f"{n_art:,} artifact concept{'s' if n_art != 1 else ''} used)"))
        seconds = self.run_time()
        if seconds is not None:
            rows.append(("Run time", fmt_seconds(seconds)))
        device = prov.get("device") or _find(prov, ("accelerator",)) or _find(cfg, ("device",))
        if device:
            rows.append(("Device", _scalar_text(device, 120)))
        rows.append(("Created", r.created))
        rows.append(("Tool", " ".join(str(v) for v in (r.tool or {}).values()) or "—"))
        return rows

    def probe_size(self) -> int | None:
        """N, recovered from any count/fraction pair in the result."""
        for c in self.result.concepts:
            if c.n_positive and _finite(c.fraction) and c.fraction > 0:
                return int(round(c.n_positive / c.fraction))
        return None

    def run_time(self) -> float | None:
        timings = _find(self.result.provenance or {}, ("timings", "timing", "durations"))
        if isinstance(timings, dict):
            for key in ("total_s", "total", "wall_s", "wall", "elapsed_s"):
                if _finite(timings.get(key)):
                    return float(timings[key])
            parts = [v for v in timings.values() if _finite(v)]
            return float(sum(parts)) if parts else None
        total = _find(self.result.provenance or {}, ("total_s", "run_time_s", "elapsed_s", "duration_s"))
        return float(total) if _finite(total) else None

    # -- per layer ---------------------------------------------------------------------
    def layer(self, pos: int, layer: LayerResult) -> dict[str, Any]:
        artifacts = self.result.artifacts
        rows, live_auroc, live_frac, live_flag, flagged_auroc = [], [], [], [], []
        for n in layer.neurons:
            row = neuron_row(layer, n, artifacts)
            row["anchor"] = self.anchor(pos, n.index)
            row["tokens"] = self.tokens(n.best)
            row["formula_label"] = tokens_text(row["tokens"])
            row["flag_list"] = [{"artifact": f.artifact, "label": self.concept_label(f.artifact), "rule": f.rule}
                                for f in n.flags]
            row["sensitive_list"] = [self.concept_label(a) for a in n.sensitive]
            row["p_sort"] = _p_sort(row["p_adjusted"], row["log10_p"])
            rows.append(row)
            if n.best is not None and _finite(n.best.auroc):
                live_auroc.append(n.best.auroc)
                live_frac.append(n.best.fraction)
                live_flag.append(n.flagged)
                if n.flagged:
                    flagged_auroc.append(n.best.auroc)
        dead = [n.index for n in layer.neurons if n.status == "dead"]
        no_expl = [n.index for n in layer.neurons if n.status != "dead" and n.best is None]
        pdf_rows = rows
        if len(rows) > PDF_TABLE_LIMIT:
            keep = sorted(rows, key=lambda r: (not r["flagged"], not r["sensitive"],
                                               -(r["auroc"] if _finite(r["auroc"]) else -1)))[:PDF_TABLE_LIMIT]
            keep_ids = {r["neuron"] for r in keep}
            pdf_rows = [r for r in rows if r["neuron"] in keep_ids]
        # Unflagged neurons with evidence: artifact-sensitive ones (the second signal) and
        # the strongest others (what a normal neuron looks like), as the pipeline stores them.
        sensitive_only = [n for n in layer.neurons if n.sensitive and not n.flagged]
        sensitive_rows = [{
            "anchor": self.anchor(pos, n.index),
            "neuron": n.index,
            "tokens": self.tokens(n.best),
            "auroc": n.best.auroc if n.best else None,
            "artifacts": [{"label": self.concept_label(a), "auroc": n.artifact_auroc.get(a)} for a in n.sensitive],
            "images": _images(n)[:SENSITIVE_IMAGES],
        } for n in sensitive_only[:MAX_SENSITIVE_ROWS]]
        reference = sorted((n for n in layer.neurons if not n.flagged and not n.sensitive and n.best is not None
                            and (n.top_images or n.distribution is not None)),
                           key=lambda n: (-n.best.auroc, n.index))[:N_REFERENCE]  # type: ignore[union-attr]
        usage = concept_usage(layer)
        top = usage[:25]
        peak = max((u["neurons"] for u in top), default=1) or 1
        for u in top:
            c = self.concepts.get(u["concept"])
            u["label"] = self.concept_label(u["concept"])
            u["is_artifact"] = bool(c is not None and c.is_artifact)
            u["share"] = round(100 * u["neurons"] / peak, 1)
        return {
            "pos": pos,
            "anchor": f"layer-{pos}",
            "name": layer.name,
            "output_shape": layer.output_shape,
            "reduction": layer.reduction,
            "n_neurons": len(layer.neurons),
            "n_live": len(live_auroc),
            "n_flagged": sum(1 for n in layer.neurons if n.flagged),
            "n_sensitive": sum(1 for n in layer.neurons if n.sensitive),
            "dead": dead,
            "dead_text": ranges(dead),
            "no_explanation_text": ranges(no_expl),
            "n_no_explanation": len(no_expl),
            "median_auroc": sorted(live_auroc)[len(live_auroc) // 2] if live_auroc else None,
            "auroc_hist": self.figure(figures.auroc_histogram, live_auroc, flagged_auroc, self.auroc_threshold),
            "scatter": self.figure(figures.auroc_fraction_scatter, live_frac, live_auroc, live_flag,
                                   self.auroc_threshold),
            "usage": top,
            "n_concepts_used": len(usage),
            "rows": rows,
            "pdf_rows": pdf_rows,
            "sensitive_rows": sensitive_rows,
            "n_sensitive_only": len(sensitive_only),
            "sensitive_rest": ranges([n.index for n in sensitive_only[MAX_SENSITIVE_ROWS:]]),
            "reference": [self.card(pos, layer, n) for n in reference],
        }

    def build(self) -> dict[str, Any]:
        r = self.result
        layers = [self.layer(i, lyr) for i, lyr in enumerate(r.layers)]
        flagged = [(i, lyr, n) for i, lyr in enumerate(r.layers) for n in lyr.neurons if n.flagged]
        flagged.sort(key=lambda t: (t[0],
                                    -max((f.artifact_auroc for f in t[2].flags if _finite(f.artifact_auroc)),
                                         default=0.0),
                                    -max((f.auroc for f in t[2].flags if _finite(f.auroc)), default=0.0),
                                    t[2].index))
        cards = [self.card(i, lyr, n) for i, lyr, n in flagged[:MAX_CARDS]]
        overflow = [
            {"layer": lyr.name, "neuron": n.index, "tokens": self.tokens(n.best),
             "flags": [{"label": self.concept_label(f.artifact), "rule": f.rule, "auroc": f.auroc,
                        "p_adjusted": f.p_adjusted} for f in n.flags]}
            for i, lyr, n in flagged[MAX_CARDS:]
        ]
        dora = dora_view(r, self.anchor, self.tokens, self.render_figures)
        for c in cards:  # the s-AMS strip on flagged neurons' cards
            c["dora"] = dora["cards"].get(c["anchor"]) if dora else None
        verdict = self.verdict()
        flagged_arts = [v for v in verdict if v["status"] == "flagged"]
        excluded = [c for c in r.concepts if c.status == "excluded"]
        return {
            "title": r.title,
            "created": r.created,
            "tool": r.tool,
            "schema_version": r.schema_version,
            "verdict": verdict,
            "overall": {
                "flagged": bool(flagged),
                "n_flagged": len(flagged),
                "n_layers_flagged": len({lyr.name for _, lyr, _ in flagged}),
                "artifacts": [v["label"] for v in flagged_arts],
                "n_artifacts": len(r.artifacts),
                "n_artifacts_checked": sum(1 for v in verdict if v["status"] not in ("excluded", "unknown")),
                "n_sensitive": sum(1 for lyr in r.layers for n in lyr.neurons if n.sensitive),
            },
            "facts": self.facts(),
            "thresholds": key_values(r.thresholds or {}),
            "warnings": list(r.warnings),
            "cards": cards,
            "card_anchors": {c["anchor"] for c in cards} | {c["anchor"] for lyr in layers for c in lyr["reference"]},
            "overflow": overflow,
            "max_cards": MAX_CARDS,
            "layers": layers,
            "artifact_concepts": [c for c in r.concepts if c.is_artifact or c.name in r.artifacts],
            "excluded": excluded,
            "n_concepts": len(r.concepts),
            "config": key_values(r.config or {}),
            "provenance": key_values(r.provenance or {}),
            "dora": dora,
        }


def build_context(result: AuditResult, *, render_figures: bool = True) -> dict[str, Any]:
    """The template's data for ``result`` (figures rendered once, shared by HTML and PDF)."""
    return _Builder(result, render_figures=render_figures).build()
