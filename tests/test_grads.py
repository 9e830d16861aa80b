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
    LayerGradients,
    Projector,
    energy,
    sanitise_variance,
    select_parameters,
    squared_row_norms,
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


def test_statistics_match_numpy_batch_by_batch_and_merged_class_by_class():
    """Mean and variance fed in uneven batches, and merged from per-group statistics (as the
    statistics pass merges classes), equal numpy's over all rows to float64 rounding."""
    rng = np.random.default_rng(0)
    g = rng.normal(3.0, 2.0, size=(50, 6)).astype(np.float32)
    want_mean, want_var = g.astype(np.float64).mean(0), g.astype(np.float64).var(0)
    stats = GradientStatistics(6)
    for start in range(0, 50, 13):  # uneven batches exercise the merge
        stats.update(torch.from_numpy(g[start : start + 13]))
    np.testing.assert_allclose(stats.mean.numpy(), want_mean, rtol=1e-10)
    np.testing.assert_allclose(stats.variance().numpy(), want_var, rtol=1e-10)

    merged, part = GradientStatistics(6), GradientStatistics(6)
    for group in np.split(np.arange(50), [0, 7, 8, 30]):  # an empty group and one of one row
        for start in range(0, len(group), 4):
            part.update(torch.from_numpy(g[group[start : start + 4]]))
        if len(group):
            np.testing.assert_allclose(part.mean.numpy(), g[group].mean(0, dtype=np.float64))
        merged.merge(part)
        part.reset()
    assert merged.count == 50 and part.count == 0 and not part.mean.any()
    np.testing.assert_allclose(merged.mean.numpy(), want_mean, rtol=1e-10)
    np.testing.assert_allclose(merged.variance().numpy(), want_var, rtol=1e-10)


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


def test_squared_row_norms_of_long_rows_match_float64():
    # One image's row of a wide layer runs to millions of columns: a single float32 reduction
    # over it is off by ~1e-4, the piecewise sums must stay at float32 rounding.
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(2, 2_400_003, generator=gen) * 3 + 1
    for tile in (wide, wide[:, 5:4101], wide[:, 7:], wide[:, :100]):  # slices: strided rows
        exact = tile.double().square().sum(dim=1)
        got = squared_row_norms(tile)
        assert got.dtype == torch.float64
        assert float(((got - exact) / exact).abs().max()) < 2e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projector_layouts_split_products_and_in_place_agree(dtype, monkeypatch):
    """Row and transposed basis layouts, the split float32 product (odd widths leave a
    remainder), in-place centring and a kept copy all give the float64 closed form."""
    from gradcli.grads import projector as projector_mod

    monkeypatch.setattr(projector_mod, "SPLIT_MIN_COLUMNS", 8)
    rng = np.random.default_rng(2)
    b, p, k = 6, 1001, 7
    g = torch.from_numpy(rng.normal(size=(b, p)).astype(np.float32))
    mean = torch.from_numpy(rng.normal(size=p).astype(np.float32))
    scale = torch.from_numpy(rng.uniform(0.5, 2, size=p).astype(np.float32))
    basis, _ = torch.linalg.qr(torch.randn(p, k))
    normalised = (g.double() - mean.double()) / scale.double()
    want = normalised @ basis.double()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for transposed in (False, True):
        given = basis.T.contiguous() if transposed else basis
        projector = Projector(mean, scale, given, dtype=dtype, transposed=transposed)
        assert projector.k == k
        z = torch.zeros(b, k, dtype=torch.float64)
        gnorm2 = torch.zeros(b, dtype=torch.float64)
        tile = g.clone()
        kept = torch.empty(b, 600, dtype=dtype)
        projector.add(0, tile[:, :600], z, gnorm2, out=kept)  # a kept copy, tile untouched
        assert torch.equal(tile, g)
        close = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(kept.double(), normalised[:, :600], rtol=close, atol=close)
        projector.add(600, tile[:, 600:], z, gnorm2, in_place=True)  # centred where it lies
        torch.testing.assert_close(
            tile[:, 600:].double(), normalised[:, 600:], rtol=1e-5, atol=1e-5
        )
        error = (z - want).norm() / want.norm()
        assert error < tolerance, (transposed, float(error))
        torch.testing.assert_close(gnorm2, normalised.square().sum(dim=1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("transposed", [False, True])
def test_projection_is_bitwise_the_same_on_one_and_two_threads(transposed):
    """Shard processes run with fewer threads than one process would: the reduced gradients
    must not depend on the thread count (a plain MKL GEMM at K = 10 does, in the last bits)."""
    gen = torch.Generator().manual_seed(3)
    b, p, k = 64, 40_003, 10
    g = torch.randn(b, p, generator=gen) * 2 + 0.5
    mean = torch.randn(p, generator=gen) * 0.1 + 0.5
    scale = torch.rand(p, generator=gen) + 0.5
    basis, _ = torch.linalg.qr(torch.randn(p, k, generator=gen))
    given = basis.T.contiguous() if transposed else basis
    normalised = (g.double() - mean.double()) / scale.double()
    # every column once, then the first 3000 again as a narrow tile
    want = normalised @ basis.double() + normalised[:, :3000] @ basis[:3000].double()
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            projector = Projector(mean, scale, given, transposed=transposed)
            z = torch.zeros(b, k, dtype=torch.float64)
            gnorm2 = torch.zeros(b, dtype=torch.float64)
            for start in range(0, p, 9000):  # tiles of 9000 columns (2 parts) and a last 4003
                projector.add(start, g[:, start : start + 9000], z, gnorm2)
            projector.add(0, g[:, :3000], z, gnorm2)  # a narrow tile: two parts as well
            results.append(z)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])
    torch.testing.assert_close(results[0], want, rtol=1e-5, atol=1e-4)


# -- the per-layer engine: every layer type against the one-image loop ---------------------


class Scale(nn.Module):
    """A module type the engine has no rule for: its gain goes through torch.func."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, c))

    def forward(self, x):
        return x * self.gain.view(1, -1, *([1] * (x.dim() - 2)))


class Zoo(nn.Module):
    """Conv2d of every stride/padding/dilation/groups kind, Conv1d, norms, sequence Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=2, dilation=2)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.depthwise = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.gn = nn.GroupNorm(4, 16)
        self.scale = Scale(16)
        self.conv1d = nn.Conv1d(16, 6, 2, stride=2)
        self.bn1d = nn.BatchNorm1d(6)
        self.seq = nn.Linear(6, 5)
        self.ln = nn.LayerNorm(5)
        self.bn_flat = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.depthwise(self.grouped(x)))
        x = self.scale(self.gn(x)).flatten(2)  # (B, 16, L)
        x = torch.relu(self.bn1d(self.conv1d(x)))  # (B, 6, L/2)
        x = self.ln(self.seq(x.transpose(1, 2)))  # (B, T, 5): Linear on a sequence
        return self.head(self.bn_flat(x.mean(dim=1)))


def _loop(model, x, names):
    params = dict(model.named_parameters())
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        energy(model(x[i : i + 1]))[0].backward()
        rows.append(
            torch.cat(
                [
                    params[n].grad.reshape(-1)
                    if params[n].grad is not None
                    else torch.zeros(params[n].numel())
                    for n in names
                ]
            )
        )
    return torch.stack(rows)


def _randomise_norms(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d | nn.LayerNorm | nn.GroupNorm):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


def _engine_vs_loop(model, x, tile_bytes=1 << 12):
    model.eval()
    selection = select_parameters(model)
    engine = LayerGradients(model, selection, tile_bytes=tile_bytes)  # small tiles: many of them
    got = engine(x)
    want = _loop(model, x, selection.names)
    return engine, (got - want).abs().max() / want.abs().max()


def test_engine_matches_loop_for_every_layer_type():
    torch.manual_seed(0)
    model = Zoo()
    _randomise_norms(model)
    engine, error = _engine_vs_loop(model, torch.randn(5, 3, 12, 12))
    assert error < 1e-5
    assert engine.fallback_names == ("scale.gain",)
    kinds = {type(layer.module) for layer in engine.layers}
    assert {nn.Conv2d, nn.Conv1d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d} <= kinds
    assert {nn.LayerNorm, nn.GroupNorm} <= kinds


class GainedCNN(SmallCNN):
    """SmallCNN with a per-class gain on the logits: a parameter the engine cannot hook."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 5))

    def forward(self, x):
        return super().forward(x) * self.gain


def test_sample_bytes_counts_captures_unfolding_and_fallback():
    """The engine's per-sample working memory, from the layer shapes by hand."""
    from gradcli.budget import TILE_BYTES as budget_tile_bytes
    from gradcli.grads import TILE_BYTES

    assert TILE_BYTES is budget_tile_bytes  # still importable from gradcli.grads
    x = torch.randn(4, 3, 8, 8)
    # conv 3->6 3x3: input 3*64 counted 2 + 9 times, output gradient 6*64; fc 24->5: input
    # counted 2 + 1 times, output gradient 5; all float32, per sample.
    per_sample = 4 * (3 * 64 * 11 + 6 * 64 + 24 * 3 + 5)
    for model, fallback in ((SmallCNN(), 0), (GainedCNN(), 5)):
        engine = LayerGradients(model, select_parameters(model))
        engine.capture(x)
        assert engine.fallback_names == (("gain",) if fallback else ())
        assert engine.sample_bytes() == per_sample + 4 * fallback * 3


def test_engine_matches_loop_on_resnet_with_inplace_relu():
    import torchvision

    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=5)
    _randomise_norms(model)
    _, error = _engine_vs_loop(model, torch.randn(2, 3, 32, 32), tile_bytes=1 << 20)
    assert error < 1e-5


class LargeOutputs(nn.Module):
    """Convolutions with many output positions (the grouped-backward path) and a shared layer."""

    def __init__(self) -> None:
        super().__init__()
        self.strided = nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2)
        self.plain = nn.Conv2d(4, 5, 1, bias=False)
        self.conv1d = nn.Conv1d(5, 3, 3, padding=1, dilation=2)
        self.shared = nn.Linear(3, 3)
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        x = torch.tanh(self.plain(torch.tanh(self.strided(x))))  # (B, 5, 20, 20)
        x = torch.tanh(self.conv1d(x.flatten(2)))  # (B, 3, 396): a long Conv1d output
        x = self.shared(torch.tanh(self.shared(x.mean(dim=2))))  # one module, called twice
        return self.head(x)


def test_large_convolutions_and_shared_layers_match_loop():
    from gradcli.grads import engine as engine_mod

    torch.manual_seed(5)
    model = LargeOutputs()
    x = torch.randn(3, 3, 40, 40)
    engine, error = _engine_vs_loop(model, x, tile_bytes=1 << 14)
    assert error < 1e-5
    assert engine.fallback_names == ("shared.weight", "shared.bias")
    grouped = engine(x)
    old = engine_mod.GROUPED_MIN_LENGTH
    engine_mod.GROUPED_MIN_LENGTH = 10**9  # every convolution through unfold + bmm instead
    try:
        unfolded = engine(x)
    finally:
        engine_mod.GROUPED_MIN_LENGTH = old
    torch.testing.assert_close(grouped, unfolded, rtol=1e-5, atol=1e-7)


def test_engine_matches_loop_on_vit():
    """Attention projections are used without calling their module: torch.func covers them."""
    import torchvision

    torch.manual_seed(2)
    model = torchvision.models.VisionTransformer(
        image_size=16,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        num_classes=4,
    )
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    engine, error = _engine_vs_loop(model, torch.randn(3, 3, 16, 16))
    assert error < 1e-5
    assert "class_token" in engine.fallback_names
    assert any(n.endswith("out_proj.weight") for n in engine.fallback_names)


def test_engine_block_covers_only_its_parameters():
    torch.manual_seed(3)
    model = TinyResNet().eval()
    selection = select_parameters(model)
    full = LayerGradients(model, selection)(torch.randn(4, 3, 8, 8))
    names = [n for n in selection.names if n.startswith("block.")]
    engine = LayerGradients(model, selection, only=names)
    x = torch.randn(4, 3, 8, 8)
    engine.capture(x)
    seen = np.zeros(selection.size, dtype=int)
    reference = LayerGradients(model, selection)(x)
    for start, tile in engine.tiles():
        seen[start : start + tile.shape[1]] += 1
        torch.testing.assert_close(tile, reference[:, start : start + tile.shape[1]])
    starts = np.concatenate([[0], np.cumsum(selection.sizes)])
    expected = np.zeros(selection.size, dtype=int)
    for i, n in enumerate(selection.names):
        if n in names:
            expected[starts[i] : starts[i + 1]] = 1
    np.testing.assert_array_equal(seen, expected)
    assert full.shape == (4, selection.size)


def test_bfloat16_basis_is_accurate_once_centred():
    """Uncentred gradients in bf16 lose precision; centring in float32 first keeps it."""
    torch.manual_seed(4)
    p, k = 200_000, 50
    mean = torch.randn(p) * 5.0  # a large mean, as trained networks' gradients have
    grads = mean + torch.randn(16, p) * 0.5
    scale = torch.rand(p) + 0.5
    basis, _ = torch.linalg.qr(torch.randn(p, k))
    exact, _ = Projector(mean, scale, basis)(grads)
    approx, _ = Projector(mean, scale, basis, dtype=torch.bfloat16)(grads)
    error = (approx - exact).norm() / exact.norm()
    assert error < 1e-2
