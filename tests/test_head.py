import numpy as np
import pytest
import torch

from gradcli.errors import BadInputError
from gradcli.head import (
    HEAD_ARRAY_NAMES,
    GradientHead,
    accuracy,
    head_from_arrays,
    head_to_arrays,
    train_head,
)


def _blobs(n_per_class: int = 200, k: int = 6, c: int = 3, seed: int = 0):
    """Separable Gaussian blobs with a large offset and an uneven scale across dimensions;
    ``seed`` draws the noise, the class centres are fixed."""
    centres = np.random.default_rng(1000).normal(0.0, 4.0, (c, k))
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(c), n_per_class)
    z = centres[labels] + rng.normal(0.0, 0.5, (labels.size, k))
    z = z * np.geomspace(1e-3, 1e2, k) + 50.0  # the BN has to handle scale and offset
    order = rng.permutation(labels.size)
    return z[order].astype(np.float32), labels[order].astype(np.int64)


def test_training_separates_blobs_and_reports_progress():
    z, labels = _blobs()
    calls = []
    head = train_head(
        z, labels, 3, epochs=15, batch_size=64, progress=lambda d, t: calls.append((d, t))
    )
    assert not head.training
    assert calls == [(e, 15) for e in range(1, 16)]
    held_out_z, held_out_labels = _blobs(seed=1)
    assert accuracy(head, z, labels) > 0.97
    assert accuracy(head, held_out_z, held_out_labels) > 0.95


def test_accuracy_matches_argmax_and_skips_unlabelled():
    z, labels = _blobs(n_per_class=30)
    head = train_head(z, labels, 3, epochs=2, batch_size=16)
    with torch.no_grad():
        predictions = head(torch.from_numpy(z)).argmax(1).numpy()
    assert accuracy(head, z, labels) == pytest.approx(np.mean(predictions == labels))
    partly = labels.copy()
    partly[::2] = -1
    expected = np.mean(predictions[1::2] == labels[1::2])
    assert accuracy(head, z, partly) == pytest.approx(expected)


def test_normalise_is_eval_mode_batchnorm():
    z, labels = _blobs(n_per_class=30)
    head = train_head(z, labels, 3, epochs=2, batch_size=16)
    head.train()  # normalise must ignore the module's mode
    bn = head_to_arrays(head)
    expected = (z - bn["bn.running_mean"]) / np.sqrt(bn["bn.running_var"] + head.bn.eps)
    expected = expected * bn["bn.weight"] + bn["bn.bias"]
    with torch.no_grad():
        h = head.normalise(torch.from_numpy(z))
        logits = head.classify(h)
    # dim 0 spreads ~5e-4 around 50: float32 cancellation leaves ~3e-4 after normalising it
    np.testing.assert_allclose(h.numpy(), expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(
        logits.numpy(), expected @ bn["fc.weight"].T + bn["fc.bias"], rtol=1e-4, atol=1e-3
    )


def test_training_is_deterministic_and_seeded():
    z, labels = _blobs(n_per_class=50)
    first = head_to_arrays(train_head(z, labels, 3, epochs=3, batch_size=32, seed=7))
    torch.manual_seed(123)  # the global RNG must not matter
    second = head_to_arrays(train_head(z, labels, 3, epochs=3, batch_size=32, seed=7))
    other = head_to_arrays(train_head(z, labels, 3, epochs=3, batch_size=32, seed=8))
    for name in HEAD_ARRAY_NAMES:
        np.testing.assert_array_equal(first[name], second[name])
    assert not np.array_equal(first["fc.weight"], other["fc.weight"])


def test_arrays_round_trip():
    z, labels = _blobs(n_per_class=40)
    head = train_head(z, labels, 3, epochs=2, batch_size=32)
    arrays = head_to_arrays(head)
    assert set(arrays) == set(HEAD_ARRAY_NAMES)
    assert arrays["fc.weight"].shape == (3, 6) and arrays["bn.running_var"].shape == (6,)
    rebuilt = head_from_arrays(arrays)
    assert isinstance(rebuilt, GradientHead) and not rebuilt.training
    with torch.no_grad():
        np.testing.assert_array_equal(
            rebuilt(torch.from_numpy(z)).numpy(), head(torch.from_numpy(z)).numpy()
        )
    with pytest.raises(BadInputError, match="fc.bias"):
        head_from_arrays({k: v for k, v in arrays.items() if k != "fc.bias"})
    with pytest.raises(BadInputError, match="shapes"):
        head_from_arrays({**arrays, "fc.bias": np.zeros(5, np.float32)})


def test_a_trailing_single_sample_batch_is_skipped():
    z, labels = _blobs(n_per_class=11)  # 33 samples, batch 16 → last batch of one
    head = train_head(z, labels, 3, epochs=1, batch_size=16)
    assert np.isfinite(head_to_arrays(head)["fc.weight"]).all()


@pytest.mark.parametrize(
    ("z", "labels", "message"),
    [
        (np.zeros((0, 4), np.float32), np.zeros(0, np.int64), "empty"),
        (np.zeros((4, 4), np.float32), np.array([0, 1, -1, 0]), "labelled ID training set"),
        (np.zeros((4, 4), np.float32), np.array([0, 1, 3, 0]), r"\[0, 3\)"),
        (np.zeros((4, 4), np.float32), np.array([0, 1, 2]), "labelled ID training set"),
        (np.full((4, 4), np.nan, np.float32), np.array([0, 1, 2, 0]), "NaN"),
    ],
)
def test_bad_training_sets(z, labels, message):
    with pytest.raises(BadInputError, match=message):
        train_head(z, labels, 3)


def test_default_epochs_give_at_least_min_steps_and_ten_epochs():
    from gradcli.head import plan_epochs, steps_per_epoch

    for n, batch in ((4000, 128), (90, 128), (33, 16), (1_281_167, 128), (2, 2)):
        per_epoch = len([s for s in range(0, n, batch) if min(batch, n - s) >= 2])  # brute force
        assert steps_per_epoch(n, batch) == per_epoch
        epochs = plan_epochs(n, batch)
        assert epochs >= 10 and epochs * per_epoch >= 2000
        assert epochs == 10 or (epochs - 1) * per_epoch < 2000  # no more than needed
    assert plan_epochs(4000, 128, epochs=3) == 3
    assert plan_epochs(4000, 128, min_steps=10_000) == 313


def test_bn_statistics_are_the_training_set_s_and_seeds_meet():
    z, labels = _blobs(n_per_class=40, k=4)
    heads = [train_head(z, labels, 3, seed=s) for s in (0, 1)]
    arrays = head_to_arrays(heads[0])
    wide = z.astype(np.float64)
    np.testing.assert_allclose(arrays["bn.running_mean"], wide.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(arrays["bn.running_var"], wide.var(axis=0, ddof=1), rtol=1e-5)
    with torch.no_grad():  # weight decay: one minimiser, so two seeds give nearly one head
        energies = [torch.logsumexp(h(torch.from_numpy(z)), dim=1).numpy() for h in heads]
    np.testing.assert_allclose(energies[0], energies[1], rtol=0.02, atol=0.02)
