"""MaxLogit, GradNorm, ViM and ODIN against direct NumPy / one-sample autograd computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradcli.errors import BadInputError, StaleStoreError
from gradcli.head import GradientHead
from gradcli.scores import ODIN, Embedding, GradNorm, MaxLogit, Readout, ViM
from gradcli.scores.baselines import vim_default_dim

C, D = 4, 6


@pytest.fixture
def linear_features():
    """Non-negative features, a last Linear layer (C × D, bias) and its readout."""
    rng = np.random.default_rng(7)
    layer = nn.Linear(D, C).double()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(rng.normal(0, 1, (C, D))))
        layer.bias.copy_(torch.from_numpy(rng.normal(0, 1, C)))
    weight = layer.weight.detach().numpy()
    bias = layer.bias.detach().numpy()

    def make(n: int, shift: float) -> Embedding:
        z = np.maximum(rng.normal(shift, 1.0, (n, D)), 0).astype(np.float32)
        logits = z.astype(np.float64) @ weight.T + bias
        return Embedding(z=z, logits=logits, labels=rng.integers(0, C, n))

    return make(80, 0.6), make(30, 1.2), layer, Readout.from_linear(weight, bias)


def test_maxlogit_is_the_largest_logit(linear_features):
    train, test, layer, readout = linear_features
    logits = test.z.astype(np.float64) @ readout.weight.T + readout.bias
    for source in (readout, None):  # the readout's logits and the stored ones agree
        scores = MaxLogit().fit(train, source).score(test, source)
        np.testing.assert_allclose(scores, logits.max(axis=1), rtol=1e-5)
    head = GradientHead(D, C).eval()  # on gradients it reads the head's logits
    with torch.no_grad():
        want = head(torch.from_numpy(test.z)).double().amax(dim=1).numpy()
    np.testing.assert_allclose(
        MaxLogit().score(test, Readout.from_head(head)), want, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_gradnorm_matches_autograd_of_the_kl_per_sample(linear_features, temperature):
    train, test, layer, readout = linear_features
    expected = []
    for h in torch.from_numpy(test.z.astype(np.float64)):  # the reference: one backward each
        layer.zero_grad()
        log_p = torch.log_softmax(layer(h[None]) / temperature, dim=1)
        uniform = torch.full_like(log_p, 1.0 / C)
        kl = (uniform * (uniform.log() - log_p)).sum()
        kl.backward()
        expected.append(layer.weight.grad.abs().sum().item())
    detector = GradNorm(temperature=temperature)
    np.testing.assert_allclose(detector.score(test, readout), expected, rtol=1e-5)
    assert detector.state() == {}
    with pytest.raises(BadInputError, match="--gradnorm-temperature"):
        GradNorm(temperature=0)
    with pytest.raises(BadInputError, match="last Linear layer"):
        detector.score(test, None)


def _vim_reference(train, test, weight, bias, dim):
    """ViM written out directly: pinv origin, eigh of the centred second moment, α."""
    u = -np.linalg.pinv(weight) @ bias
    x = train.z.astype(np.float64) - u
    values, vectors = np.linalg.eigh(x.T @ x / len(x))
    residual_space = vectors[:, np.argsort(values)[::-1][dim:]]
    train_logits = train.z.astype(np.float64) @ weight.T + bias
    train_residual = np.linalg.norm(x @ residual_space, axis=1)
    alpha = train_logits.max(axis=1).mean() / train_residual.mean()
    logits = test.z.astype(np.float64) @ weight.T + bias
    top = logits.max(axis=1, keepdims=True)
    energy = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    virtual = alpha * np.linalg.norm((test.z.astype(np.float64) - u) @ residual_space, axis=1)
    return energy - virtual, alpha


def test_vim_matches_a_direct_numpy_implementation(linear_features):
    train, test, layer, readout = linear_features
    for dim in (2, 4):
        expected, alpha = _vim_reference(train, test, readout.weight, readout.bias, dim)
        vim = ViM(dim=dim).fit(train, readout)
        assert vim.alpha == pytest.approx(alpha, rel=1e-6)  # float32 logits, as the model
        np.testing.assert_allclose(vim.score(test, readout), expected, rtol=1e-6, atol=1e-6)
    stored = {k: np.asarray(v) if v is not None else v for k, v in vim.state().items()}
    rebuilt = ViM.from_state(stored, dim=4)
    np.testing.assert_array_equal(rebuilt.score(test, readout), vim.score(test, readout))
    with pytest.raises(StaleStoreError, match="dim=4"):
        ViM.from_state(stored, dim=3)
    default = ViM().fit(train, readout)  # D = 6: half of it
    assert default.principal_dim == 3
    with pytest.raises(BadInputError, match="at most 5"):
        ViM(dim=6).fit(train, readout)
    no_bias = Readout.from_linear(readout.weight)  # origin 0 without a bias
    np.testing.assert_allclose(ViM(dim=2).fit(train, no_bias).origin, 0.0)


def test_vim_default_dimension_follows_the_paper():
    assert [vim_default_dim(n) for n in (2048, 1500, 1499, 768, 767, 512, 7)] == [
        1000,
        1000,
        512,
        512,
        383,
        256,
        3,
    ]


def _odin_loop(module, images, temperature, epsilon, std):
    """The reference algorithm, one image at a time with autograd."""
    scores = []
    for image in images:
        x = image[None].clone().requires_grad_(True)
        logits = module(x) / temperature
        loss = nn.functional.cross_entropy(logits, logits.argmax(dim=1))
        loss.backward()
        step = (x.grad >= 0).float() * 2 - 1
        step = step / torch.tensor(std).reshape(1, -1, 1, 1)
        perturbed = x.detach() - epsilon * step
        with torch.no_grad():
            probabilities = torch.softmax(module(perturbed).double() / temperature, dim=1)
        scores.append(probabilities.max().item())
    return np.array(scores)


def test_odin_matches_a_one_image_autograd_loop():
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(20, 4),
    ).eval()
    with torch.no_grad():
        module[1].running_mean.normal_()
        module[1].running_var.uniform_(0.5, 2)
    images = torch.randn(9, 3, 6, 6)
    std = (0.25, 0.5, 0.2)
    for temperature, epsilon in ((1000.0, 0.0014), (2.0, 0.05)):
        odin = ODIN(temperature=temperature, epsilon=epsilon)
        batched = odin.score_inputs(module, images, std)
        assert all(p.grad is None for p in module.parameters())  # only the input's gradient
        expected = _odin_loop(module, images, temperature, epsilon, std)
        module.zero_grad(set_to_none=True)
        np.testing.assert_allclose(batched, expected, rtol=1e-6, atol=1e-9)
    plain = ODIN(temperature=2.0, epsilon=0.0).score_inputs(module, images, std)
    with torch.no_grad():
        msp = torch.softmax(module(images).double() / 2.0, dim=1).amax(dim=1).numpy()
    np.testing.assert_allclose(plain, msp, rtol=1e-12)
    assert (batched > plain).mean() > 0.5  # the step raises the top softmax score
    with pytest.raises(BadInputError, match="--odin-epsilon"):
        ODIN(epsilon=-1)
