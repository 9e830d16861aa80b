"""Feature + gradient ensemble score."""

from __future__ import annotations

import numbers

import numpy as np
from numpy.typing import ArrayLike

from gradcli.errors import BadInputError


def ensemble_scores(
    feature_scores: ArrayLike, gradient_scores: ArrayLike, alpha: float = 1.0
) -> np.ndarray:
    """``S_feature + α·S_gradient`` (N,) float64 (Wu et al., TPAMI 2024).

    Both inputs are (N,) scores of the same samples in the same order, higher = ID.
    """
    feature = np.asarray(feature_scores, dtype=np.float64)
    gradient = np.asarray(gradient_scores, dtype=np.float64)
    if feature.ndim != 1 or gradient.ndim != 1:
        raise BadInputError(
            f"ensemble needs two 1-D score arrays, got shapes {feature.shape} and {gradient.shape}"
        )
    if feature.shape != gradient.shape:
        raise BadInputError(
            f"ensemble needs scores of the same samples: {feature.size} feature scores vs "
            f"{gradient.size} gradient scores (score both embeddings of one dataset)"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not np.isfinite(alpha):
        raise BadInputError(f"ensemble --alpha must be a finite number, got {alpha!r}")
    for which, scores in (("feature", feature), ("gradient", gradient)):
        if not np.isfinite(scores).all():
            raise BadInputError(f"ensemble: the {which} scores contain NaN/Inf: rescore them")
    return feature + float(alpha) * gradient
