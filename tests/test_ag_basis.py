"""The average-gradient basis built block by block from the stored class means, against a
dense float64 Householder QR of the same normalised class means."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradcli import layout
from gradcli.budget import AG_BYTES_PER_CLASS, AG_BYTES_PER_ROW, AG_SHARE, format_size
from gradcli.errors import BadInputError
from gradcli.run import Run
from gradcli.stages import ag_basis
from gradcli.stages import stats as stats_stage
from gradcli.store import RunStore
from gradcli.subspace import RANK_TOLERANCE, in_order_cholesky

PREPROCESS_KW = {"input_size": 8, "mean": [0.5] * 3, "std": [0.25] * 3}


class Recorder:
    """A progress sink that keeps the notes and task names."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.tasks: list[str] = []

    def note(self, message: str) -> None:
        self.notes.append(message)

    def task(self, description: str, total: int | None = None):
        import contextlib

        self.tasks.append(description)
        return contextlib.nullcontext(lambda n=1: None)


def _centred_class_means(rng, classes: int, params: int) -> tuple[np.ndarray, np.ndarray]:
    """Class means of random gradients and their training mean, so that the centred class
    means sum to zero weighted by class size (rank C − 1); float32 as the statistics store
    them, and the class counts."""
    counts = rng.integers(3, 9, size=classes)
    grads = [rng.normal(size=(n, params)) * rng.uniform(0.5, 2.0, size=params) for n in counts]
    mean = np.concatenate(grads).mean(0)
    class_means = np.stack([g.mean(0) for g in grads])
    return class_means.astype(np.float32), mean.astype(np.float32), counts


def _stats_store(
    path, class_means, mean, var, counts, chunk_columns: int | None = None
) -> RunStore:
    """A store holding only what the AG basis reads: the statistics' mean, variance, class
    means (row chunks as a whole-array write makes them, or row and column chunks) and
    class counts."""
    store = RunStore(str(path))
    store.write(layout.STATS_MEAN, mean, chunk_rows=layout.BASIS_CHUNK_ROWS)
    store.write(layout.STATS_VAR, var, chunk_rows=layout.BASIS_CHUNK_ROWS)
    if chunk_columns is None:
        store.write(layout.STATS_CLASS_MEANS, class_means, chunk_rows=1)
    else:
        store.create_rows(
            layout.STATS_CLASS_MEANS,
            class_means.shape,
            "float32",
            chunk_rows=1,
            chunk_columns=chunk_columns,
        )
        for row in range(class_means.shape[0]):
            store.write_rows(layout.STATS_CLASS_MEANS, row, class_means[row : row + 1])
    store.set_attrs(layout.STATS, class_counts=[int(n) for n in counts])
    return store


def _normalised(class_means, mean, var, no_variance=False) -> torch.Tensor:
    """(P, C) float64 normalised class means, computed directly."""
    a = torch.from_numpy(class_means).double().T - torch.from_numpy(mean).double()[:, None]
    if not no_variance:
        a = a / torch.from_numpy(var).double().sqrt()[:, None]
    return a


def _householder_basis(a: torch.Tensor) -> torch.Tensor:
    """The dense reference: Householder QR, signs so R's diagonal is positive, columns whose
    |R_jj| is at rounding level relative to the largest dropped."""
    q, r = torch.linalg.qr(a, mode="reduced")
    diagonal = torch.diagonal(r)
    q = q * torch.where(diagonal < 0, -1.0, 1.0).to(q.dtype)[None, :]
    return q[:, diagonal.abs() > RANK_TOLERANCE * diagonal.abs().max()]


def _budget_for_rows(classes: int, params: int, rows: int) -> int:
    """A memory budget whose AG plan holds ``rows`` rows a block."""
    fixed = ag_basis.ag_plan(1 << 40, classes, params).fixed_bytes
    return int((fixed + rows * (AG_BYTES_PER_CLASS * classes + AG_BYTES_PER_ROW)) / AG_SHARE) + 1


def _assert_same_columns(basis: np.ndarray, reference: torch.Tensor) -> None:
    """Matching columns point the same way: cos ≥ 1 − 1e-6 (so the signs agree too)."""
    v = torch.from_numpy(basis).double()
    assert v.shape == reference.shape
    cos = (v * reference).sum(0) / (v.norm(dim=0) * reference.norm(dim=0))
    assert float(cos.min()) >= 1 - 1e-6, cos
    gram = v.T @ v
    torch.testing.assert_close(gram, torch.eye(v.shape[1], dtype=torch.float64), atol=1e-6, rtol=0)


def _read_spy(store: RunStore, monkeypatch) -> list[tuple[int, int]]:
    """Records the column ranges read from the class means; a whole read fails the test."""
    reads: list[tuple[int, int]] = []
    read_columns, read = store.read_columns, store.read

    def columns(path, start, stop):
        if path == layout.STATS_CLASS_MEANS:
            reads.append((start, stop))
        return read_columns(path, start, stop)

    def whole(path):
        assert path != layout.STATS_CLASS_MEANS, "the class means were read whole"
        return read(path)

    monkeypatch.setattr(store, "read_columns", columns)
    monkeypatch.setattr(store, "read", whole)
    return reads


@pytest.mark.parametrize("chunk_columns", [None, 256])
def test_blocked_basis_equals_dense_qr_of_centred_class_means(tmp_path, monkeypatch, chunk_columns):
    """Centred class means have rank C − 1 (the last one depends on the others): K = C − 1,
    every column as the dense QR's, under a budget that splits P into 30 blocks."""
    rng = np.random.default_rng(0)
    classes, params = 7, 3000
    class_means, mean, counts = _centred_class_means(rng, classes, params)
    var = rng.uniform(0.2, 3.0, size=params).astype(np.float32)
    store = _stats_store(tmp_path / "run", class_means, mean, var, counts, chunk_columns)
    plan = ag_basis.ag_plan(_budget_for_rows(classes, params, 100), classes, params)
    assert plan.block_rows == 100 and plan.blocks == 30
    reads = _read_spy(store, monkeypatch)
    progress = Recorder()
    k = ag_basis.write_average_gradient_basis(store, plan, False, progress)
    assert k == classes - 1
    assert reads == [(a, min(a + 100, params)) for a in range(0, params, 100)] * 2
    a = _normalised(class_means, mean, var)
    _assert_same_columns(store.read(layout.BASIS), _householder_basis(a))
    np.testing.assert_allclose(store.read(layout.SUBSPACE_CLASS_MEANS), a.numpy(), rtol=1e-6)
    assert "30 blocks of up to 100 rows, 2 passes over stats/class_means" in progress.notes[0]


def test_a_class_mean_dependent_mid_order_is_dropped_and_the_rest_keep_their_order(tmp_path):
    """Class 2's mean is a combination of classes 0 and 1: its column is dropped and each later
    column is its class mean minus its part along the kept earlier ones, that is the QR of
    the kept class means; every class mean lies in the span."""
    rng = np.random.default_rng(1)
    classes, params = 6, 2000
    counts = rng.integers(3, 9, size=classes)
    centred = rng.normal(size=(classes, params))
    centred[2] = 0.7 * centred[0] - 0.4 * centred[1]
    centred[-1] = -(counts[:-1, None] * centred[:-1]).sum(0) / counts[-1]  # sum n_c c_c = 0
    mean = rng.normal(size=params).astype(np.float32)
    class_means = (centred + mean).astype(np.float32)  # dependent up to float32 rounding
    var = np.ones(params, dtype=np.float32)
    store = _stats_store(tmp_path / "run", class_means, mean, var, counts)
    plan = ag_basis.ag_plan(_budget_for_rows(classes, params, 64), classes, params)
    assert plan.blocks >= 20
    k = ag_basis.write_average_gradient_basis(store, plan, True)
    a = _normalised(class_means, mean, var, no_variance=True)
    # Class 2 dependent mid-order, then the last (centred means sum to zero): K = C − 2.
    assert k == classes - 2
    kept = [0, 1, 3, 4]  # the last class mean depends on all before it
    reference, r = torch.linalg.qr(a[:, kept])
    reference = reference * torch.sign(torch.diagonal(r))[None, :]
    basis = store.read(layout.BASIS)
    _assert_same_columns(basis, reference)
    v = torch.from_numpy(basis).double()
    residual = a - v @ (v.T @ a)
    assert float(residual.norm() / a.norm()) < 1e-6
    # The columns before the dropped one are the dense QR's.
    _assert_same_columns(basis[:, :2], _householder_basis(a)[:, :2])


def test_ill_conditioned_class_means_take_a_second_orthonormalisation(tmp_path):
    """A class mean 1e-4 away (relative) from the span of earlier ones is kept (over the 1e-5
    rank rule); one Cholesky-QR round leaves its basis short of orthonormal, so a third
    pass rewrites the basis, and it still equals the dense QR column by column."""
    rng = np.random.default_rng(2)
    classes, params = 5, 4000
    class_means, mean, counts = _centred_class_means(rng, classes, params)
    centred = class_means.astype(np.float64) - mean
    centred[1] = centred[0] * 1.3 + 1e-4 * np.linalg.norm(centred[0]) * rng.normal(
        size=params
    ) / np.sqrt(params)
    class_means = (centred + mean).astype(np.float32)
    var = rng.uniform(0.5, 2.0, size=params).astype(np.float32)
    store = _stats_store(tmp_path / "run", class_means, mean, var, counts)
    plan = ag_basis.ag_plan(_budget_for_rows(classes, params, 300), classes, params)
    progress = Recorder()
    k = ag_basis.write_average_gradient_basis(store, plan, False, progress)
    a = _normalised(class_means, mean, var)
    reference = _householder_basis(a)
    assert k == reference.shape[1] == classes  # not centred any more: all kept
    assert len(progress.tasks) == 3 and "pass 3" in progress.tasks[2]
    _assert_same_columns(store.read(layout.BASIS), reference)


def test_well_conditioned_class_means_take_two_passes(tmp_path):
    rng = np.random.default_rng(3)
    class_means, mean, counts = _centred_class_means(rng, 4, 1000)
    var = rng.uniform(0.5, 2.0, size=1000).astype(np.float32)
    store = _stats_store(tmp_path / "run", class_means, mean, var, counts)
    progress = Recorder()
    plan = ag_basis.ag_plan(_budget_for_rows(4, 1000, 50), 4, 1000)
    ag_basis.write_average_gradient_basis(store, plan, False, progress)
    assert len(progress.tasks) == 2
    reference = _householder_basis(_normalised(class_means, mean, var))
    _assert_same_columns(store.read(layout.BASIS), reference)


def test_in_order_cholesky_is_qr_of_the_kept_columns():
    """The factor's kept rows and columns are R of the kept columns' QR (positive diagonal);
    a column whose residual is under the rank rule is skipped, one just over it kept."""
    rng = np.random.default_rng(4)
    a = torch.from_numpy(rng.normal(size=(300, 6)))
    a[:, 2] = a[:, 0] - 2 * a[:, 1] + 3e-6 * a[:, 2]  # residual ~3e-6 of the largest: skipped
    a[:, 4] = a[:, 3] + 3e-5 * a[:, 4]  # ~3e-5: kept
    factor = in_order_cholesky(a.T @ a)
    kept = torch.diagonal(factor) > 0
    assert kept.tolist() == [True, True, False, True, True, True]
    assert torch.equal(factor[~kept], torch.zeros(1, 6, dtype=torch.float64))
    _, r = torch.linalg.qr(a[:, kept])
    r = r * torch.sign(torch.diagonal(r))[:, None]
    torch.testing.assert_close(factor[kept][:, kept], r, rtol=1e-6, atol=1e-9)
    assert not bool(torch.diagonal(in_order_cholesky(torch.zeros(3, 3, dtype=torch.float64))).any())


def test_empty_or_spanless_class_means_are_errors(tmp_path):
    rng = np.random.default_rng(5)
    class_means, mean, counts = _centred_class_means(rng, 3, 50)
    var = np.ones(50, dtype=np.float32)
    store = _stats_store(tmp_path / "a", class_means, mean, var, [2, 0, 1])
    plan = ag_basis.ag_plan(1 << 20, 3, 50)
    with pytest.raises(BadInputError, match="no training samples"):
        ag_basis.write_average_gradient_basis(store, plan, False)
    # One class: its mean is the training mean, so centred it is zero.
    store = _stats_store(tmp_path / "b", mean[None, :], mean, var, [6])
    with pytest.raises(BadInputError, match="span nothing.*--method pca"):
        ag_basis.write_average_gradient_basis(store, ag_basis.ag_plan(1 << 20, 1, 50), False)


def test_extract_subspace_under_a_small_budget_equals_one_block(tiny, tmp_path):
    """The pipeline's AG basis in blocks of a few rows equals the one-block basis."""
    results = []
    for name, budget in (("whole", None), ("split", 40_000)):
        run = Run(tmp_path / name, memory_budget=budget)
        run.set_model(tiny.model, str(tiny.weights), **PREPROCESS_KW)
        results.append(run.extract_subspace(tiny.train, batch_size=16))
        if budget:
            plan = ag_basis.ag_plan(budget, 3, results[-1]["num_parameters"])
            assert plan.blocks >= 2
        results[-1]["basis"] = run.store.read(layout.BASIS)
    whole, split = results
    assert whole["k"] == split["k"] == 2 and whole["k_reason"] == split["k_reason"]
    _assert_same_columns(split["basis"], torch.from_numpy(whole["basis"]).double())


def test_basis_matrices_over_the_budget_are_refused_before_any_pass(tiny, tmp_path, monkeypatch):
    """With the statistics' own check passing, a budget too small for the basis's C×C
    matrices is refused before the statistics pass, in one line that says how to fix it."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a pass over the data started")

    monkeypatch.setattr(stats_stage, "check_average_gradient_memory", lambda *a: None)
    monkeypatch.setattr(stats_stage, "compute_statistics", forbidden)
    run = Run(tmp_path / "run", memory_budget=4000)
    run.set_model(tiny.model, str(tiny.weights), **PREPROCESS_KW)
    with pytest.raises(BadInputError) as refused:
        run.extract_subspace(tiny.train)
    # 2 matrices of 3 x 3 float64 = 144 B, and read buffers of 2 x 4 chunks of 283 float32.
    read = format_size(2 * 4 * 4 * 283)
    message = str(refused.value)
    assert message.startswith(
        "--method avg orthonormalises 3 class means with 2 3 x 3 float64 matrices (144 B) and "
        f"{read} of read buffers, over 90% of the memory budget's 3.91 KiB; raise "
        "--memory-budget to "
    )
    assert "\n" not in message and message.endswith("or use --method pca --k N")
    assert not run.store.has("stats")
