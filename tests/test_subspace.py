"""Subspace linear algebra and option checks against direct computations (the AG basis: in
test_ag_basis.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradcli.errors import BadInputError
from gradcli.subspace import (
    check_method,
    orthonormalise_,
    pca_width,
    rayleigh_ritz,
)


def test_method_checks():
    check_method("avg", None, 10)
    check_method("avg", 9, 10)
    check_method("pca", 50, 10)
    with pytest.raises(BadInputError, match="needs --k"):
        check_method("pca", None, 10)
    for k in (5, 10, 20):  # AG cannot honour any K but C - 1 (C was accepted before)
        with pytest.raises(BadInputError) as refused:
            check_method("avg", k, 10)
        assert str(refused.value) == (
            f"--method avg gives K = C - 1 = 9 (centred class means); drop --k or use "
            f"--method pca --k {k}"
        )
    check_method("avg", 7, None)  # the classes not known yet: checked again once they are
    with pytest.raises(BadInputError, match="unknown --method"):
        check_method("svd", None, 10)


def test_orthonormalise_keeps_the_span():
    torch.manual_seed(0)
    block = torch.randn(5000, 12) @ torch.diag(torch.logspace(0, 4, 12))  # ill-conditioned
    original = block.double().clone()
    orthonormalise_(block, row_chunk=700)
    q = block.double()
    torch.testing.assert_close(q.T @ q, torch.eye(12, dtype=torch.float64), atol=1e-5, rtol=0)
    residual = original - q @ (q.T @ original)
    assert residual.norm() / original.norm() < 1e-5


def test_one_round_keeps_the_span_and_fills_the_low_copy():
    """An intermediate PCA block: one Cholesky-QR round, nearly orthonormal, same span, and
    its bf16 copy written alongside equals the block rounded."""
    torch.manual_seed(1)
    block = torch.randn(5000, 12) @ torch.diag(torch.logspace(0, 3, 12))
    original = block.double().clone()
    low = torch.empty(5000, 12, dtype=torch.bfloat16)
    orthonormalise_(block, row_chunk=700, rounds=1, low_copy=low)
    q = block.double()
    torch.testing.assert_close(q.T @ q, torch.eye(12, dtype=torch.float64), atol=1e-3, rtol=0)
    projector = torch.linalg.pinv(q) @ original  # least-squares fit of the original in span(q)
    residual = original - q @ projector
    assert residual.norm() / original.norm() < 1e-5
    assert torch.equal(low, block.to(torch.bfloat16))
    twice = original.float().clone()
    orthonormalise_(twice, row_chunk=700)
    assert (twice.double().T @ twice.double() - torch.eye(12)).abs().max() < 1e-5


def test_rayleigh_ritz_recovers_eigenpairs():
    rng = np.random.default_rng(1)
    g = torch.from_numpy(rng.normal(size=(200, 30)) @ np.diag(np.linspace(5, 0.1, 30)))
    exact_values, exact_vectors = torch.linalg.eigh(g.T @ g / 200)
    top = exact_vectors[:, -8:].flip(1)
    # A block spanning the top-8 eigenvectors plus 4 other directions, scrambled.
    block, _ = torch.linalg.qr(
        torch.cat([top, exact_vectors[:, :4]], dim=1) @ torch.randn(12, 12, dtype=torch.float64)
    )
    u = g @ block
    basis, values = rayleigh_ritz(block.float(), u.T @ u, 5, 200)
    np.testing.assert_allclose(values.numpy(), exact_values.flip(0)[:5].numpy(), rtol=1e-5)
    overlap = (basis.double().T @ top[:, :5]).abs()
    torch.testing.assert_close(overlap, torch.eye(5, dtype=torch.float64), atol=1e-4, rtol=0)


def test_pca_width_limits():
    assert pca_width(10, 10, 1000, 500) == 20
    assert pca_width(10, 10, 1000, 15) == 14  # rank of centred G is at most N - 1
    with pytest.raises(BadInputError, match="exceeds the rank"):
        pca_width(50, 10, 40, 500)
