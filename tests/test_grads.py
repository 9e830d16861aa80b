"""The gradient engine against a one-sample-at-a-time autograd loop and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradcli.errors import BadInputError
from gradcli.grads import (
    EnergyGradients,
    GradientStatistics,
    Projector,
    energy,
    sanitise_variance,
    select_parameters,
)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.block = Block(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.block(torch.relu(self.bn(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


def loop_gradients(model: nn.Module, x: torch.Tensor, names) -> torch.Tensor:
    """Reference: one backward pass per sample, flattened in named_parameters order."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        energy(model(x[i : i + 1]))[0].backward()
        rows.append(torch.cat([params[n].grad.reshape(-1) for n in names]))
    return torch.stack(rows)


def _randomise_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)


@pytest.mark.parametrize("model_cls", [SmallCNN, TinyResNet])
def test_per_sample_gradients_match_loop(model_cls):
    torch.manual_seed(0)
    model = model_cls().eval()
    _randomise_bn(model)
    x = torch.randn(7, 3, 8, 8)
    selection = select_parameters(model)
    got = EnergyGradients(model, selection)(x)
    want = loop_gradients(model, x, selection.names)
    assert got.shape == (7, selection.size)
    rel = (got - want).abs().max() / want.abs().max()
    assert rel < 1e-4


def test_parameter_globs_select_in_model_order():
    model = TinyResNet()
    selection = select_parameters(model, ["fc.*", "block.bn2.*"])
    assert selection.names == ("block.bn2.weight", "block.bn2.bias", "fc.weight", "fc.bias")
    assert selection.size == 8 + 8 + 32 + 4
    x = torch.randn(3, 3, 8, 8)
    got = EnergyGradients(model.eval(), selection)(x)
    want = loop_gradients(model, x, selection.names)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_glob_matching_nothing_is_an_error():
    with pytest.raises(BadInputError, match="matches no parameter"):
        select_parameters(TinyResNet(), ["layer9.*"])


def test_statistics_match_numpy_with_class_sums():
    rng = np.random.default_rng(0)
    g = rng.normal(3.0, 2.0, size=(50, 6)).astype(np.float32)
    labels = rng.integers(0, 3, size=50)
    stats = GradientStatistics(6, 3)
    for start in range(0, 50, 13):  # uneven batches exercise the merge
        stats.update(
            torch.from_numpy(g[start : start + 13]), torch.from_numpy(labels[start : start + 13])
        )
    np.testing.assert_allclose(stats.mean.numpy(), g.astype(np.float64).mean(0), rtol=1e-10)
    np.testing.assert_allclose(stats.variance().numpy(), g.astype(np.float64).var(0), rtol=1e-9)
    for c in range(3):
        np.testing.assert_allclose(
            stats.class_means()[c].numpy(), g[labels == c].astype(np.float64).mean(0), rtol=1e-9
        )


def test_sanitise_variance_replaces_zero_and_nonfinite():
    var = torch.tensor([0.5, 0.0, float("nan"), 2.0, float("inf")], dtype=torch.float64)
    fixed, count = sanitise_variance(var)
    assert count == 3
    assert fixed.tolist() == [0.5, 2.0, 2.0, 2.0, 2.0]


def test_projector_equals_explicit_normalised_product():
    rng = np.random.default_rng(1)
    g = torch.from_numpy(rng.normal(size=(9, 40)).astype(np.float32))
    mean = torch.from_numpy(rng.normal(size=40).astype(np.float32))
    scale = torch.from_numpy(rng.uniform(0.5, 2, size=40).astype(np.float32))
    basis, _ = torch.linalg.qr(torch.randn(40, 5))
    z, gnorm = Projector(mean, scale, basis)(g)
    normalised = ((g - mean) / scale).double()
    torch.testing.assert_close(z.double(), normalised @ basis.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gnorm.double(), normalised.norm(dim=1), rtol=1e-5, atol=1e-6)
