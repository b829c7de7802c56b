"""Tables derived from an ``AuditResult``: the per-neuron table (pandas) and CSV.

These are plain data; the HTML view model in :mod:`auditor.report.context` reads the
same rows, so the CSV, the HTML table and the PDF never disagree.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..results import AuditResult, LayerResult, NeuronResult

BASE_COLUMNS = [
    "layer",
    "neuron",
    "status",
    "formula",
    "length",
    "auroc",
    "auroc_ci_low",
    "auroc_ci_high",
    "p_value",
    "log10_p",
    "p_adjusted",
    "fraction",
    "support",
    "heldout_auroc",
    "heldout_p_value",
    "flagged",
    "flags",
    "sensitive",
]
STAT_COLUMNS = {"mean": "act_mean", "std": "act_std", "max": "act_max", "frac_zero": "act_frac_zero"}
INT_COLUMNS = ("neuron", "length", "support")

# Cells a spreadsheet would run as a formula (CSV injection): see OWASP "CSV Injection".
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def artifact_column(artifact: str) -> str:
    return f"artifact_auroc:{artifact}"


# Per artifact, per neuron: the flag rule's status and the artifact's effect.
TEST_FIELDS = ("status", "effect", "effect_ci_low", "effect_ci_high")
STATUS_ORDER = ("flagged", "near_miss", "inconclusive", "clean")


def test_column(field: str, artifact: str) -> str:
    return f"{field}:{artifact}"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _thr(thresholds: dict[str, Any], key: str, default: float) -> float:
    v = (thresholds or {}).get(key)
    return float(v) if _finite(v) else default


def neuron_tests(neuron: NeuronResult, artifacts: list[str], thresholds: dict[str, Any] | None = None,
                 checked: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per artifact: ``status``, ``effect``, ``effect_ci``, ``p_adjusted``, ``reason``, … for one neuron.

    From ``neuron.artifact_tests`` when the result has them (flag rule 2.x). For
    older results they are derived from the flags: *flagged* when a flag names the
    artifact; *near miss* when the best formula names the artifact un-negated and
    reaches the AUROC threshold but is not flagged (the reason names the condition
    that failed), or when the neuron is artifact-sensitive (the artifact alone passes
    ``artifact_auroc``) without a flag; *clean* otherwise. The effect is then the artifact's AUROC alone
    with its DeLong interval. Dead neurons and neurons without a formula have none.
    """
    if neuron.status == "dead":
        return {}
    out: dict[str, dict[str, Any]] = {}
    for t in getattr(neuron, "artifact_tests", None) or []:
        ci = getattr(t, "effect_ci", None)
        out[t.artifact] = {
            "status": t.status, "effect": getattr(t, "effect", None),
            "effect_ci": list(ci) if ci else None,
            "effect_ci_bootstrap": list(getattr(t, "effect_ci_bootstrap", None) or []) or None,
            "p_value": getattr(t, "p_value", None), "p_adjusted": getattr(t, "p_adjusted", None),
            "branch": getattr(t, "branch", None), "direction": getattr(t, "direction", None),
            "n_artifact": getattr(t, "n_artifact", None), "reason": getattr(t, "reason", "") or "",
        }
    if out:
        return out
    thresholds = thresholds or {}
    best = neuron.best
    if best is None:
        return {}
    min_auroc = _thr(thresholds, "flag_min_auroc", 0.7)
    try:
        named = {name for name, neg in formula_atoms(best.ast) if not neg}
    except ValueError:
        named = set()
    cis = getattr(neuron, "artifact_auroc_ci", None) or {}
    boots = getattr(neuron, "artifact_auroc_ci_bootstrap", None) or {}
    for art in artifacts:
        if checked is not None and art not in checked:
            continue
        effect = neuron.artifact_auroc.get(art)
        ci = cis.get(art)
        flag = next((f for f in neuron.flags if f.artifact == art), None)
        if flag is not None:
            status, reason = "flagged", flag.reason
        elif art in named and _finite(best.auroc) and best.auroc >= min_auroc:
            status, reason = "near_miss", _why_not(best, art, effect, thresholds)
        elif art in (getattr(neuron, "sensitive", None) or []):
            status = "near_miss"
            reason = (f"{art} alone reaches AUROC {effect:.3f} (≥ {_thr(thresholds, 'artifact_auroc', 0.75):g}) "
                      f"but the best formula does not name {art}")
        else:
            status = "clean"
            reason = (f"best formula does not name {art}" if art not in named
                      else f"best formula's AUROC {best.auroc:.3f} is below {min_auroc:g}")
        out[art] = {"status": status, "effect": effect, "effect_ci": list(ci) if ci else None,
                    "effect_ci_bootstrap": list(boots[art]) if art in boots else None, "p_value": None,
                    "p_adjusted": best.p_adjusted if flag is not None or status == "near_miss" else None,
                    "branch": None, "direction": None, "n_artifact": None, "reason": reason}
    return out


def _why_not(best, art: str, effect: Any, thresholds: dict[str, Any]) -> str:
    """The first condition of the 1.x flag rule that a formula naming ``art`` failed."""
    max_p = _thr(thresholds, "flag_max_p", 0.01)
    min_auroc = _thr(thresholds, "flag_min_auroc", 0.7)
    min_support = _thr(thresholds, "flag_min_support", 0)
    alone = _thr(thresholds, "artifact_auroc", 0.75)
    p = best.p_adjusted if best.p_adjusted is not None else best.p_value
    head = f"best formula names {art} (AUROC {best.auroc:.3f}) but "
    if _finite(p) and p > max_p:
        return head + f"its adjusted p {p:.2g} is above {max_p:g}"
    if best.support < min_support:
        return head + f"it holds on {best.support} images, fewer than {min_support:g}"
    if best.heldout_auroc is not None and not best.heldout_auroc >= min_auroc:
        return head + f"its held-out AUROC {best.heldout_auroc:.3f} is below {min_auroc:g}"
    eff = f"{effect:.3f}" if _finite(effect) else "unknown"
    return head + (f"{art} alone reaches only AUROC {eff} (needs {alone:g}) and removing it from the formula "
                   "does not show its part")


def worst_status(tests: dict[str, dict[str, Any]]) -> str | None:
    """The most serious status among a neuron's artifact tests (flagged first)."""
    found = {t["status"] for t in tests.values()}
    return next((s for s in STATUS_ORDER if s in found), None)


def median(values: list[float]) -> float | None:
    """The median (mean of the two middle values for an even count), as pandas computes it."""
    vals = [float(v) for v in values if _finite(v)]
    return statistics.median(vals) if vals else None


def flag_text(neuron: NeuronResult) -> str:
    """``watermark (formula); text_overlay (sensitive)``."""
    return "; ".join(f"{f.artifact} ({f.rule})" if getattr(f, "rule", None) else f.artifact for f in neuron.flags)


def neuron_row(layer: LayerResult, neuron: NeuronResult, artifacts: list[str],
               thresholds: dict[str, Any] | None = None, checked: set[str] | None = None) -> dict[str, Any]:
    """One neuron as a flat record (the best formula's numbers and each artifact's test)."""
    best = neuron.best
    tests = neuron_tests(neuron, artifacts, thresholds, checked)
    ci = best.auroc_ci if best is not None and best.auroc_ci else (None, None)
    row: dict[str, Any] = {
        "layer": layer.name,
        "neuron": neuron.index,
        "status": neuron.status,
        "formula": best.formula if best else None,
        "length": best.length if best else None,
        "auroc": best.auroc if best else None,
        "auroc_ci_low": ci[0],
        "auroc_ci_high": ci[1],
        "p_value": best.p_value if best else None,
        "log10_p": best.log10_p if best else None,
        "p_adjusted": best.p_adjusted if best else None,
        "fraction": best.fraction if best else None,
        "support": best.support if best else None,
        "heldout_auroc": best.heldout_auroc if best else None,
        "heldout_p_value": best.heldout_p_value if best else None,
        "flagged": neuron.flagged,
        "flags": flag_text(neuron),
        "sensitive": "; ".join(getattr(neuron, "sensitive", None) or []),
        "verdict": "dead" if neuron.status == "dead" else (worst_status(tests) or "no formula"),
    }
    for art in artifacts:
        row[artifact_column(art)] = neuron.artifact_auroc.get(art)
    for art in artifacts:
        t = tests.get(art) or {}
        ci = t.get("effect_ci") or (None, None)
        row[test_column("status", art)] = t.get("status")
        row[test_column("effect", art)] = t.get("effect")
        row[test_column("effect_ci_low", art)] = ci[0]
        row[test_column("effect_ci_high", art)] = ci[1]
    for key, col in STAT_COLUMNS.items():
        row[col] = neuron.stats.get(key)
    return row


def checked_artifacts(result: AuditResult) -> set[str]:
    """Artifacts that could be tested (not excluded from the search)."""
    excluded = {c.name for c in result.concepts if c.status == "excluded"}
    return {a for a in result.artifacts if a not in excluded}


def iter_rows(result: AuditResult) -> Iterator[dict[str, Any]]:
    checked = checked_artifacts(result)
    for layer in result.layers:
        for neuron in layer.neurons:
            yield neuron_row(layer, neuron, result.artifacts, result.thresholds, checked)


def columns(result: AuditResult) -> list[str]:
    return (BASE_COLUMNS + ["verdict"] + [artifact_column(a) for a in result.artifacts]
            + [test_column(f, a) for a in result.artifacts for f in TEST_FIELDS] + list(STAT_COLUMNS.values()))


def neurons_table(result: AuditResult):
    """One row per neuron (all layers): the best formula, its scores, flags and stats.

    Missing values (dead neurons, no held-out split) are NaN / <NA>; integer columns
    use pandas' nullable ``Int64``.
    """
    import pandas as pd

    df = pd.DataFrame(list(iter_rows(result)), columns=columns(result))
    for col in INT_COLUMNS:
        df[col] = df[col].astype("Int64")
    df["flagged"] = df["flagged"].astype(bool)
    text_cols = _text_columns(result) | {"flagged"}
    float_cols = [c for c in df.columns if c not in (*INT_COLUMNS, *text_cols)]
    df[float_cols] = df[float_cols].astype(float)
    return df


def _csv_safe(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


_SAFE_COLUMNS = ("layer", "formula", "flags", "sensitive")


def _text_columns(result: AuditResult) -> set[str]:
    return {"layer", "status", "formula", "flags", "sensitive", "verdict",
            *(test_column("status", a) for a in result.artifacts)}


def _csv_cell(col: str, value: Any, text: set[str]) -> str:
    """One cell as ``neurons_table(result).to_csv()`` writes it (empty for missing values)."""
    if value is None:
        return ""
    if col in INT_COLUMNS:
        return str(int(value))
    if col == "flagged":
        return str(bool(value))
    if col in text:
        return _csv_safe(value) if col in _SAFE_COLUMNS else str(value)
    f = float(value)
    return "" if f != f else repr(f)


def write_csv(result: AuditResult, path: str | Path) -> Path:
    """``neurons.csv``: the rows of :func:`neurons_table` (the same text pandas' ``to_csv``
    writes for it, without importing pandas), with text cells that a spreadsheet would
    evaluate (starting with ``= + - @``) prefixed by ``'``."""
    path = Path(path)
    cols = columns(result)
    text = _text_columns(result)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        w.writerow(cols)
        for row in iter_rows(result):
            w.writerow([_csv_cell(c, row.get(c), text) for c in cols])
    return path


# -- formula structure --------------------------------------------------------------
def formula_atoms(ast: Any) -> list[tuple[str, bool]]:
    """``(concept, negated)`` for every atom of a formula AST, in order."""
    out: list[tuple[str, bool]] = []

    def walk(node: Any, negated: bool) -> None:
        if isinstance(node, str):
            out.append((node, negated))
        elif isinstance(node, (list, tuple)) and node:
            if node[0] == "not" and len(node) == 2:
                walk(node[1], not negated)
            elif node[0] in ("and", "or"):
                for child in node[1:]:
                    walk(child, negated)
            else:
                raise ValueError(f"unknown formula node {node[0]!r}")
        else:
            raise ValueError(f"unknown formula node {node!r}")

    walk(ast, False)
    return out


def concept_usage(layer: LayerResult) -> list[dict[str, Any]]:
    """Concepts ranked by how many neurons' best formula uses them.

    ``neurons`` counts each neuron once; ``plain`` and ``negated`` count the neurons
    using the concept as is and under NOT (one formula may do both).
    """
    users: Counter[str] = Counter()
    plain: Counter[str] = Counter()
    negated: Counter[str] = Counter()
    for neuron in layer.neurons:
        best = neuron.best
        if best is None:
            continue
        try:
            atoms = set(formula_atoms(best.ast))
        except ValueError:
            continue
        users.update({name for name, _ in atoms})
        for name, neg in atoms:
            (negated if neg else plain)[name] += 1
    rows = [{"concept": n, "neurons": c, "plain": plain[n], "negated": negated[n]} for n, c in users.items()]
    rows.sort(key=lambda r: (-r["neurons"], r["concept"]))
    return rows
