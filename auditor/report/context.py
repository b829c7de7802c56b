"""The view model: everything the report template shows, computed once per result.

Plain Python data (dicts, lists, numbers, strings) and figure data URIs. No markup is
built here; the template does all of it with autoescape on.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from typing import Any

from ..results import AuditResult, Concept, Explanation, Flag, LayerResult, NeuronResult
from . import figures
from .dora import dora_view
from .env import data_image, fmt_num, fmt_seconds
from .impact import card_extras, impact_context
from .tables import (STATUS_ORDER, checked_artifacts, concept_usage, formula_atoms, median, neuron_row,
                     neuron_tests, worst_status)

# Above this many flagged neurons, only the strongest get a full card; the rest are
# listed in a compact table (each card carries a plot and up to a dozen images).
MAX_CARDS = 100
# Above this many neurons in a layer, the PDF lists only flagged, sensitive and the
# top neurons by AUROC (the full table is in the HTML and neurons.csv).
PDF_TABLE_LIMIT = 250
MAX_TOP_IMAGES = 12
# Per layer: the strongest neurons without a finding, shown as reference cards.
N_REFERENCE = 3
# With more flagged cards than CARDS_COLLAPSE_ABOVE, only the first CARDS_OPEN are open on
# screen; the rest are collapsed (one click each). The PDF shows every card open.
CARDS_OPEN = 5
CARDS_COLLAPSE_ABOVE = 10
NEAR_MISS_ROWS = 5  # closest calls listed per artifact

STATUS_LABEL = {"flagged": "flagged", "near_miss": "near miss", "inconclusive": "inconclusive",
                "clean": "clean", "not_checked": "not checked", "dead": "dead", "no formula": "no formula"}

# -- recommended action: verdict × impact ------------------------------------------------
# An artifact's impact is "material" when pasting it flips at least IMPACT_MATERIAL more of
# the model's predictions than the control paste does (flip_rate - control_flip_rate); a
# reporting convention, documented in docs/report.md, not a statistical test.
IMPACT_MATERIAL = 0.02
IMPACT_LEVELS = ("material", "small", "not measured")
# (verdict, impact level) -> (severity, one line); lower severity is more urgent. The
# page-1 recommendation is the line of the most urgent artifact.
ACTIONS: dict[tuple[str, str], tuple[int, str]] = {
    ("flagged", "material"): (0, "Block the release: neurons detect the artifact and pasting it changes the "
                                 "model's outputs. Remove the artifact from the training data or retrain, then re-audit."),
    ("flagged", "not measured"): (1, "Treat as blocking until the impact is measured: neurons detect the artifact "
                                     "(run the paired clean/pasted impact test)."),
    ("near_miss", "material"): (2, "Investigate before release: no neuron passes the flag rule, but pasting the "
                                   "artifact changes the outputs."),
    ("inconclusive", "material"): (2, "Investigate before release: pasting the artifact changes the outputs and "
                                      "the neuron test lacked the images to decide."),
    ("clean", "material"): (2, "Investigate before release: no detector neuron in the audited layers, yet pasting "
                               "the artifact changes the outputs; audit other layers."),
    ("flagged", "small"): (3, "Review before release: neurons detect the artifact but pasting it barely changes "
                              "the outputs; confirm on a test set from the deployment domain."),
    ("inconclusive", "not measured"): (4, "Collect more probe images carrying the artifact and re-audit: the "
                                          "test lacked power."),
    ("inconclusive", "small"): (4, "Collect more probe images carrying the artifact and re-audit: the test "
                                   "lacked power."),
    ("not_checked", "material"): (2, "Fix the probe set and re-audit: the artifact could not be tested, and "
                                     "pasting it changes the outputs."),
    ("not_checked", "small"): (4, "Fix the probe set and re-audit: the artifact could not be tested."),
    ("not_checked", "not measured"): (4, "Fix the probe set and re-audit: the artifact could not be tested."),
    ("near_miss", "not measured"): (5, "Review the near misses before release, and measure the impact."),
    ("near_miss", "small"): (6, "Review the near misses; no change to the outputs was measured."),
    ("clean", "not measured"): (9, "No action for this artifact (within the limits of the probe set)."),
    ("clean", "small"): (9, "No action for this artifact."),
}

# Human names of the flag thresholds (the config key is shown beside them).
THRESHOLD_NAMES = {
    "flag_max_p": "Largest adjusted p-value of a flagged formula",
    "flag_min_auroc": "Smallest AUROC of a flagged formula",
    "artifact_auroc": "Artifact alone: AUROC for the strong branch",
    "flag_margin": "AUROC a formula must lose without the artifact",
    "flag_partial_auroc": "Artifact alone: AUROC when the flag rests on the margin",
    "flag_min_support": "Fewest images a flagged formula must hold on",
    "min_effect": "Smallest artifact effect of a flag",
    "near_miss": "Near-miss band",
    "rule_version": "Flag rule version",
    "flag_min_effect": "Formula branch: smallest |stratified effect - 0.5|",
    "flag_strong_effect": "Strong branch: smallest |stratified effect - 0.5|",
    "flag_min_artifact_rows": "Fewest artifact images in the tested rows",
    "flag_strata": "Concepts most associated with the artifact, stratified on",
    "calibration_runs": "Calibration runs (permuted artifact labels)",
    "region_selection_factor": "Region p-value multiplier (formulas the search scored)",
}

GLOSSARY = [
    ("AUROC", "Area under the ROC curve: the chance that a random image where the formula (or artifact) holds "
              "activates the neuron more than a random image where it does not; ties count half. 0.5 is no "
              "relation, 1.0 a perfect detector."),
    ("Artifact effect", "Flag rule 2.x: the AUROC of 'image has the artifact' as a predictor of the neuron "
                        "within strata of the concepts it travels with, combined with van Elteren weights "
                        "(0.5 = no effect; 95% normal interval, Hanley-McNeil variance per stratum). 1.x files: "
                        "the AUROC of the artifact alone, with its DeLong interval."),
    ("p-value", "Mann-Whitney U test of 'activations where the formula holds and where it does not come from "
                "the same distribution'. Tiny values are written from their logarithm (3.6e-1235)."),
    ("BH (adjusted p)", "Benjamini-Hochberg adjustment: among findings called significant at level q, the "
                        "expected share of false discoveries is at most q. Formula p-values are adjusted across "
                        "the neurons of a layer; the flag rule's artifact tests across every test of the audit."),
    ("Support", "The number of probe images where the formula holds (fraction: the same as a share of all "
                "probe images). A high AUROC on a small support rests on few images."),
    ("Beam", "INVERT keeps the B best formulas (the beam) at each length and extends only those; B is the "
             "beam size, L the longest formula."),
    ("Flagged", "The neuron passes every condition of the flag rule for the artifact (see Thresholds)."),
    ("Near miss", "The neuron's evidence points at the artifact but one condition of the rule fails; the "
                  "reason names the condition and its number."),
    ("Inconclusive", "Too few images carry the artifact (or its confidence interval is too wide) to call the "
                     "neuron either way."),
    ("Dead neuron", "Constant on every probe image: nothing to explain."),
    ("In-sample", "Scored on the same images the formula was chosen on, which makes numbers optimistic."),
    ("Held-out", "Scored on images the search never saw (config heldout); free of the selection bias."),
    ("Impact / flip rate", "Share of probe images whose predicted class changes when the artifact is pasted "
                           "onto them, next to the same for a neutral control paste."),
]


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


def _scalar_text(value: Any, limit: int | None = None) -> str:
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
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


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

    kinds: ``concept``, ``artifact`` (un-negated), ``artifact-neg`` (an artifact under NOT,
    which is not evidence for it), ``op`` (AND/OR/NOT), ``paren``, ``text`` (the raw
    formula, when there is no usable AST).
    """
    if expl is None:
        return []
    ast = getattr(expl, "ast", None)
    tokens: list[dict[str, str]] = []

    def atom(name: str, negated: bool) -> None:
        c = concepts.get(name)
        is_art = c is not None and c.is_artifact
        # A negated artifact ("NOT text") is not evidence for the artifact: not highlighted.
        kind = ("artifact-neg" if negated else "artifact") if is_art else "concept"
        tokens.append({"kind": kind, "text": (c.display_name or name) if c is not None else name, "name": name})

    def walk(node: Any, parent: str | None, negated: bool = False) -> None:
        if isinstance(node, str):
            atom(node, negated)
            return
        if not isinstance(node, (list, tuple)) or not node:
            raise ValueError("bad node")
        op = node[0]
        if op == "not" and len(node) == 2:
            tokens.append({"kind": "op", "text": "NOT"})
            walk(node[1], "not", not negated)
            return
        if op not in ("and", "or") or len(node) < 3:
            raise ValueError("bad node")
        wrap = parent is not None and parent != op
        if wrap:
            tokens.append({"kind": "paren", "text": "("})
        for i, child in enumerate(node[1:]):
            if i:
                tokens.append({"kind": "op", "text": op.upper()})
            walk(child, op, negated)
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
        self.checked = checked_artifacts(result)
        self._tests: dict[int, dict[str, dict[str, Any]]] = {}
        self.auroc_threshold = next(
            (self.thresholds[k] for k in ("flag_min_auroc", "min_auroc", "auroc_threshold")
             if _finite(self.thresholds.get(k))),
            None,
        )

    def tokens(self, expl) -> list[dict[str, str]]:
        return formula_tokens(expl, self.concepts)

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
            "flags": [{"artifact": f.artifact, "label": self.concept_label(f.artifact)} for f in neuron.flags],
            "status": "dead" if neuron.status == "dead" else (worst_status(self.tests(neuron)) or "no formula"),
            "tests": self.test_list(neuron),
            "base_rates": self.base_rates(neuron),
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
            **(card_extras(self.result, layer, neuron) if neuron.flagged else {}),
            # a flagged neuron whose AUROC interval reaches below the flag threshold is said so
            "ci_below": (self.auroc_threshold if neuron.flagged and best is not None and best.auroc_ci
                         and _finite(self.auroc_threshold) and best.auroc_ci[0] < self.auroc_threshold else None),
        }

    def test_list(self, neuron: NeuronResult) -> list[dict[str, Any]]:
        return [{"name": a, "label": self.concept_label(a), **t, "status_label": STATUS_LABEL.get(t["status"],
                                                                                                  t["status"])}
                for a, t in self.tests(neuron).items()]

    def base_rates(self, neuron: NeuronResult) -> list[dict[str, Any]]:
        """Per checked artifact: how many of the shown top images carry it, against its base rate."""
        shown = neuron.top_images[:MAX_TOP_IMAGES]
        if not shown:
            return []
        out = []
        for art in self.result.artifacts:
            if art not in self.checked:
                continue
            c = self.concepts.get(art)
            k = sum(1 for img in shown if art in img.artifacts)
            rate = c.fraction if c is not None else None
            out.append({"label": self.concept_label(art), "k": k, "n": len(shown), "rate": rate,
                        "expected": rate * len(shown) if _finite(rate) else None})
        return out

    def _beam_item(self, expl: Explanation) -> dict[str, Any]:
        return {"tokens": self.tokens(expl), **(_metrics(expl) or {})}

    # -- tests, verdicts, actions ------------------------------------------------------
    def tests(self, neuron: NeuronResult) -> dict[str, dict[str, Any]]:
        key = id(neuron)
        if key not in self._tests:
            self._tests[key] = neuron_tests(neuron, self.result.artifacts, self.thresholds, self.checked)
        return self._tests[key]

    def impact(self, artifact: str) -> dict[str, Any] | None:
        """The impact record of ``artifact`` (issue: impact), with its level for the action table."""
        gate = (self.result.config or {}).get("fail_on_impact")
        for rec in getattr(self.result, "impact", None) or []:
            get = rec.get if isinstance(rec, dict) else (lambda k, d=None, r=rec: getattr(r, k, d))
            if get("artifact") != artifact:
                continue
            flip, control = get("flip_rate"), get("control_flip_rate")
            excess = flip - control if _finite(flip) and _finite(control) else None
            ablation = get("ablation") or {}
            level = "not measured" if not _finite(flip) else (
                "material" if (excess if excess is not None else flip) >= IMPACT_MATERIAL else "small")
            return {"flip_rate": flip, "control_flip_rate": control, "excess": excess, "level": level,
                    "summary": get("summary") or "", "n_images": get("n_images"),
                    "gate": gate if isinstance(gate, (int, float)) else None,
                    "exceeded": bool(_finite(flip) and isinstance(gate, (int, float)) and flip > gate),
                    "share_carried": ablation.get("share_carried") if isinstance(ablation, dict) else None}
        return None

    def verdict(self) -> list[dict[str, Any]]:
        """Per artifact: verdict, status counts, strongest finding or closest call, impact, action."""
        rows = []
        layer_pos = {lyr.name: i for i, lyr in enumerate(self.result.layers)}
        for art in self.result.artifacts:
            concept = self.concepts.get(art)
            counts = {s: 0 for s in STATUS_ORDER}
            hits: list[tuple[LayerResult, NeuronResult, dict[str, Any]]] = []
            for lyr in self.result.layers:
                for n in lyr.neurons:
                    t = self.tests(n).get(art)
                    if t is None or t["status"] not in counts:
                        continue
                    counts[t["status"]] += 1
                    hits.append((lyr, n, t))
            if concept is not None and concept.status == "excluded" or art not in self.checked:
                status = "not_checked"
            else:
                status = next((st for st in STATUS_ORDER if counts[st]), "clean")
            # Flagged: the strongest flag (largest artifact effect). Otherwise the closest call:
            # near misses first, then inconclusive, then any neuron, by artifact effect.
            pick_from = [h for h in hits if h[2]["status"] == "flagged"] or \
                [h for h in hits if h[2]["status"] == "near_miss"] or \
                [h for h in hits if h[2]["status"] == "inconclusive"] or hits
            top = None
            if pick_from and status != "not_checked":
                lyr, n, t = max(pick_from, key=lambda h: (h[2]["effect"] if _finite(h[2]["effect"]) else -1,
                                                          h[1].best.auroc if h[1].best else -1, -h[1].index))
                top = {"anchor": self.anchor(layer_pos[lyr.name], n.index), "layer": lyr.name,
                       "neuron": n.index, "status": t["status"], "effect": t["effect"],
                       "effect_ci": t["effect_ci"], "reason": t["reason"], "tokens": self.tokens(n.best),
                       "auroc": n.best.auroc if n.best else None,
                       "p_adjusted": n.best.p_adjusted if n.best else None}
            impact = self.impact(art)
            level = impact["level"] if impact else "not measured"
            severity, action = ACTIONS[(status, level)]
            rows.append({
                "name": art,
                "label": self.concept_label(art),
                "status": status,
                "status_label": STATUS_LABEL[status],
                "reason": concept.reason if concept is not None else "not among the result's concepts",
                "counts": counts,
                "n_flagged": counts["flagged"],
                "n_tested": sum(counts.values()),
                "layers": sorted({lyr.name for lyr, _, t in hits if t["status"] == "flagged"},
                                 key=lambda name: layer_pos[name]),
                "top": top,
                "top_kind": "strongest" if status == "flagged" else "closest call",
                "prevalence": concept.fraction if concept is not None else None,
                "n_positive": concept.n_positive if concept is not None else None,
                "impact": impact,
                "impact_level": level,
                "action": action,
                "severity": severity,
                "near_misses": self.near_misses(art, hits, layer_pos),
            })
        return rows

    def near_misses(self, art: str, hits, layer_pos) -> list[dict[str, Any]]:
        """The closest calls for ``art`` that were not flagged, with the failed condition."""
        close = [h for h in hits if h[2]["status"] in ("near_miss", "inconclusive")]
        close.sort(key=lambda h: (h[2]["status"] != "near_miss",
                                  -(h[2]["effect"] if _finite(h[2]["effect"]) else -1), h[1].index))
        return [{"anchor": self.anchor(layer_pos[lyr.name], n.index), "layer": lyr.name, "neuron": n.index,
                 "status": t["status"], "effect": t["effect"], "effect_ci": t["effect_ci"], "reason": t["reason"],
                 "tokens": self.tokens(n.best), "auroc": n.best.auroc if n.best else None,
                 "p_adjusted": n.best.p_adjusted if n.best else None}
                for lyr, n, t in close[:NEAR_MISS_ROWS]] + ([{"more": len(close) - NEAR_MISS_ROWS}]
                                                               if len(close) > NEAR_MISS_ROWS else [])

    # -- page 1: identity ---------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """Model, probe set and the audit's own identity, from provenance and config."""
        r = self.result
        prov, cfg = r.provenance or {}, r.config or {}
        model = prov.get("model") if isinstance(prov.get("model"), dict) else {}
        cfg_model = cfg.get("model")
        arch = model.get("spec") or model.get("name") or (cfg_model if isinstance(cfg_model, str) else None) \
            or (_find(cfg_model, ("name",)) if isinstance(cfg_model, dict) else None)
        sha = model.get("sha256") or model.get("weights_sha256") or _find(prov, ("weights_sha256",))
        sha_of = model.get("sha256_of") or ("weights file" if model.get("weights_sha256") else None)
        params = model.get("parameters") or model.get("n_parameters")
        weights = model.get("weights") or (cfg.get("weights") if isinstance(cfg.get("weights"), str) else None)
        acts = prov.get("activations") if isinstance(prov.get("activations"), dict) else None
        if not model and acts:  # `auditor explain`: no model, the activations file is what was audited
            arch = arch or "activations given directly (auditor explain)"
            weights = weights or acts.get("path")
            sha, sha_of = sha or acts.get("sha256"), sha_of or "activations file"
        data = prov.get("data") if isinstance(prov.get("data"), dict) else {}
        source = cfg.get("images") if isinstance(cfg.get("images"), str) else None
        source = data.get("source") or source or data.get("probe_set") or data.get("name") or data.get("images")
        n_images = next((data[k] for k in ("n_used", "n_images") if _finite(data.get(k))), None) \
            or self.probe_size()
        labels = data.get("labels_source") or (cfg.get("labels") if isinstance(cfg.get("labels"), str) else None)
        synth = data.get("synth") if isinstance(data.get("synth"), dict) else None
        config_text = json.dumps(r.config or {}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return {
            "model": {"architecture": arch or "not recorded", "class": model.get("class"),
                      "kind": model.get("kind") or model.get("source"), "weights": weights,
                      "sha256": sha, "sha256_of": sha_of, "parameters": params},
            "probe": {"source": source, "labels": labels, "n_images": n_images,
                      "n_unreadable": data.get("n_unreadable"),
                      "synth": ", ".join(synth.get("artifacts") or []) if synth else None},
            "audit": {"tool": " ".join(str(v) for v in (r.tool or {}).values()) or "auditor",
                      "config_sha256": hashlib.sha256(config_text.encode("utf-8")).hexdigest(),
                      "results_sha256": hashlib.sha256(r.to_json().encode("utf-8")).hexdigest(),
                      "schema": r.schema_version, "rule_version": getattr(r, "rule_version", None),
                      "created": r.created},
        }

    def signoff(self) -> list[tuple[str, str | None]]:
        given = getattr(self.result, "signoff", None) or (self.result.config or {}).get("signoff") or {}
        if not isinstance(given, dict):
            given = {}
        return [(label, given.get(key) or None) for key, label in
                (("prepared_by", "Prepared by"), ("reviewed_by", "Reviewed by"), ("decision", "Decision"),
                 ("date", "Date"))]

    def threshold_rows(self) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """Numeric thresholds with human names, and the rule texts in full (never truncated)."""
        rows, texts = [], []
        for key, value in (self.result.thresholds or {}).items():
            if isinstance(value, str) or isinstance(value, (dict, list)):
                text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
                texts.append((key, text))
            else:
                rows.append({"key": key, "name": THRESHOLD_NAMES.get(key, key.replace("_", " ").capitalize()),
                             "value": fmt_num(value, 6)})
        return rows, texts

    def search(self) -> dict[str, Any]:
        prov, cfg = self.result.provenance or {}, self.result.config or {}
        found = prov.get("search") if isinstance(prov.get("search"), dict) else {}
        inv = cfg.get("invert") if isinstance(cfg.get("invert"), dict) else cfg
        return {"length": found.get("length", inv.get("length")), "beam": found.get("beam", inv.get("beam")),
                "concepts": found.get("concepts", sum(1 for c in self.result.concepts if c.status != "excluded")),
                "formulas_per_neuron": found.get("formulas_per_neuron"),
                "formulas_total": found.get("formulas_total"),
                "heldout": found.get("heldout", inv.get("heldout")),
                "bootstrap": cfg.get("bootstrap")}

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
        checked = [a for a in artifacts if a in self.checked]
        for n in layer.neurons:
            row = neuron_row(layer, n, artifacts, self.thresholds, self.checked)
            row["anchor"] = self.anchor(pos, n.index)
            row["tokens"] = self.tokens(n.best)
            row["formula_label"] = tokens_text(row["tokens"])
            tests = self.tests(n)
            row["tests"] = [{"name": a, **(tests.get(a) or {"status": None, "effect": None, "effect_ci": None})}
                            for a in checked]
            row["statuses"] = " ".join(sorted({t["status"] for t in tests.values()} | {row["verdict"]}))
            row["verdict_label"] = STATUS_LABEL.get(row["verdict"], row["verdict"])
            row["p_sort"] = _p_sort(row["p_adjusted"], row["log10_p"])
            # What the filter box matches: un-negated concepts (raw and display names) and,
            # separately, negated ones (typed as "not NAME"), so "watermark" skips NOT watermark.
            try:
                atoms = formula_atoms(n.best.ast) if n.best is not None else []
            except ValueError:
                atoms = []
            pos_names = {x for name, neg in atoms if not neg for x in (name, self.concept_label(name))}
            neg_names = {x for name, neg in atoms if neg for x in (name, self.concept_label(name))}
            row["match_pos"] = "|".join(sorted(x.lower() for x in pos_names))
            row["match_neg"] = "|".join(sorted(x.lower() for x in neg_names))
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
            rank = {s: i for i, s in enumerate(STATUS_ORDER)}
            keep = sorted(rows, key=lambda r: (rank.get(r["verdict"], len(rank)),
                                               -(r["auroc"] if _finite(r["auroc"]) else -1)))[:PDF_TABLE_LIMIT]
            keep_ids = {r["neuron"] for r in keep}
            pdf_rows = [r for r in rows if r["neuron"] in keep_ids]
        reference = sorted((n for n in layer.neurons if worst_status(self.tests(n)) in ("clean", None)
                            and n.best is not None
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
            "n_flagged": sum(1 for r in rows if r["verdict"] == "flagged"),
            "counts": {st: sum(1 for r in rows if r["verdict"] == st) for st in STATUS_ORDER},
            "artifacts": [{"name": a, "label": self.concept_label(a)} for a in checked],
            "dead": dead,
            "dead_text": ranges(dead),
            "no_explanation_text": ranges(no_expl),
            "n_no_explanation": len(no_expl),
            "median_auroc": median(live_auroc),
            "median_fraction": median(live_frac),
            "auroc_hist": self.figure(figures.auroc_histogram, live_auroc, flagged_auroc, self.auroc_threshold),
            "scatter": self.figure(figures.auroc_fraction_scatter, live_frac, live_auroc, live_flag,
                                   self.auroc_threshold),
            "usage": top,
            "n_concepts_used": len(usage),
            "rows": rows,
            "pdf_rows": pdf_rows,
            "reference": [self.card(pos, layer, n) for n in reference],
        }

    def build(self) -> dict[str, Any]:
        r = self.result
        layers = [self.layer(i, lyr) for i, lyr in enumerate(r.layers)]

        def strongest(n: NeuronResult) -> float:
            return max((t["effect"] for t in self.tests(n).values()
                        if t["status"] == "flagged" and _finite(t["effect"])), default=0.0)

        flagged = [(i, lyr, n) for i, lyr in enumerate(r.layers) for n in lyr.neurons
                   if worst_status(self.tests(n)) == "flagged"]
        # Within a layer: largest artifact effect among the neuron's flags, then best-formula AUROC.
        flagged.sort(key=lambda t: (t[0], -strongest(t[2]), -(t[2].best.auroc if t[2].best else 0.0), t[2].index))
        cards = [self.card(i, lyr, n) for i, lyr, n in flagged[:MAX_CARDS]]
        collapse = len(cards) > CARDS_COLLAPSE_ABOVE
        for k, c in enumerate(cards):
            c["open"] = not collapse or k < CARDS_OPEN
        overflow = [
            {"layer": lyr.name, "neuron": n.index, "tokens": self.tokens(n.best),
             "tests": [t for t in self.test_list(n) if t["status"] == "flagged"]}
            for i, lyr, n in flagged[MAX_CARDS:]
        ]
        dora = dora_view(r, self.anchor, self.tokens, self.render_figures)
        for c in cards:  # the s-AMS strip on flagged neurons' cards
            c["dora"] = dora["cards"].get(c["anchor"]) if dora else None
        verdict = self.verdict()
        checked = [v for v in verdict if v["status"] != "not_checked"]
        urgent = min(verdict, key=lambda v: (v["severity"], -v["n_flagged"])) if verdict else None
        excluded = [c for c in r.concepts if c.status == "excluded"]
        thresholds, rule_texts = self.threshold_rows()
        totals = {st: sum(v["counts"][st] for v in verdict) for st in STATUS_ORDER}
        return {
            "title": r.title,
            "created": r.created,
            "tool": r.tool,
            "schema_version": r.schema_version,
            "verdict": verdict,
            "impact": impact_context(r),
            "identity": self.identity(),
            "signoff": self.signoff(),
            "overall": {
                "flagged": bool(flagged),
                "n_flagged": len(flagged),
                "n_layers_flagged": len({lyr.name for _, lyr, _ in flagged}),
                "artifacts": [v["label"] for v in verdict if v["status"] == "flagged"],
                "n_artifacts": len(r.artifacts),
                "n_artifacts_checked": len(checked),
                "n_neurons": sum(len(lyr.neurons) for lyr in r.layers),
                "totals": totals,
                "action": urgent["action"] if urgent else "No artifact concept was audited.",
                "action_artifact": urgent["label"] if urgent and urgent["severity"] < 9 else None,
                "severity": urgent["severity"] if urgent else 9,
            },
            "facts": self.facts(),
            "thresholds": thresholds,
            "rule_texts": rule_texts,
            "rule": r.thresholds or {},
            "rule_version": r.rule_version,
            "calibration": r.calibration,
            "config_heldout": (r.config or {}).get("heldout"),
            "search": self.search(),
            "glossary": GLOSSARY,
            "actions": [{"verdict": STATUS_LABEL[v], "impact": i, "line": ACTIONS[(v, i)][1]}
                        for v in ("flagged", "near_miss", "inconclusive", "clean", "not_checked")
                        for i in IMPACT_LEVELS],
            "impact_material": IMPACT_MATERIAL,
            "status_label": STATUS_LABEL,
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
