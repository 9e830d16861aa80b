"""The Python API: stored reduced gradients against an independent computation."""

from __future__ import annotations

import numpy as np
import torch

from gradcli.grads import energy
from gradcli.models import load_model
from gradcli.run import Run


def test_embedding_equals_normalised_projected_loop_gradients(tiny, tmp_path):
    run = Run(tmp_path / "run")
    run.set_model(tiny.model, str(tiny.weights), input_size=8, mean=[0.5] * 3, std=[0.25] * 3)
    run.extract_subspace(tiny.train, batch_size=16)
    name = run.embed(tiny.test, batch_size=7, chunk_rows=10)
    stored = run.load_embedding(name)

    model = load_model(tiny.model, str(tiny.weights), input_size=8, mean=[0.5] * 3, std=[0.25] * 3)
    module = model.module
    x = np.load(tiny.root / "test.npz")["x"]
    inputs = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    rows = []
    for i in range(len(inputs)):  # the reference: one backward pass per sample
        module.zero_grad()
        energy(module(inputs[i : i + 1]))[0].backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in module.parameters()]).double())
    g = torch.stack(rows).numpy()

    train = np.load(tiny.root / "train.npz")["x"]
    train_inputs = (torch.from_numpy(train).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    train_rows = []
    for i in range(len(train_inputs)):
        module.zero_grad()
        energy(module(train_inputs[i : i + 1]))[0].backward()
        train_rows.append(torch.cat([p.grad.reshape(-1) for p in module.parameters()]).double())
    g_train = torch.stack(train_rows).numpy()
    mean, var = g_train.mean(0), g_train.var(0)
    var = np.where(var > 0, var, var.max())  # zero variances take the largest one (DESIGN §2)
    np.testing.assert_allclose(run.store.read("stats/mean"), mean, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(run.store.read("stats/var"), var, rtol=1e-3, atol=1e-9)

    basis = run.store.read("subspace/basis").astype(np.float64)
    normalised = (g - mean) / np.sqrt(var)
    want = normalised @ basis
    scale = np.abs(want).max()
    assert np.abs(stored["grad"] - want).max() / scale < 1e-4
    np.testing.assert_allclose(stored["gnorm"], np.linalg.norm(normalised, axis=1), rtol=1e-4)
    labels = np.load(tiny.root / "train.npz")["y"]
    class_means = np.stack(
        [((g_train[labels == c] - mean) / np.sqrt(var)).mean(0) for c in range(3)]
    )
    # The centred class means sum to zero (weighted by class size): they span C - 1 dimensions.
    assert basis.shape == (g.shape[1], 2)
    q, _ = np.linalg.qr(class_means[:2].T)
    np.testing.assert_allclose(np.abs(q.T @ basis), np.eye(2), atol=1e-4)
