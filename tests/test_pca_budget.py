"""PCA and embed under tiny memory budgets: row blocks that cut parameters, the plan's passes
against the passes made, and blocked results against the in-memory ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradcli import budget as budget_mod
from gradcli.grads import LayerGradients, select_parameters
from gradcli.run import Run
from gradcli.stages import pca_plan
from gradcli.stages.context import RunContext
from tests.test_pca import PREPROCESS, write_colour_blobs


@pytest.fixture(scope="module")
def pca_data(tmp_path_factory):
    return write_colour_blobs(tmp_path_factory.mktemp("pca-budget"), 120, seed=3)


def _counting_passes(monkeypatch, n: int) -> dict:
    """Counts the DataLoaders made over all ``n`` rows (one per pass over the data)."""
    counts = {"passes": 0}
    original = RunContext._loader

    def counting(self, source, indices, batch_size):
        if len(indices) == n:
            counts["passes"] += 1
        return original(self, source, indices, batch_size)

    monkeypatch.setattr(RunContext, "_loader", counting)
    return counts


@pytest.mark.parametrize("fewest", [True, False])
def test_row_ranges_fit_cover_and_are_the_fewest(fewest):
    sizes = [5, 300, 7, 120, 1, 64]
    total = sum(sizes)
    for bytes_per_row, budget in ((4, 400), (12, 1000), (8, 100_000)):
        cap = budget // bytes_per_row
        ranges = budget_mod.plan_row_ranges(sizes, bytes_per_row, budget, fewest=fewest)
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a < b and b - a <= cap for a, b in ranges)
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
        if fewest:
            assert len(ranges) == -(-total // cap)
    # Whole parameters, as plan_row_blocks gives them, wherever each fits a block.
    starts = np.concatenate([[0], np.cumsum(sizes)])
    blocks = budget_mod.plan_row_blocks(sizes, [str(i) for i in sizes], 1, 400)
    assert budget_mod.plan_row_ranges(sizes, 1, 400) == [
        (int(starts[a]), int(starts[b])) for a, b in blocks
    ]
    with pytest.raises(Exception, match="raise --memory-budget"):
        budget_mod.plan_row_ranges(sizes, 100, 99)


def test_engine_rows_give_those_columns_of_the_per_sample_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
        nn.Linear(6 * 16, 10),
    ).eval()  # fmt: skip
    selection = select_parameters(model)
    x = torch.randn(5, 3, 4, 4)
    full = LayerGradients(model, selection)(x)
    p = selection.size
    for lo, hi in ((0, 50), (50, 173), (100, 101), (170, p), (0, p)):
        engine = LayerGradients(model, selection, rows=(lo, hi), tile_bytes=1024)
        engine.capture(x)
        got = torch.zeros(5, p)
        seen = torch.zeros(p, dtype=torch.int64)
        for start, tile in engine.tiles():
            got[:, start : start + tile.shape[1]] = tile
            seen[start : start + tile.shape[1]] += 1
        assert seen[lo:hi].eq(1).all() and seen[:lo].eq(0).all() and seen[hi:].eq(0).all()
        torch.testing.assert_close(got[:, lo:hi], full[:, lo:hi], rtol=1e-5, atol=1e-6)


def test_blocked_pca_equals_in_memory_and_makes_the_planned_passes(pca_data, monkeypatch):
    spec = f"npz:{pca_data / 'train.npz'}"
    options = {
        "method": "pca",
        "k": 5,
        "oversample": 5,
        "batch_size": 32,
        "iterations": 2,
        "iteration_dtype": "float32",
    }
    results = {}
    for label, budget in (("memory", None), ("blocks", 62_000)):
        counts = _counting_passes(monkeypatch, 120)
        notes: list[str] = []
        run = Run(pca_data / label, memory_budget=budget) if budget else Run(pca_data / label)
        run.progress.note = lambda line, notes=notes, counts=counts: notes.append(
            (line, counts["passes"])
        )
        run.set_model(f"{pca_data / 'resnet.py'}:make", **PREPROCESS)
        result = run.extract_subspace(spec, **options)
        plan = run.store.group_attrs("subspace")["plan"]
        assert plan["form"] == label
        # One statistics pass, then the PCA passes the plan said, told before the first.
        assert counts["passes"] == 1 + plan["passes"]
        told = [count for line, count in notes if f"{plan['passes']} passes" in line]
        assert told == [1]
        assert result.get("plan", plan) == plan
        results[label] = run
    memory, blocked = results["memory"], results["blocks"]
    plan = blocked.store.group_attrs("subspace")["plan"]
    # 867 rows in blocks of at most 201 rows: five, and some cut a parameter.
    blocks = pca_plan.pca_blocks(blocked, blocked.selection, 10, 120)
    assert plan["row_blocks"] == len(blocks) >= 4
    assert plan["passes"] == (2 * 2 + 1) * len(blocks)
    starts = set(np.concatenate([[0], np.cumsum(blocked.selection.sizes)]).tolist())
    assert any(a not in starts for a, _, _ in blocks)
    assert plan["disk_bytes"] == 867 * 5 * 4 + 2 * 867 * 10 * 4 + 2 * 120 * 10 * 8
    # The same iteration from the same start: same eigenvalues and basis.
    np.testing.assert_allclose(
        blocked.store.read("subspace/eigenvalues"),
        memory.store.read("subspace/eigenvalues"),
        rtol=1e-4,
    )
    a = memory.store.read("subspace/basis").astype(np.float64)
    b = blocked.store.read("subspace/basis").astype(np.float64)
    np.testing.assert_allclose(np.abs(np.diag(a.T @ b)), 1.0, atol=1e-4)


@pytest.mark.parametrize("basis_dtype", ["float32", "bfloat16"])
def test_embed_in_row_blocks_cutting_parameters_equals_one_block(
    tiny, tmp_path, monkeypatch, basis_dtype
):
    whole = Run(tmp_path / "store", basis_dtype=basis_dtype)
    whole.set_model(tiny.model, str(tiny.weights), input_size=8, mean=[0.5] * 3, std=[0.25] * 3)
    whole.extract_subspace(tiny.train, batch_size=16)
    whole.embed(tiny.test, name="whole", batch_size=8, chunk_rows=1000)
    counts = _counting_passes(monkeypatch, 45)
    # K = 2: a row costs 2 × itemsize + 8 bytes; 60% of 1,400 bytes holds 52 (float32) or
    # 70 (bfloat16) rows, fewer than the 108- and 128-row weights.
    split = Run(tmp_path / "store", memory_budget=1400, basis_dtype=basis_dtype)
    blocks = split._row_blocks(split.selection, 2)
    starts = set(np.concatenate([[0], np.cumsum(split.selection.sizes)]).tolist())
    assert any(a not in starts for a, _, _ in blocks)
    rows = 840 // (2 * (4 if basis_dtype == "float32" else 2) + 8)
    assert len(blocks) == len(budget_mod.plan_row_ranges(split.selection.sizes, 1, rows))
    split.embed(tiny.test, name="split", batch_size=8, chunk_rows=1000)
    plan = split.store.group_attrs("embed/split")["plan"]
    assert plan["passes"] == counts["passes"] == len(blocks) >= 4
    assert plan["basis_dtype"] == basis_dtype
    a, b = whole.load_embedding("whole"), split.load_embedding("split")
    np.testing.assert_allclose(b["gnorm"], a["gnorm"], rtol=1e-5)
    if basis_dtype == "float32":
        np.testing.assert_allclose(b["grad"], a["grad"], rtol=1e-5, atol=1e-6)
    else:  # bf16 products round per tile, and a cut parameter has other tiles
        error = np.linalg.norm(b["grad"] - a["grad"]) / np.linalg.norm(a["grad"])
        assert error < 1e-2
    for key in ("feat", "logits", "labels"):
        np.testing.assert_array_equal(a[key], b[key])
