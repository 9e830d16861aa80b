"""Scores from the part of the gradient the subspace does not capture: free with the embedding."""

from __future__ import annotations

import numpy as np

from gradcli.errors import BadInputError
from gradcli.scores.base import Detector, Embedding, Readout


def reconstruction_error(z: np.ndarray, gnorm: np.ndarray) -> np.ndarray:
    """(N,) float64 relative error ``sqrt(1 − ‖z‖²/‖G‖²)`` of reduced gradients z (N, K) with
    ‖G‖ (N,); 0 where ‖G‖ is 0 (nothing to reconstruct)."""
    total = np.square(np.asarray(gnorm, dtype=np.float64))
    captured = np.square(np.asarray(z, dtype=np.float64)).sum(axis=1)
    ratio = np.divide(captured, total, out=np.ones_like(total), where=total > 0)
    return np.sqrt(np.clip(1.0 - ratio, 0.0, None))


def _gnorm(data: Embedding, method: str) -> np.ndarray:
    if data.gnorm is None:
        raise BadInputError(
            f"{method} needs ‖G(x)‖ of each sample, which {data.name} lacks; re-embed it"
        )
    return np.asarray(data.gnorm, dtype=np.float64)


class Residual(Detector):
    """Minus the relative reconstruction error of the normalised gradient in the subspace.

    ``-sqrt(1 - ‖z‖² / ‖G(x)‖²)`` with ``z = G(x)·V`` and V orthonormal, so
    ``‖G - G V Vᵀ‖ / ‖G‖`` for each sample. Wu et al. (TPAMI 2024, Tables 2 and 8) measure this
    error as small for ID data and large for OOD data; the relative form measures where G
    points, not how large it is (its size is what ``gnorm`` scores), so that the absolute size
    of a sample's gradient does not decide its residual. Nothing to fit.
    """

    name = "residual"
    needs_fit = False
    kinds = ("grad",)

    def _score(self, data: Embedding, readout: Readout | None) -> np.ndarray:
        return -reconstruction_error(data.z, _gnorm(data, self.name))


class GradientNorm(Detector):
    """``−‖G(x)‖``, minus the norm of the whole normalised energy gradient (higher = more ID).

    ``G(x) = (g(x) − M) / sqrt(var)`` is centred on the ID training mean and scaled by the ID
    training spread, so ``‖G(x)‖`` is a diagonal Mahalanobis distance of the energy gradient
    from the training gradients: small for ID data, large for OOD data. It therefore enters
    with a minus sign, unlike GradNorm (Huang, Geng & Li, NeurIPS 2021), whose raw
    KL-to-uniform gradient norm is larger for ID data. Wu et al. (TPAMI 2024) study the same
    normalised gradients. Nothing to fit.
    """

    name = "gnorm"
    needs_fit = False
    kinds = ("grad",)

    def _score(self, data: Embedding, readout: Readout | None) -> np.ndarray:
        return -_gnorm(data, self.name)
