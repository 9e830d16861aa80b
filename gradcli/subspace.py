"""Low-dimensional gradient subspaces: average-gradient (AG) bases.

AG (Wu et al. 2024, §3.2): column c of the basis is the mean normalised gradient
``mean_{x in class c} G(x)`` over the ID training set; the C columns are orthonormalised by
QR so that the reduced gradient ``G(x)·V`` is a projection. The raw class means are kept too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gradcli.errors import BadInputError

METHODS = ("avg", "pca")
RANK_TOLERANCE = 1e-5


@dataclass
class Subspace:
    """A basis V (P, K) float32 with orthonormal columns, plus what it came from."""

    basis: np.ndarray
    method: str
    class_means: np.ndarray | None = None  # (P, C) float32 raw AG columns
    eigenvalues: np.ndarray | None = None  # (K,) for PCA

    @property
    def k(self) -> int:
        return int(self.basis.shape[1])


def check_method(method: str, k: int | None, num_classes: int) -> None:
    """Validate the method and K against the model before any pass over the data."""
    if method == "pca":
        raise BadInputError(
            "--method pca is not available in this version of gradcli; use --method avg"
        )
    if method != "avg":
        raise BadInputError(f"unknown --method '{method}'; choose one of: {', '.join(METHODS)}")
    if k is not None and k not in (num_classes, num_classes - 1):
        raise BadInputError(
            f"the average-gradient subspace's K is fixed by the {num_classes} classes; drop --k"
        )


def average_gradient_basis(
    class_means: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, class_counts: np.ndarray
) -> Subspace:
    """AG basis from per-class mean gradients.

    class_means (C, P) float64 raw mean gradients per class; mean (P,) and scale (P,) the
    normalisation (scale = sqrt(var), or ones without variance scaling). Returns V (P, K)
    float32 with K = rank of the normalised class means: because G is centred on the training
    mean, the class means satisfy sum_c n_c mean_c = 0, so K is C - 1, not C. A QR column
    whose diagonal is at rounding level spans nothing real and is dropped.
    """
    empty = np.flatnonzero(np.asarray(class_counts) == 0)
    if empty.size:
        raise BadInputError(
            f"classes {empty.tolist()[:5]} have no training samples; the average-gradient "
            "subspace needs every class (raise --max-samples or check the labels)"
        )
    normalised = (class_means - mean.double()[None, :]) / scale.double()[None, :]
    columns = normalised.T.contiguous()  # (P, C)
    q, r = torch.linalg.qr(columns, mode="reduced")
    diagonal = torch.diagonal(r)
    keep = diagonal.abs() > RANK_TOLERANCE * diagonal.abs().max()
    # Fix QR's sign ambiguity so each basis vector points along its class mean.
    signs = torch.where(diagonal < 0, -1.0, 1.0).to(q.dtype)
    q = (q * signs[None, :])[:, keep]
    return Subspace(
        basis=q.float().numpy(),
        method="avg",
        class_means=columns.float().numpy(),
    )
