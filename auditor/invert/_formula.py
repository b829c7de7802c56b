"""Formula trees: text, inspection, editing and evaluation.

A formula is a JSON-able tree: a leaf (a concept name, or a column index) |
``["not", x]`` | ``["and", x, y]`` | ``["or", x, y]``. Tuples are accepted too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import DataError, did_you_mean
from ._labels import as_label_matrix

_BINARY = ("and", "or")


def _is_leaf(ast) -> bool:
    return isinstance(ast, (str, int, np.integer)) and not isinstance(ast, bool)


def _check_node(ast) -> None:
    if not isinstance(ast, (list, tuple)) or not ast:
        raise DataError(f"malformed formula node {ast!r}: expected a concept name or a list")
    op = ast[0]
    if op == "not":
        if len(ast) != 2:
            raise DataError(f"malformed formula node {ast!r}: 'not' takes one operand")
    elif op in _BINARY:
        if len(ast) != 3:
            raise DataError(f"malformed formula node {ast!r}: {op!r} takes two operands")
    else:
        raise DataError(f"malformed formula node {ast!r}: operator must be 'not', 'and' or 'or'")


def formula_text(ast) -> str:
    """``["or", ["and", "watermark", ["not", "star"]], "text"]`` ->
    ``"(watermark AND NOT star) OR text"``: every binary sub-formula is parenthesised."""
    if _is_leaf(ast):
        return str(ast)
    _check_node(ast)
    if ast[0] == "not":
        inner = ast[1]
        s = formula_text(inner)
        return "NOT " + (s if _is_leaf(inner) or inner[0] == "not" else f"({s})")

    def wrap(x) -> str:
        s = formula_text(x)
        return s if _is_leaf(x) or x[0] == "not" else f"({s})"

    return f"{wrap(ast[1])} {ast[0].upper()} {wrap(ast[2])}"


def concepts_in(ast) -> list[tuple[str, bool]]:
    """Leaves from left to right as ``(name, negated)``; negated = under an odd
    number of NOTs."""
    out: list[tuple[str, bool]] = []

    def walk(x, neg: bool) -> None:
        if _is_leaf(x):
            out.append((x, neg))
            return
        _check_node(x)
        if x[0] == "not":
            walk(x[1], not neg)
        else:
            walk(x[1], neg)
            walk(x[2], neg)

    walk(ast, False)
    return out


def remove_concept(ast, name):
    """Drop every un-negated occurrence of ``name``: a binary node that loses one
    operand is replaced by the other. Returns None when nothing is left.
    Occurrences under a NOT are kept."""

    def walk(x, neg: bool):
        if _is_leaf(x):
            return None if (x == name and not neg) else x
        _check_node(x)
        if x[0] == "not":
            inner = walk(x[1], not neg)
            return None if inner is None else ["not", inner]
        left = walk(x[1], neg)
        right = walk(x[2], neg)
        if left is None:
            return right
        if right is None:
            return left
        return [x[0], left, right]

    return walk(ast, False)


def map_leaves(ast, fn):
    """The same tree with every leaf replaced by ``fn(leaf)`` (lists throughout)."""
    if _is_leaf(ast):
        return fn(ast)
    _check_node(ast)
    return [ast[0]] + [map_leaves(a, fn) for a in ast[1:]]


def evaluate_columns(ast, column) -> np.ndarray:
    """Evaluate a tree whose leaves are resolved by ``column(leaf) -> bool array``."""
    if _is_leaf(ast):
        return column(ast)
    _check_node(ast)
    if ast[0] == "not":
        return ~evaluate_columns(ast[1], column)
    a = evaluate_columns(ast[1], column)
    b = evaluate_columns(ast[2], column)
    return (a & b) if ast[0] == "and" else (a | b)


def evaluate(ast, labels, concepts: Sequence[str]) -> np.ndarray:
    """Boolean (N,) vector: where the formula holds on the label matrix.

    Leaves are concept names (the first column with that name is used) or integer
    column indices.
    """
    lm = as_label_matrix(labels, concepts)
    concepts = list(concepts)
    if len(concepts) != lm.C:
        raise DataError(f"{len(concepts)} concept names given for a label matrix with {lm.C} columns")
    first: dict[str, int] = {}
    for i, c in enumerate(concepts):
        first.setdefault(c, i)

    def column(leaf) -> np.ndarray:
        if isinstance(leaf, str):
            if leaf not in first:
                raise DataError(f"unknown concept {leaf!r} in formula" + did_you_mean(leaf, concepts))
            return lm.column(first[leaf])
        c = int(leaf)
        if not 0 <= c < lm.C:
            raise DataError(f"concept column {c} out of range [0, {lm.C})")
        return lm.column(c)

    return evaluate_columns(ast, column)
