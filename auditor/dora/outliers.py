"""Outlier scores on the EA distance matrix, and a 2-D map of the layer.

Default: scikit-learn's LocalOutlierFactor on the precomputed distances, with
``n_neighbors`` = min(20, (K − 1) // 2) (scikit-learn's default of 20, capped at half
the layer: when the neighbourhood spans nearly every neuron, every neuron's
neighbourhood is the whole layer and LOF can single nothing out) and its own ``auto``
threshold (a neuron is an outlier when its local outlier factor exceeds 1.5, i.e.
its neighbourhood is 1.5× sparser than its neighbours' are). Why LOF: it works on
the distance matrix itself (no embedding, no extra randomness), it is deterministic,
and it compares each neuron with its *own* neighbourhood, so a layer whose normal
neurons form clusters of different tightness does not turn a whole loose cluster
into outliers. Alternatives: ``iforest`` (IsolationForest on each neuron's row of
distances, seeded; ``auto`` threshold) and ``knn`` (mean distance to the k nearest
neurons; outliers beyond the median + 3.5 robust SDs, MAD-based). With
``contamination`` set, the top share of neurons by score are the outliers instead.

The 2-D map is metric MDS (scikit-learn, seeded) of the same distances.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

METHODS = ("lof", "iforest", "knn")
LOF_THRESHOLD = 1.5  # scikit-learn's contamination="auto" offset
KNN_ROBUST_Z = 3.5


@dataclass(frozen=True)
class Outliers:
    scores: np.ndarray  # (K,) higher = more outlying
    outlier: np.ndarray  # (K,) bool
    rank: np.ndarray  # (K,) 1 = most outlying (ties broken by neuron index)
    method: str
    n_neighbors: int
    threshold: float | None  # on the score, where the method has one


def outlier_scores(D: np.ndarray, method: str = "lof", n_neighbors: int | None = None,
                   contamination: float | None = None, seed: int = 0) -> Outliers:
    D = np.asarray(D, dtype=np.float64)
    K = D.shape[0]
    if method not in METHODS:
        raise ConfigError(f"dora outliers must be one of {list(METHODS)}, got {method!r}")
    if contamination is not None and not 0.0 < contamination <= 0.5:
        raise ConfigError(f"dora contamination must be in (0, 0.5], got {contamination!r}")
    if K < 3:
        raise ConfigError(f"DORA needs a layer with at least 3 neurons, got {K}")
    k = min(n_neighbors, K - 1) if n_neighbors else min(20, max(1, (K - 1) // 2))
    threshold: float | None = None
    if method == "lof":
        from sklearn.neighbors import LocalOutlierFactor

        lof = LocalOutlierFactor(n_neighbors=k, metric="precomputed")
        labels = lof.fit_predict(D)
        scores = -lof.negative_outlier_factor_
        outlier = labels == -1
        threshold = LOF_THRESHOLD
    elif method == "iforest":
        from sklearn.ensemble import IsolationForest

        forest = IsolationForest(random_state=seed).fit(D)
        scores = -forest.score_samples(D)
        outlier = forest.predict(D) == -1
        threshold = float(-forest.offset_)
    else:
        near = np.sort(D + np.diag(np.full(K, np.inf)), axis=1)[:, :k]
        scores = near.mean(axis=1)
        med = float(np.median(scores))
        mad = float(np.median(np.abs(scores - med))) * 1.4826
        threshold = med + KNN_ROBUST_Z * mad
        outlier = scores > threshold if mad > 0 else np.zeros(K, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(K), -scores))
    rank = np.empty(K, dtype=np.int64)
    rank[order] = np.arange(1, K + 1)
    if contamination is not None:
        n_out = max(1, int(round(contamination * K)))
        outlier = rank <= n_out
        threshold = None
    return Outliers(scores=scores, outlier=np.asarray(outlier, dtype=bool), rank=rank, method=method,
                    n_neighbors=k, threshold=threshold)


def embed_2d(D: np.ndarray, seed: int = 0) -> np.ndarray:
    """(K, 2) metric-MDS coordinates of the precomputed distances."""
    import inspect

    from sklearn.manifold import MDS

    params = inspect.signature(MDS).parameters
    kw: dict = {"n_components": 2, "random_state": seed, "n_init": 1, "normalized_stress": "auto"}
    if "metric_mds" in params:  # scikit-learn >= 1.8: `metric` names the dissimilarity
        kw.update(metric="precomputed", metric_mds=True)
    else:
        kw.update(dissimilarity="precomputed", metric=True)
    if "init" in params:
        kw["init"] = "classical_mds"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        mds = MDS(**kw)
        return np.asarray(mds.fit_transform(np.asarray(D, dtype=np.float64)), dtype=np.float64)
