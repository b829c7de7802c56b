"""Artifact flagging rules.

A neuron is **flagged** for an artifact concept when all of these hold:

1. the artifact appears un-negated in the neuron's best formula;
2. the formula's Benjamini–Hochberg adjusted p-value is at most ``flag_max_p``;
3. the formula's AUROC is at least ``flag_min_auroc`` (and, when a held-out split
   is used, also its AUROC on the held-out images);
4. the formula holds on at least ``flag_min_support`` images;
5. the artifact's own part is shown: the artifact alone reaches AUROC
   ``artifact_auroc``, *or* all of: removing it from the formula costs at least
   ``flag_margin`` AUROC; the artifact raises the activation within the rest of
   the formula (among the images where the formula without the artifact holds,
   those with the artifact activate higher: one-sided Mann–Whitney,
   p ≤ ``flag_max_p``); and the artifact alone still reaches the weaker
   ``flag_partial_auroc`` (a context-specific detector, e.g. "watermark on
   checkerboards", still rises with the watermark overall).

Rule 5 keeps formulas such as ``stripes AND star AND text`` on neurons that ignore
text from being flagged. Rules 4 and 5 matter for narrow formulas: the beam search
picks, among thousands of candidates, the few images where a neuron happens to be
high, so tests on the same images are optimistic (on a random-weight ResNet-18
and 200 probe images, formulas such as ``(yellow AND watermark) AND dots`` holding
on 3 images passed the margin and its test while watermark alone had AUROC 0.44).
Removing a concept from a formula with a small support changes
its AUROC by chance alone (a random subset of the positives has the same AUROC
only in expectation), so a margin without a test flags noise. Separately, a neuron whose AUROC for an artifact alone
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
    flag_partial_auroc: float = 0.6
    flag_min_support: int = 10

    def plain(self) -> dict[str, Any]:
        return {"flag_max_p": self.flag_max_p, "flag_min_auroc": self.flag_min_auroc,
                "artifact_auroc": self.artifact_auroc, "flag_margin": self.flag_margin,
                "flag_partial_auroc": self.flag_partial_auroc, "flag_min_support": self.flag_min_support,
                "rule": "artifact un-negated in the best formula AND p_adjusted <= flag_max_p AND "
                        "auroc (and held-out auroc, if any) >= flag_min_auroc AND support >= flag_min_support AND "
                        "(artifact's own AUROC >= artifact_auroc OR "
                        "(auroc - auroc(formula without the artifact) >= flag_margin AND, among images where the "
                        "formula without the artifact holds, the artifact raises the activation with one-sided "
                        "Mann-Whitney p <= flag_max_p AND artifact's own AUROC >= flag_partial_auroc))",
                "sensitive_rule": "artifact's own AUROC >= artifact_auroc"}


def unnegated_concepts(ast: Any, negated: bool = False) -> set[str]:
    """Concept names that occur un-negated in a formula tree."""
    if isinstance(ast, str):
        return set() if negated else {ast}
    op = ast[0]
    if op == "not":
        return unnegated_concepts(ast[1], not negated)
    return unnegated_concepts(ast[1], negated) | unnegated_concepts(ast[2], negated)


@dataclass(frozen=True)
class PartEvidence:
    """What removing an artifact from a formula shows (computed by the pipeline)."""

    auroc_without: float | None  # AUROC of the formula without the artifact (None: nothing remains)
    conditional_auroc: float | None  # within the rest's support: artifact vs no artifact
    conditional_p: float | None  # one-sided Mann-Whitney p of that comparison


def flag_neuron(best: Explanation | None, artifact_auroc: dict[str, float], thresholds: Thresholds,
                part: Callable[[str], PartEvidence]) -> tuple[list[Flag], list[str]]:
    """Apply the rules to one neuron; return (flags, artifact-sensitive names).

    ``part(artifact)`` measures the artifact's own part in the best formula.
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
        if p_adj is None or p_adj > thresholds.flag_max_p or best.auroc < thresholds.flag_min_auroc \
                or best.support < thresholds.flag_min_support:
            continue
        # With a held-out split, the formula must also hold up on images the search never saw.
        if best.heldout_auroc is not None and not best.heldout_auroc >= thresholds.flag_min_auroc:
            continue
        ev = part(art)
        without = ev.auroc_without
        base = 0.5 if without is None or without != without else without
        margin = best.auroc - base
        own_ok = own is not None and own == own and own >= thresholds.artifact_auroc
        cond_ok = ev.conditional_p is not None and ev.conditional_p == ev.conditional_p \
            and ev.conditional_p <= thresholds.flag_max_p
        partial_ok = own is not None and own == own and own >= thresholds.flag_partial_auroc
        margin_ok = margin >= thresholds.flag_margin and cond_ok and partial_ok
        if not (own_ok or margin_ok):
            continue
        why = []
        if own_ok:
            why.append(f"{art} alone reaches AUROC {own:.3f} (≥ {thresholds.artifact_auroc})")
        if margin_ok:
            why.append(f"removing {art} from the formula drops AUROC by {margin:.3f} (≥ {thresholds.flag_margin}), "
                       f"and within the rest of the formula images with {art} activate higher "
                       f"(AUROC {ev.conditional_auroc:.3f}, p {ev.conditional_p:.2g})")
        reason = (f"best formula {best.formula!r} (AUROC {best.auroc:.3f}, adjusted p {p_adj:.2g}) "
                  f"contains {art}; " + " and ".join(why))
        flags.append(Flag(artifact=art, rule="formula", formula=best.formula, auroc=best.auroc,
                          p_adjusted=best.p_adjusted, artifact_auroc=own,
                          auroc_without_artifact=without, margin=margin, reason=reason,
                          conditional_auroc=ev.conditional_auroc, conditional_p=ev.conditional_p))
    return flags, sensitive
