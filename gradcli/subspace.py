"""Low-dimensional gradient subspaces: average-gradient (AG) and PCA bases.

AG (Wu et al. 2024, §3.2): column c of the basis is the mean normalised gradient
``mean_{x in class c} G(x)`` over the ID training set; the C columns are orthonormalised by
QR so that the reduced gradient ``G(x)·V`` is a projection. The raw class means are kept too.

PCA: the top-K eigenvectors of ``GᵀG`` (G the N×P matrix of normalised training gradients)
by randomised subspace iteration (Halko, Martinsson & Tropp 2011): ``V ← orth(Gᵀ(G V))``
from a seeded Gaussian start with K + p columns, then a Rayleigh–Ritz step. The data passes
live in :mod:`gradcli.run`; this module holds the dense linear algebra.
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
        if k is None:
            raise BadInputError("--method pca needs --k, the subspace dimension (e.g. --k 50)")
        if k < 1:
            raise BadInputError("--k must be at least 1")
        return
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


def pca_width(k: int, oversample: int, num_params: int, num_samples: int) -> int:
    """Columns of the iteration block: K + p, limited by the rank of G (≤ N - 1 and ≤ P)."""
    rank = min(num_params, num_samples - 1)
    if k > rank:
        raise BadInputError(
            f"--k {k} exceeds the rank of the training gradients (at most {rank}: "
            f"{num_samples} samples, {num_params} parameters); lower --k or add samples"
        )
    if oversample < 0:
        raise BadInputError("--oversample must be at least 0")
    return min(k + oversample, rank)


def random_start(num_params: int, width: int, seed: int) -> torch.Tensor:
    """Seeded Gaussian (P, width) start block, orthonormalised; float32."""
    generator = torch.Generator().manual_seed(seed)
    block = torch.randn(num_params, width, generator=generator)
    orthonormalise_(block)
    return block


def orthonormalise_(block: torch.Tensor, row_chunk: int = 1 << 18) -> None:
    """Orthonormalise the columns of a tall (P, w) float32 block in place.

    Cholesky-QR applied twice (CholeskyQR2): the Gram matrix is formed in float64 over row
    chunks and the triangular solve runs chunk by chunk, so no second P×w array is needed.
    A numerically rank-deficient block falls back to Householder QR.
    """
    for _ in range(2):
        gram = torch.zeros(block.shape[1], block.shape[1], dtype=torch.float64)
        for start in range(0, block.shape[0], row_chunk):
            rows = block[start : start + row_chunk].double()
            gram += rows.T @ rows
        factor, info = torch.linalg.cholesky_ex(gram, upper=True)
        if int(info) != 0:
            q, _ = torch.linalg.qr(block.double())
            block.copy_(q)
            return
        inverse = torch.linalg.solve_triangular(
            factor, torch.eye(block.shape[1], dtype=torch.float64), upper=True
        )
        for start in range(0, block.shape[0], row_chunk):
            rows = block[start : start + row_chunk]
            rows.copy_((rows.double() @ inverse).float())


def rayleigh_ritz(
    block: torch.Tensor, gram: torch.Tensor, k: int, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k Ritz vectors and values from ``gram = (G V)ᵀ(G V)`` of an orthonormal block V.

    block (P, w) float32; gram (w, w) float64. Returns the basis (P, k) float32 sorted by
    eigenvalue, descending, and the eigenvalues (k,) float64 of ``GᵀG / N`` (the variance of
    the normalised gradients along each basis vector).
    """
    values, vectors = torch.linalg.eigh(gram / num_samples)
    order = torch.argsort(values, descending=True)[:k]
    rotation = vectors[:, order]
    # Fix the sign of each eigenvector: largest-magnitude entry of the rotation positive.
    signs = torch.sign(rotation[rotation.abs().argmax(dim=0), torch.arange(k)])
    rotation = rotation * torch.where(signs == 0, 1.0, signs)[None, :]
    basis = torch.empty(block.shape[0], k)
    for start in range(0, block.shape[0], 1 << 18):
        basis[start : start + (1 << 18)] = (
            block[start : start + (1 << 18)].double() @ rotation
        ).float()
    return basis, values[order].clamp_min(0)
