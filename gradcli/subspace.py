"""Low-dimensional gradient subspaces: average-gradient (AG) and PCA bases.

AG (Wu et al. 2024, §3.2): column c of the basis is the mean normalised gradient
``mean_{x in class c} G(x)`` over the ID training set; the C columns are orthonormalised by
QR so that the reduced gradient ``G(x)·V`` is a projection. The raw class means are kept too.

PCA: the top-K eigenvectors of ``GᵀG`` (G the N×P matrix of normalised training gradients)
by randomised subspace iteration (Halko, Martinsson & Tropp 2011): ``V ← orth(Gᵀ(G V))``
from a seeded Gaussian start with K + p columns, then a Rayleigh–Ritz step. The passes over
data and store live in :mod:`gradcli.stages`; this module holds the dense linear algebra.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch

from gradcli.errors import BadInputError

METHODS = ("avg", "pca")
RANK_TOLERANCE = 1e-5
WIDE_CHUNK_BYTES = 8 << 20  # float64 chunk of a wide Gram product: cache-sized


@dataclass
class Subspace:
    """A basis V (P, K) float32 with orthonormal columns, plus what it came from."""

    basis: np.ndarray | None  # None when it was written to the store block by block
    method: str
    eigenvalues: np.ndarray | None = None  # (K,) for PCA

    @property
    def k(self) -> int:
        return int(self.basis.shape[1] if self.basis is not None else len(self.eigenvalues))


def check_method(method: str, k: int | None, num_classes: int | None) -> None:
    """Validate the method and K (against the model's classes once they are known, i.e. when
    ``num_classes`` is not None) before any pass over the data."""
    if method not in METHODS:
        raise BadInputError(f"unknown --method '{method}'; choose one of: {', '.join(METHODS)}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral)):
        raise BadInputError(f"--k must be a whole number, not {k!r}")
    if method == "pca":
        if k is None:
            raise BadInputError("--method pca needs --k, the subspace dimension (e.g. --k 50)")
        if k < 1:
            raise BadInputError("--k must be at least 1")
        return
    if k is not None and num_classes is not None and k != num_classes - 1:
        raise BadInputError(
            f"--method avg gives K = C - 1 = {num_classes - 1} (centred class means); drop --k "
            f"or use --method pca --k {k}"
        )


def average_gradient_k_reason(k: int, num_classes: int) -> str:
    """Why the average-gradient subspace has ``k`` dimensions for ``num_classes`` classes."""
    if k == num_classes - 1:
        return (
            f"K = C - 1 = {k}: the {num_classes} class means are centred on the training mean, "
            "so they sum to zero (weighted by class size) and span one dimension fewer"
        )
    return (
        f"K = {k} < C - 1 = {num_classes - 1}: the centred class means are linearly dependent; "
        "directions they do not span were dropped"
    )


def in_order_cholesky(gram: torch.Tensor, tolerance: float = RANK_TOLERANCE) -> torch.Tensor:
    """Cholesky factor of the Gram matrix ``AᵀA`` (C, C) float64 of columns taken in order,
    skipping each column that is dependent on the kept ones before it.

    Returns R (C, C) float64, upper triangular: row j is zero for a skipped column j, and the
    kept rows and columns form the R of QR of the kept columns (positive diagonal), so
    ``A[:, kept] R[kept][:, kept]⁻¹`` is their Q: column j spans column j of A minus its
    part along the kept columns before it. A column is skipped when its residual's norm,
    the pivot ``R[j, j]``, is at most ``tolerance`` times the largest kept one (QR's rank
    rule). That largest pivot depends on what is kept: the first factor is formed against the
    largest column norm (a bound on every pivot), and formed again against its largest pivot
    only while a skipped column would pass the rule (rarely). The pivots are differences of
    squares, so a residual is resolved to about ``sqrt(C·eps)`` of its column's norm, far
    below the tolerance.
    """
    reference = float(torch.diagonal(gram).max().clamp_min(0).sqrt())  # bounds every pivot
    for _ in range(8):
        factor, pivots = _skipping_cholesky(gram, tolerance * reference)
        kept = torch.diagonal(factor) > 0
        if not bool(kept.any()):
            return factor
        reference = float(torch.diagonal(factor).max())
        # Consistent once no skipped column's pivot passes the rule with the largest kept one.
        if not bool((pivots[~kept] > (tolerance * reference) ** 2).any()):
            return factor
        del factor  # two C×C matrices alive at most: the Gram and one factor
    return _skipping_cholesky(gram, tolerance * reference)[0]


def _skipping_cholesky(gram: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-looking Cholesky of ``gram`` (C, C) float64 in column order, in one copy of it,
    leaving out (zero row) each column whose pivot (squared residual norm) is at most
    ``threshold²``. Returns the factor (C, C) and every column's pivot (C,), float64."""
    size = gram.shape[0]
    factor = gram.clone()  # the Schur complement, its rows becoming the factor's
    pivots = torch.zeros(size, dtype=gram.dtype)
    for j in range(size):
        pivot = float(factor[j, j])
        pivots[j] = pivot
        if pivot <= 0 or pivot <= threshold * threshold:
            factor[j, j:] = 0
            continue
        factor[j, j:] /= pivot**0.5
        tail = factor[j, j + 1 :]
        factor[j + 1 :, j + 1 :].addr_(tail, tail, alpha=-1.0)
    return factor.triu_(), pivots


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


def gram_(gram: torch.Tensor, rows: torch.Tensor, wide: bool, row_chunk: int = 1 << 16) -> None:
    """Add ``rowsᵀ rows`` to the float64 (w, w) ``gram``: in float64 when ``wide`` (an
    ill-conditioned block), else float32 chunk products summed in float64."""
    if wide:  # float64 copies of cache-sized chunks, in one reused buffer
        step = max(1, min(row_chunk, WIDE_CHUNK_BYTES // (8 * max(1, rows.shape[1]))))
        buffer = torch.empty(min(step, rows.shape[0]), rows.shape[1], dtype=torch.float64)
        for start in range(0, rows.shape[0], step):
            part = buffer[: min(step, rows.shape[0] - start)]
            part.copy_(rows[start : start + step])
            gram.addmm_(part.T, part)
        return
    for start in range(0, rows.shape[0], row_chunk):
        part = rows[start : start + row_chunk]
        gram += (part.T @ part).double()


def inverse_factor(gram: torch.Tensor) -> torch.Tensor | None:
    """R⁻¹ (w, w) float64 for the Cholesky factor R of ``gram``, or None if it is singular."""
    factor, info = torch.linalg.cholesky_ex(gram, upper=True)
    if int(info) != 0:
        return None
    return torch.linalg.solve_triangular(
        factor, torch.eye(gram.shape[0], dtype=torch.float64), upper=True
    )


def orthonormalise_(
    block: torch.Tensor,
    row_chunk: int = 1 << 16,
    *,
    rounds: int = 2,
    low_copy: torch.Tensor | None = None,
) -> None:
    """Orthonormalise the columns of a tall (P, w) float32 block in place.

    Cholesky-QR applied twice (CholeskyQR2), chunk by chunk so no second P×w array is needed.
    The first Gram matrix is formed in float64 (the block may be ill-conditioned); after one
    round the block is nearly orthonormal, so the second Gram sums float32 chunk products in
    float64, and both triangular solves are applied in float32 (four times faster, and the
    second round removes what the first one's rounding left). A numerically rank-deficient
    block falls back to Householder QR.

    ``rounds=1`` stops after the first round: columns orthonormal to about κ·1e-7, enough for
    an intermediate block of subspace iteration, whose span is all that matters, in half the
    time. ``low_copy`` (P, w), of another dtype, receives the result too, written chunk by
    chunk while it is in cache.
    """
    width = block.shape[1]
    buffer = torch.empty(min(row_chunk, block.shape[0]), width, dtype=block.dtype)
    for round_ in range(rounds):
        gram = torch.zeros(width, width, dtype=torch.float64)
        gram_(gram, block, wide=round_ == 0, row_chunk=row_chunk)
        inverse = inverse_factor(gram)
        if inverse is None:
            q, _ = torch.linalg.qr(block.double())
            block.copy_(q)
            if low_copy is not None:
                low_copy.copy_(block)
            return
        inverse = inverse.to(block.dtype)
        copy = low_copy if round_ == rounds - 1 else None
        for start in range(0, block.shape[0], row_chunk):
            rows = block[start : start + row_chunk]
            product = buffer[: rows.shape[0]]
            torch.mm(rows, inverse, out=product)
            rows.copy_(product)
            if copy is not None:
                copy[start : start + row_chunk].copy_(product)


def ritz_rotation(
    gram: torch.Tensor, k: int, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation (w, k) float64 to the top-k Ritz vectors and their eigenvalues (k,) of
    ``GᵀG / N``, from ``gram = (G V)ᵀ(G V)`` of an orthonormal V; signs fixed so the
    largest-magnitude entry of each column is positive."""
    values, vectors = torch.linalg.eigh(gram / num_samples)
    order = torch.argsort(values, descending=True)[:k]
    rotation = vectors[:, order]
    signs = torch.sign(rotation[rotation.abs().argmax(dim=0), torch.arange(k)])
    rotation = rotation * torch.where(signs == 0, 1.0, signs)[None, :]
    return rotation, values[order].clamp_min(0)


def rayleigh_ritz(
    block: torch.Tensor, gram: torch.Tensor, k: int, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k Ritz vectors and values from ``gram = (G V)ᵀ(G V)`` of an orthonormal block V.

    block (P, w) float32; gram (w, w) float64. Returns the basis (P, k) float32 sorted by
    eigenvalue, descending, and the eigenvalues (k,) float64 of ``GᵀG / N`` (the variance of
    the normalised gradients along each basis vector).
    """
    rotation, values = ritz_rotation(gram, k, num_samples)
    basis = torch.empty(block.shape[0], k)
    rotation32 = rotation.float()  # orthogonal: applying it in float32 loses nothing visible
    for start in range(0, block.shape[0], 1 << 16):
        torch.mm(block[start : start + (1 << 16)], rotation32, out=basis[start : start + (1 << 16)])
    return basis, values
