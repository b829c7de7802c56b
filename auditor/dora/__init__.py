"""DORA: find neurons with outlying representations from synthetic images, without labels.

Bykov et al., "DORA: Exploring Outlier Representations in Deep Neural Networks",
TMLR 2023. For every neuron of a layer, images that maximally activate it are
synthesised (s-AMS, :mod:`.generate`); all of them are fed back through the model,
giving A[i, j] = neuron j's value on neuron i's s-AMS (:mod:`.distance`); the
Extreme-Activation distance between neurons and an outlier detector on it
(:mod:`.outliers`) point at neurons whose representations sit far from the rest.
See docs/dora.md.
"""

from .distance import FORMS, ea_distance, layerwise_ea, pairwise_ea, representation_matrix
from .generate import SamsParams, activations_on, generate
from .outliers import METHODS, Outliers, embed_2d, outlier_scores
from .run import run_dora, sams_for_layer
from .transforms import Robustness

__all__ = ["FORMS", "METHODS", "Outliers", "Robustness", "SamsParams", "activations_on", "ea_distance", "embed_2d",
           "generate", "layerwise_ea", "outlier_scores", "pairwise_ea", "representation_matrix", "run_dora",
           "sams_for_layer"]
