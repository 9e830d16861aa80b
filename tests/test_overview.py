"""What inspect reports: shard status and reconstruction error, against brute force."""

from __future__ import annotations

import numpy as np

from gradcli.overview import shard_status
from gradcli.scores.residual import reconstruction_error


def test_shard_status_matches_a_brute_force_split():
    rng = np.random.default_rng(0)
    for n_chunks, count in ((10, 3), (7, 7), (3, 5), (0, 2)):
        done = rng.random(n_chunks) < 0.6
        status = shard_status(done, count)
        # Shard i owns chunks floor(i·n/count) .. floor((i+1)·n/count) - 1.
        pending: dict[str, list[int]] = {}
        for chunk in range(n_chunks):
            owner = next(i for i in range(count) if chunk < (i + 1) * n_chunks // count)
            if not done[chunk]:
                pending.setdefault(str(owner), []).append(chunk)
        assert status["pending"] == pending
        assert status["complete"] == [i for i in range(count) if str(i) not in pending]
        assert status["count"] == count


def test_reconstruction_error_is_the_relative_residual_outside_the_subspace():
    rng = np.random.default_rng(1)
    basis, _ = np.linalg.qr(rng.normal(size=(50, 6)))  # orthonormal V (P, K)
    g = rng.normal(size=(8, 50))
    g[0] = basis @ rng.normal(size=6)  # inside the subspace: error 0
    z = g @ basis
    want = np.linalg.norm(g - z @ basis.T, axis=1) / np.linalg.norm(g, axis=1)
    got = reconstruction_error(z.astype(np.float32), np.linalg.norm(g, axis=1))
    np.testing.assert_allclose(got, want, atol=1e-3)
    assert got[0] < 1e-3
    assert reconstruction_error(np.zeros((1, 6)), np.zeros(1)).tolist() == [0.0]  # ‖G‖ = 0
