"""The representation matrix A and the Extreme-Activation (EA) distance, vectorised.

``A[i, j]`` = neuron j's value (the audit's reduction) on neuron i's s-AMS, averaged
over i's signals. Row i is how the whole layer responds to what neuron i likes.

Two forms of the EA distance (docs/dora.md):

* ``pairwise`` (the DORA paper): for neurons q and m, with a = (A[q,q], A[q,m]) and
  b = (A[m,q], A[m,m]), d(q, m) = sqrt((1 − cos(a, b)) / 2).
* ``layerwise`` (the reference package): d(q, m) = sqrt((1 − cos(A[q,:], A[m,:])) / 2).

Both lie in [0, 1], are symmetric and are 0 on the diagonal. Where a vector is all
zeros (a neuron that never activates) its cosine is undefined: it is taken as 0, so
the distance is sqrt(1/2), and such neurons are reported.
"""

from __future__ import annotations

import numpy as np

FORMS = ("pairwise", "layerwise")


def representation_matrix(values: np.ndarray, n_neurons: int, signals: int) -> np.ndarray:
    """(K·S, K) values on the s-AMS (neuron-major, signal-minor) -> A (K, K), averaged over signals."""
    values = np.asarray(values, dtype=np.float64)
    return values.reshape(n_neurons, signals, values.shape[1]).mean(axis=1)


def _to_distance(cos: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.clip((1.0 - cos) / 2.0, 0.0, 1.0))
    np.fill_diagonal(d, 0.0)
    return (d + d.T) / 2.0  # exact symmetry despite rounding


def pairwise_ea(A: np.ndarray) -> np.ndarray:
    """The paper's EA distance for every pair (q, m), from the 2×2 sub-matrix of q and m."""
    A = np.asarray(A, dtype=np.float64)
    d = np.diag(A)
    num = d[:, None] * A.T + A * d[None, :]  # A[q,q]·A[m,q] + A[q,m]·A[m,m]
    na = np.sqrt(d[:, None] ** 2 + A ** 2)  # |(A[q,q], A[q,m])|
    nb = np.sqrt(A.T ** 2 + d[None, :] ** 2)  # |(A[m,q], A[m,m])|
    den = na * nb
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return _to_distance(cos)


def layerwise_ea(A: np.ndarray) -> np.ndarray:
    """The reference package's EA distance: cosine between whole rows of A."""
    A = np.asarray(A, dtype=np.float64)
    norms = np.linalg.norm(A, axis=1)
    unit = A / np.where(norms > 0, norms, 1.0)[:, None]
    cos = unit @ unit.T
    cos[norms == 0, :] = 0.0
    cos[:, norms == 0] = 0.0
    return _to_distance(cos)


def ea_distance(A: np.ndarray, form: str = "pairwise") -> np.ndarray:
    if form == "pairwise":
        return pairwise_ea(A)
    if form == "layerwise":
        return layerwise_ea(A)
    from ..errors import ConfigError

    raise ConfigError(f"dora distance must be one of {list(FORMS)}, got {form!r}")
