"""Artifact flagging rules.

A neuron is **flagged** for an artifact concept when all of these hold:

1. the artifact appears un-negated in the neuron's best formula;
2. the formula's Benjamini–Hochberg adjusted p-value is at most ``flag_max_p``;
3. the formula's AUROC is at least ``flag_min_auroc``;
4. the artifact's own part is shown: the artifact alone reaches AUROC
   ``artifact_auroc``, *or* removing it from the formula costs at least
   ``flag_margin`` AUROC.

Rule 4 keeps formulas such as ``stripes AND star AND text`` on neurons that ignore
text from being flagged. Separately, a neuron whose AUROC for an artifact alone
reaches ``artifact_auroc`` is marked **artifact-sensitive** even when its best
formula names something else (a second, weaker signal, reported on its own).

The rules are pure functions of numbers: they take a scorer for the formula
without the artifact and never touch the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .results import Explanation, Flag


@dataclass(frozen=True)
class Thresholds:
    flag_max_p: float = 0.01
    flag_min_auroc: float = 0.7
    artifact_auroc: float = 0.75
    flag_margin: float = 0.05

    def plain(self) -> dict[str, Any]:
        return {"flag_max_p": self.flag_max_p, "flag_min_auroc": self.flag_min_auroc,
                "artifact_auroc": self.artifact_auroc, "flag_margin": self.flag_margin,
                "rule": "artifact un-negated in the best formula AND p_adjusted <= flag_max_p AND "
                        "auroc >= flag_min_auroc AND (artifact's own AUROC >= artifact_auroc OR "
                        "auroc - auroc(formula without the artifact) >= flag_margin)",
                "sensitive_rule": "artifact's own AUROC >= artifact_auroc"}


def unnegated_concepts(ast: Any, negated: bool = False) -> set[str]:
    """Concept names that occur un-negated in a formula tree."""
    if isinstance(ast, str):
        return set() if negated else {ast}
    op = ast[0]
    if op == "not":
        return unnegated_concepts(ast[1], not negated)
    return unnegated_concepts(ast[1], negated) | unnegated_concepts(ast[2], negated)


def flag_neuron(best: Explanation | None, artifact_auroc: dict[str, float], thresholds: Thresholds,
                auroc_without: Callable[[str], float | None]) -> tuple[list[Flag], list[str]]:
    """Apply the rules to one neuron; return (flags, artifact-sensitive names).

    ``auroc_without(artifact)`` returns the AUROC of the best formula with the
    artifact removed (None when nothing would remain).
    """
    sensitive = [a for a, v in artifact_auroc.items() if v is not None and v == v and v >= thresholds.artifact_auroc]
    flags: list[Flag] = []
    if best is None:
        return flags, sensitive
    present = unnegated_concepts(best.ast)
    for art, own in artifact_auroc.items():
        if art not in present:
            continue
        p_adj = best.p_adjusted if best.p_adjusted is not None else best.p_value
        if p_adj is None or p_adj > thresholds.flag_max_p or best.auroc < thresholds.flag_min_auroc:
            continue
        without = auroc_without(art)
        base = 0.5 if without is None or without != without else without
        margin = best.auroc - base
        own_ok = own is not None and own == own and own >= thresholds.artifact_auroc
        margin_ok = margin >= thresholds.flag_margin
        if not (own_ok or margin_ok):
            continue
        why = []
        if own_ok:
            why.append(f"{art} alone reaches AUROC {own:.3f} (≥ {thresholds.artifact_auroc})")
        if margin_ok:
            why.append(f"removing {art} from the formula drops AUROC by {margin:.3f} (≥ {thresholds.flag_margin})")
        reason = (f"best formula {best.formula!r} (AUROC {best.auroc:.3f}, adjusted p {p_adj:.2g}) "
                  f"contains {art}; " + " and ".join(why))
        flags.append(Flag(artifact=art, rule="formula", formula=best.formula, auroc=best.auroc,
                          p_adjusted=best.p_adjusted, artifact_auroc=own,
                          auroc_without_artifact=without, margin=margin, reason=reason))
    return flags, sensitive
