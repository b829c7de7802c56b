"""Tables derived from an ``AuditResult``: the per-neuron table (pandas) and CSV.

These are plain data; the HTML view model in :mod:`auditor.report.context` reads the
same rows, so the CSV, the HTML table and the PDF never disagree.
"""

from __future__ import annotations

import csv
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
# Per artifact (rule 2.x): the test's status, direction, stratified effect and adjusted p.
TEST_FIELDS = ("status", "direction", "effect", "p_adjusted")
STAT_COLUMNS = {"mean": "act_mean", "std": "act_std", "max": "act_max", "frac_zero": "act_frac_zero"}
INT_COLUMNS = ("neuron", "length", "support")

# Cells a spreadsheet would run as a formula (CSV injection): see OWASP "CSV Injection".
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def artifact_column(artifact: str) -> str:
    return f"artifact_auroc:{artifact}"


def flag_text(neuron: NeuronResult) -> str:
    """``watermark (formula, raises); text_overlay (sensitive)``."""
    return "; ".join(f"{f.artifact} ({f.rule}{', ' + f.direction if f.direction else ''})" for f in neuron.flags)


def test_column(artifact: str, key: str) -> str:
    return f"{key}:{artifact}"


def neuron_row(layer: LayerResult, neuron: NeuronResult, artifacts: list[str]) -> dict[str, Any]:
    """One neuron as a flat record (the best formula's numbers)."""
    best = neuron.best
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
        "sensitive": "; ".join(neuron.sensitive),
    }
    for art in artifacts:
        row[artifact_column(art)] = neuron.artifact_auroc.get(art)
        t = neuron.test(art)
        for key in TEST_FIELDS:
            row[test_column(art, key)] = getattr(t, key) if t is not None else None
    for key, col in STAT_COLUMNS.items():
        row[col] = neuron.stats.get(key)
    return row


def iter_rows(result: AuditResult) -> Iterator[dict[str, Any]]:
    for layer in result.layers:
        for neuron in layer.neurons:
            yield neuron_row(layer, neuron, result.artifacts)


def columns(result: AuditResult) -> list[str]:
    return BASE_COLUMNS + [artifact_column(a) for a in result.artifacts] + list(STAT_COLUMNS.values()) \
        + [test_column(a, k) for a in result.artifacts for k in TEST_FIELDS]


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
    text_cols = {test_column(a, k) for a in result.artifacts for k in ("status", "direction")}
    float_cols = [c for c in df.columns if c not in (*INT_COLUMNS, "layer", "status", "formula", "flagged",
                                                        "flags", "sensitive") and c not in text_cols]
    df[float_cols] = df[float_cols].astype(float)
    return df


def _csv_safe(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def write_csv(result: AuditResult, path: str | Path) -> Path:
    """``neurons.csv``: :func:`neurons_table`, with text cells that a spreadsheet would
    evaluate (starting with ``= + - @``) prefixed by ``'``."""
    path = Path(path)
    df = neurons_table(result)
    for col in ("layer", "formula", "flags", "sensitive"):
        df[col] = df[col].map(_csv_safe)
    df.to_csv(path, index=False, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
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
