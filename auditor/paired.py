"""Paired with/without-artifact effects per neuron.

A synthesised probe set (see :mod:`auditor.synth`) holds, for every artifact,
pairs of rows: a clean image and the very same image with the artifact pasted
on. Comparing a neuron's activation within each pair removes everything but the
artifact, so it is stronger evidence than a correlation over different images:

``mean_diff_sd``
    mean of (with − without), in units of the neuron's standard deviation over
    the clean images (population SD, ``ddof=0``). If that SD is 0 (a neuron
    constant on clean images), the SD over the clean and artifact rows of the
    pairs together is used; if that is also 0, every difference is 0 and so is
    the effect. It is never NaN or infinite.
``frac_rise``
    fraction of pairs whose activation is strictly higher with the artifact.
``wilcoxon_p``
    two-sided Wilcoxon signed-rank p-value of the differences
    (:func:`scipy.stats.wilcoxon`, zero differences dropped, exact for small
    samples without ties, normal approximation otherwise); 1.0 when every
    difference is 0 (no evidence of a change).
``n_pairs``
    number of pairs (the same for every neuron).

Pure numpy/scipy: no torch, no files.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np

from .errors import DataError

STAT_KEYS = ("n_pairs", "mean_diff_sd", "frac_rise", "wilcoxon_p")


def _check(A: np.ndarray, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    A = np.asarray(A, dtype=np.float64)
    if A.ndim == 1:
        A = A[:, None]
    if A.ndim != 2:
        raise DataError(f"activations must be (N, K), got shape {A.shape}")
    pairs = np.asarray(pairs, dtype=np.int64)
    if pairs.size == 0:
        pairs = pairs.reshape(0, 2)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise DataError(f"pairs must be (M, 2) rows of (clean row, artifact row), got shape {pairs.shape}")
    if len(pairs) and (pairs.min() < 0 or pairs.max() >= A.shape[0]):
        raise DataError(f"pairs name rows outside 0..{A.shape[0] - 1}")
    return A, pairs


def paired_effects(A: np.ndarray, pairs: np.ndarray, clean_rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-neuron paired statistics of ``A`` (N, K) over ``pairs`` (M, 2) of (clean, with artifact) rows.

    ``clean_rows`` are the rows whose SD scales the differences (default: the
    distinct clean rows of ``pairs``; the pipeline passes every original image,
    ``ProbeSet.clean_rows``). Returns arrays of shape (K,): ``n_pairs`` (int),
    ``mean_diff_sd``, ``frac_rise``, ``wilcoxon_p`` (float). With no pairs,
    ``n_pairs`` is 0, the effect and ``frac_rise`` 0.0 and the p-value 1.0.
    """
    A, pairs = _check(A, pairs)
    K = A.shape[1]
    M = len(pairs)
    out = {"n_pairs": np.full(K, M, dtype=np.int64)}
    if M == 0:
        out |= {"mean_diff_sd": np.zeros(K), "frac_rise": np.zeros(K), "wilcoxon_p": np.ones(K)}
        return out
    D = A[pairs[:, 1]] - A[pairs[:, 0]]  # (M, K) with − without
    if not np.isfinite(D).all():
        raise DataError("activations of paired rows contain NaN or infinite values (unreadable images?); "
                        "drop those rows (ProbeSet.subset) before computing paired effects")
    clean = np.unique(pairs[:, 0]) if clean_rows is None else np.asarray(clean_rows, dtype=np.int64)
    both = np.unique(pairs.ravel())
    sd = _sd(A[clean]) if len(clean) else np.zeros(K)
    scale = np.where(sd > 0, sd, _sd(A[both]))
    mean_diff = D.mean(axis=0)
    effect = np.where(scale > 0, mean_diff / np.where(scale > 0, scale, 1.0), 0.0)
    out["mean_diff_sd"] = effect.astype(np.float64)
    out["frac_rise"] = (D > 0).mean(axis=0).astype(np.float64)
    out["wilcoxon_p"] = wilcoxon_pvalues(D)
    return out


def _sd(X: np.ndarray) -> np.ndarray:
    """Population SD per column; rounding noise on a constant column (SD below 1e-12 of its
    magnitude) counts as 0."""
    sd = X.std(axis=0)
    return np.where(sd > 1e-12 * np.maximum(1.0, np.abs(X).max(axis=0)), sd, 0.0)


def wilcoxon_pvalues(D: np.ndarray) -> np.ndarray:
    """Two-sided Wilcoxon signed-rank p-value per column of ``D`` (M, K); 1.0 for all-zero columns."""
    from scipy.stats import wilcoxon

    D = np.asarray(D, dtype=np.float64)
    if D.ndim == 1:
        D = D[:, None]
    K = D.shape[1]
    p = np.ones(K)
    nonzero = (D != 0).any(axis=0)
    if not nonzero.any():
        return p
    cols = np.flatnonzero(nonzero)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        if D.shape[0] <= 50:
            # Small samples: scipy picks the exact or the normal method per sample (ties, zeros),
            # but for a whole batch at once; column by column gives each neuron its own choice.
            pv = np.array([wilcoxon(D[:, k], zero_method="wilcox", alternative="two-sided").pvalue
                           for k in cols], dtype=np.float64)
        else:  # normal approximation for every column either way: vectorised
            res = wilcoxon(D[:, cols], axis=0, zero_method="wilcox", alternative="two-sided")
            pv = np.atleast_1d(np.asarray(res.pvalue, dtype=np.float64))
    p[cols] = np.where(np.isfinite(pv), np.clip(pv, 0.0, 1.0), 1.0)
    return p


def paired_effects_by_artifact(A: np.ndarray, pairs: Mapping[str, np.ndarray], artifacts=None,
                               clean_rows: np.ndarray | None = None) -> dict[str, dict[str, np.ndarray]]:
    """:func:`paired_effects` for every artifact that has pairs (only ``artifacts`` when given)."""
    names = [a for a in (artifacts if artifacts is not None else pairs) if a in pairs and len(pairs[a])]
    return {a: paired_effects(A, pairs[a], clean_rows) for a in names}


def neuron_paired(effects: Mapping[str, Mapping[str, np.ndarray]], k: int) -> dict[str, dict[str, float]]:
    """The ``NeuronResult.paired`` record of neuron ``k``: per artifact, plain numbers."""
    return {a: {"n_pairs": int(e["n_pairs"][k]), "mean_diff_sd": float(e["mean_diff_sd"][k]),
                "frac_rise": float(e["frac_rise"][k]), "wilcoxon_p": float(e["wilcoxon_p"][k])}
            for a, e in effects.items()}
