"""PCA subspace: captured variance against an exact SVD, resume, eigenvalues."""

from __future__ import annotations

import shutil
import textwrap

import numpy as np
import pytest
import torch

from gradcli.grads import LayerGradients, select_parameters
from gradcli.run import Run
from gradcli.stages import pca as pca_stage
from gradcli.stages import pca_blocked as pca_blocked_stage
from gradcli.stages import pca_plan

RESNET_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    class TinyResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(6)
            self.block = Block(6)
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(self.block(torch.relu(self.bn(self.stem(x)))).mean(dim=(2, 3)))

    def make():
        torch.manual_seed(0)
        net = TinyResNet()
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
        return net
    """
)
PREPROCESS = {"input_size": 8, "mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.fixture(scope="module")
def pca_data(tmp_path_factory, tiny):
    return write_colour_blobs(tmp_path_factory.mktemp("pca"), 240, seed=7)


def write_colour_blobs(root, count: int, seed: int):
    """``root`` with the small ResNet's source and ``train.npz``: ``count`` noisy 8×8 images
    of three colours (labels 0, 1, 2 in turn)."""
    (root / "resnet.py").write_text(RESNET_SOURCE)
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], dtype=float)
    x = colours[labels][:, None, None, :] + rng.normal(0, 40, size=(count, 8, 8, 3))
    np.savez(root / "train.npz", x=np.clip(x, 0, 255).astype(np.uint8), y=labels)
    return root


def _exact_normalised_gradients(run: Run, npz) -> torch.Tensor:
    model = run.model
    x = torch.from_numpy(np.load(npz)["x"]).permute(0, 3, 1, 2).float()
    inputs = (x / 255 - 0.5) / 0.25
    selection = select_parameters(model.module)
    g = LayerGradients(model.module, selection)(inputs).double()
    mean = torch.from_numpy(run.store.read("stats/mean")).double()
    var = torch.from_numpy(run.store.read("stats/var")).double()
    return (g - mean) / var.sqrt()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("which", ["tiny-cnn", "tiny-resnet"])
@pytest.mark.parametrize("k", [10, 50])
def test_captured_variance_reaches_099_of_exact(which, k, dtype, pca_data, tiny, tmp_path):
    spec = tiny.model if which == "tiny-cnn" else f"{pca_data / 'resnet.py'}:make"
    weights = str(tiny.weights) if which == "tiny-cnn" else None
    run = Run(tmp_path / "run")
    run.set_model(spec, weights, **PREPROCESS)
    summary = run.extract_subspace(
        f"npz:{pca_data / 'train.npz'}", method="pca", k=k, batch_size=32, iteration_dtype=dtype
    )
    basis = torch.from_numpy(run.store.read("subspace/basis")).double()
    assert basis.shape[1] == k
    torch.testing.assert_close(
        basis.T @ basis, torch.eye(k, dtype=torch.float64), atol=1e-4, rtol=0
    )
    g = _exact_normalised_gradients(run, pca_data / "train.npz")
    _, singular, vt = torch.linalg.svd(g, full_matrices=False)
    exact = (singular[:k] ** 2).sum()
    captured = ((g @ basis) ** 2).sum()
    assert captured / exact >= 0.99, float(captured / exact)
    values = run.store.read("subspace/eigenvalues")
    assert np.all(np.diff(values) <= 1e-9)  # sorted, descending
    np.testing.assert_allclose(values[:3], (singular[:3] ** 2 / len(g)).numpy(), rtol=1e-3)
    assert 0 < summary["explained_variance"] <= 1 + 1e-6


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_interrupted_pca_resumes_to_the_same_basis(dtype, pca_data, tiny, tmp_path, monkeypatch):
    """Also from an intermediate block that bf16 iterations save as its bf16 copy only."""
    data = f"npz:{pca_data / 'train.npz'}"
    options = {"method": "pca", "k": 5, "batch_size": 16, "iterations": 3, "checkpoint_every": 4}
    options["iteration_dtype"] = dtype

    def fresh(path):
        run = Run(path)
        run.set_model(tiny.model, str(tiny.weights), **PREPROCESS)
        return run

    clean = fresh(tmp_path / "clean")
    clean.extract_subspace(data, **options)
    original = LayerGradients.capture
    # 15 batches per pass: the statistics pass, then PCA; stop in PCA iteration 2, batch 10.
    stop_at = {"calls": 0, "limit": 15 + 15 + 10 + 1}

    def interrupt(self, x):
        stop_at["calls"] += 1
        if stop_at["calls"] == stop_at["limit"]:
            raise KeyboardInterrupt
        return original(self, x)

    monkeypatch.setattr(LayerGradients, "capture", interrupt)
    killed = fresh(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        killed.extract_subspace(data, **options)
    state = killed.store.group_attrs("subspace/state")
    assert state["iteration"] == 1 and state["cursor"] == 8  # last checkpoint in iteration 2
    saved = killed.store.read("subspace/state/V1")
    assert saved.dtype == (np.int16 if dtype == "bfloat16" else np.float32)
    monkeypatch.setattr(LayerGradients, "capture", original)
    # A copy whose state names the wrong partial sum (as a kill between a checkpoint's array
    # and its state once left): the sum's own record does not match, so it is not used.
    shutil.copytree(tmp_path / "killed", tmp_path / "misnamed")
    misnamed = fresh(tmp_path / "misnamed")
    misnamed.store.set_attrs("subspace/state", slot=1 - state["slot"])
    assert (
        pca_stage._matching_partial(misnamed, "subspace/state", 1, 8) is not None
    )  # the other slot
    misnamed.store.delete(f"subspace/state/partial{state['slot']}")
    assert pca_stage._matching_partial(misnamed, "subspace/state", 1, 8) is None
    for path in (tmp_path / "killed", tmp_path / "misnamed"):
        resumed = fresh(path)
        resumed.extract_subspace(data, **options)
        np.testing.assert_array_equal(
            resumed.store.read("subspace/basis"), clean.store.read("subspace/basis")
        )
        np.testing.assert_array_equal(
            resumed.store.read("subspace/eigenvalues"), clean.store.read("subspace/eigenvalues")
        )
        assert not resumed.store.has("subspace/state")


def test_kept_batch_and_second_sweep_give_the_same_basis(pca_data, tiny, tmp_path, monkeypatch):
    """Keeping a batch's normalised gradients for Gᵀ U changes the speed, not the result."""
    spec = f"npz:{pca_data / 'train.npz'}"
    results, modes = {}, []
    original = pca_stage._pca_batch

    def recorded(self, *args):
        modes.append(original(self, *args))
        return modes[-1] if len(modes) == 1 else (modes[-1][0], False)

    monkeypatch.setattr(pca_stage, "_pca_batch", recorded)
    for keep in (True, False):
        run = Run(tmp_path / f"run-{keep}")
        run.set_model(f"{pca_data / 'resnet.py'}:make", **PREPROCESS)
        run.extract_subspace(spec, method="pca", k=10, batch_size=32, iterations=2)
        assert run.store.group_attrs("subspace")["k"] == 10
        results[keep] = (
            run.store.read("subspace/basis").astype(np.float64),
            run.store.read("subspace/eigenvalues"),
        )
    assert modes == [(32, True), (32, True)]  # the budget allows keeping; the second run declines
    (kept_basis, kept_values), (swept_basis, swept_values) = results[True], results[False]
    np.testing.assert_allclose(kept_values, swept_values, rtol=1e-5)
    # Same subspace: the projector of one onto the other is the identity on it.
    overlap = kept_basis.T @ swept_basis
    np.testing.assert_allclose(np.abs(np.diag(overlap)), 1.0, atol=1e-4)


def test_row_block_form_when_the_block_exceeds_the_budget(pca_data, tmp_path, monkeypatch):
    """A budget too small for the P×(K+p) block switches to layer blocks: same quality bar
    against the exact SVD, eigenvalues as the one-pass form, and a killed run resumes to
    the identical basis."""

    spec = f"npz:{pca_data / 'train.npz'}"
    options = {"method": "pca", "k": 5, "oversample": 5, "batch_size": 32, "iterations": 4}

    def extract(path, budget=None):
        run = Run(path, memory_budget=budget) if budget else Run(path)
        run.set_model(f"{pca_data / 'resnet.py'}:make", **PREPROCESS)
        run.extract_subspace(spec, **options)
        return run

    one_pass = extract(tmp_path / "one-pass")
    budget = 90_000  # the block, accumulator and normalisation need 92 kB
    blocked = extract(tmp_path / "blocked", budget)
    assert len(pca_plan.pca_blocks(blocked, blocked.selection, 10, 240)) >= 3
    basis = torch.from_numpy(blocked.store.read("subspace/basis")).double()
    torch.testing.assert_close(
        basis.T @ basis, torch.eye(5, dtype=torch.float64), atol=1e-4, rtol=0
    )
    g = _exact_normalised_gradients(blocked, pca_data / "train.npz")
    _, singular, _ = torch.linalg.svd(g, full_matrices=False)
    captured = ((g @ basis) ** 2).sum() / (singular[:5] ** 2).sum()
    assert captured >= 0.99, float(captured)
    values = blocked.store.read("subspace/eigenvalues")
    np.testing.assert_allclose(values[:3], (singular[:3] ** 2 / len(g)).numpy(), rtol=1e-3)
    # Other random starts (per block): the near-degenerate tail agrees to within 1%.
    np.testing.assert_allclose(values, one_pass.store.read("subspace/eigenvalues"), rtol=1e-2)

    calls = {"n": 0}
    original = pca_blocked_stage._blocked_pass

    def killed_on_the_seventh_pass(self, *args):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(pca_blocked_stage, "_blocked_pass", killed_on_the_seventh_pass)
    with pytest.raises(KeyboardInterrupt):
        extract(tmp_path / "resumed", budget)
    monkeypatch.setattr(pca_blocked_stage, "_blocked_pass", original)
    resumed = extract(tmp_path / "resumed", budget)
    np.testing.assert_array_equal(
        resumed.store.read("subspace/basis"), blocked.store.read("subspace/basis")
    )
    assert pca_plan.pca_plan(blocked, blocked.selection, 10, 240, "float32").blocked
