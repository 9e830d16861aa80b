"""The statistics pass class by class: its plan, its arithmetic against the per-sample
gradients it was fed, and its resumption after interruptions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import count_committed_batches

from gradcli.errors import Interrupted
from gradcli.grads import GradientStatistics
from gradcli.run import Run
from gradcli.stages import class_stats
from gradcli.stages import stats as stats_stage

PREPROCESS_KW = {"input_size": 8, "mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_class_plan_groups_by_class_in_whole_batches_split_over_ranks(world):
    rng = np.random.default_rng(2)
    indices = np.sort(rng.choice(1000, size=70, replace=False))
    labels = rng.integers(0, 6, size=70)
    labels[labels == 4] = 5  # class 4 has no samples
    done = np.zeros(6, dtype=bool)
    done[1] = True
    plan = class_stats.class_plan(indices, labels, 6, 4, done, world)

    # Classes in increasing order, each in selection order (a stable grouping).
    want = np.concatenate([indices[labels == c] for c in range(6)])
    np.testing.assert_array_equal(plan.rows, want)
    for c in range(6):
        np.testing.assert_array_equal(
            plan.rows[plan.bounds[c] : plan.bounds[c + 1]], indices[labels == c]
        )
    # Every sample of every class not done is in exactly one batch of at most 4, of one
    # class; only a class's last batch is short; a rank's classes are contiguous.
    batches = [b for mine in plan.batches for b in mine]
    covered = np.concatenate([np.arange(lo, hi) for _, lo, hi in batches])
    todo = [c for c in range(6) if c != 1]
    np.testing.assert_array_equal(
        covered, np.concatenate([np.arange(plan.bounds[c], plan.bounds[c + 1]) for c in todo])
    )
    for c, lo, hi in batches:
        assert plan.bounds[c] <= lo < hi <= plan.bounds[c + 1] and hi - lo <= 4
        assert hi - lo == 4 or hi == plan.bounds[c + 1]
    owners = [[c for c, _, _ in mine] for mine in plan.batches]
    flat = [c for mine in owners for c in mine]
    assert flat == sorted(flat)  # rank r's classes all precede rank r + 1's
    assert len({c for mine in owners for c in set(mine)}) == len(set(flat))  # none split
    assert plan.steps == max(len(mine) for mine in plan.batches)
    total = len(batches)
    assert plan.steps <= -(-total // world) + max(-(-np.diff(plan.bounds) // 4))
    # A class is done after the step of its last batch on its rank.
    for mine in plan.batches:
        for step, (c, _, hi) in enumerate(mine, start=1):
            if hi == plan.bounds[c + 1]:
                assert plan.finished[c] == step
    assert plan.finished[1] == 0 and plan.finished[4] == 0
    assert plan.done_by(0, done).tolist() == [False, True, False, False, False, False]
    assert plan.done_by(plan.steps, done).tolist() == [True, True, True, True, False, True]


def test_rebatched_cuts_the_same_samples_into_other_sizes():
    x = torch.arange(40.0).reshape(20, 2)
    y = torch.arange(20)
    incoming = [(x[i : i + 6], y[i : i + 6]) for i in range(0, 20, 6)]
    sizes = [6, 1, 5, 3, 3, 2]
    out = list(class_stats.rebatched(incoming, sizes))
    assert [len(b[1]) for b in out] == sizes
    torch.testing.assert_close(torch.cat([b[0] for b in out]), x)
    torch.testing.assert_close(torch.cat([b[1] for b in out]), y)


def _many_classes(tmp_path, classes: int = 12, per_class: int = 5) -> tuple[Run, str]:
    """A model of ``classes`` outputs and ``per_class`` labelled random images of each, in
    shuffled order."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "model.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),\n"
        f"        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, {classes}))\n"
    )
    rng = np.random.default_rng(4)
    n = classes * per_class
    x = rng.integers(0, 255, size=(n, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=rng.permutation(np.arange(n) % classes))
    torch.manual_seed(3)
    run = Run(tmp_path / "store")
    run.set_model(f"{tmp_path / 'model.py'}:make", **PREPROCESS_KW)
    return run, f"npz:{tmp_path / 'd.npz'}"


def test_class_pass_statistics_equal_those_of_the_gradients_it_was_fed(tmp_path, monkeypatch):
    """The per-sample gradient tiles the pass merges, gathered: their float64 mean and
    variance equal the pass's to float64 rounding (rtol 1e-10), each class's mean is its row
    of stats/class_means, and no batch holds two classes."""
    run, data = _many_classes(tmp_path)
    fed: list[list[tuple[int, torch.Tensor]]] = [[]]
    update_rows, commit = GradientStatistics.update_rows, GradientStatistics.commit

    def recording_rows(self, start, tile):
        fed[-1].append((start, tile.detach().double().clone()))
        return update_rows(self, start, tile)

    def recording_commit(self, size):
        fed.append([])
        return commit(self, size)

    kept = {}
    original = class_stats.class_statistics

    def keeping(run, source, plan, engine, stats, *args):
        kept["stats"], kept["plan"] = stats, plan
        return original(run, source, plan, engine, stats, *args)

    monkeypatch.setattr(GradientStatistics, "update_rows", recording_rows)
    monkeypatch.setattr(GradientStatistics, "commit", recording_commit)
    monkeypatch.setattr(class_stats, "class_statistics", keeping)
    run.extract_subspace(data, batch_size=4, max_samples=50, seed=3)

    fed.pop()  # the list opened by the last commit
    batches = [torch.cat([t for _, t in sorted(tiles, key=lambda s: s[0])], 1) for tiles in fed]
    g = torch.cat(batches).numpy()  # (N, P) in the pass's order
    source = run.resolve(data, default_split="train")
    indices = run._subset(len(source), 50, 3)
    labels = source.labels()[indices]
    plan = kept["plan"]
    np.testing.assert_array_equal(plan.rows, indices[np.argsort(labels, kind="stable")])
    order = np.sort(labels)
    sizes = np.cumsum([0] + [len(b) for b in batches])
    assert all(len(set(order[a:b])) == 1 for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    stats = kept["stats"]
    assert stats.count == len(g) == 50
    np.testing.assert_allclose(stats.mean.numpy(), g.mean(0), rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(stats.variance().numpy(), g.var(0), rtol=1e-10, atol=1e-300)
    means = run.store.read("stats/class_means")
    assert means.dtype == np.float32 and means.shape == (12, g.shape[1])
    for c in range(12):
        np.testing.assert_allclose(means[c], g[order == c].mean(0), rtol=1e-6, atol=1e-12)
    counts = np.bincount(labels, minlength=12).tolist()
    assert run.store.group_attrs("stats")["class_counts"] == counts


def test_interrupted_twice_then_resumed_skips_finished_classes_and_gives_the_same_bits(
    tmp_path, monkeypatch
):
    """Stopped mid-class twice (the second time while resuming), the pass keeps the classes
    finished before each stop, passes over the others only, and ends with the arrays of a pass
    never interrupted, bit for bit."""
    options = {"batch_size": 2, "checkpoint_every": 4}  # 5 samples a class: batches 2, 2, 1
    clean, data = _many_classes(tmp_path / "clean")
    clean.extract_subspace(data, **options)

    seen = count_committed_batches(monkeypatch)
    interrupted, _ = _many_classes(tmp_path / "int")
    for stop_at, done in ((8, [0, 1]), (7, [0, 1, 2, 3])):

        def stop(stop_at=stop_at, polls={"n": 0}) -> bool:  # noqa: B006 - one per stop
            polls["n"] += 1
            return polls["n"] >= stop_at

        interrupted.should_stop = stop
        seen.clear()
        with pytest.raises(Interrupted, match="statistics"):
            interrupted.extract_subspace(data, **options)
        state = interrupted.store.group_attrs("stats/state")
        assert state["done"] == done and state["count"] == 5 * len(done)
        assert len(seen) == stop_at  # one batch a poll
    # The first stop came in class 2's third batch (steps 7, 8), the second in class 4's first.
    interrupted.should_stop = lambda: False
    seen.clear()
    interrupted.extract_subspace(data, **options)
    assert sum(seen) == 5 * 8  # classes 4 to 11
    for path in ("stats/mean", "stats/var", "stats/class_means", "subspace/basis"):
        np.testing.assert_array_equal(interrupted.store.read(path), clean.store.read(path))
    assert not interrupted.store.has("stats/state")


def test_the_memory_check_counts_vectors_of_the_parameters_only(tmp_path):
    run, _ = _many_classes(tmp_path)
    from gradcli.errors import BadInputError
    from gradcli.grads import select_parameters

    selection = select_parameters(run.model.module, None)
    need = stats_stage.STATS_VECTORS * 8 * selection.size
    run.memory_budget = need
    stats_stage.check_average_gradient_memory(run, selection, 10**6)  # classes: no matter
    run.memory_budget = need - 1
    with pytest.raises(BadInputError, match="for the statistics pass"):
        stats_stage.check_average_gradient_memory(run, selection, 2)
