"""INVERT: explain neurons by logical formulas over concepts (pure tensors in, plain results out).

See docs/invert.md for the algorithm, its exactness and its speed.

    from auditor.invert import explain, InvertParams
    results = explain(activations, labels, concept_names, InvertParams(length=3, beam=3))
    results[0].formulas[0].text   # "(watermark AND NOT star) OR text"
"""

from ._api import auroc, auroc_vector, explain, explain_modes, heldout_split, mannwhitney
from ._formula import concepts_in, evaluate, formula_text, remove_concept
from ._stats import benjamini_hochberg
from ._types import Formula, InvertParams, NeuronExplanation

__all__ = [
    "InvertParams",
    "Formula",
    "NeuronExplanation",
    "explain",
    "explain_modes",
    "heldout_split",
    "auroc",
    "auroc_vector",
    "mannwhitney",
    "benjamini_hochberg",
    "evaluate",
    "formula_text",
    "remove_concept",
    "concepts_in",
]
