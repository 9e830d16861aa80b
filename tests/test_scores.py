import numpy as np
import pytest
import torch

from gradcli.errors import BadInputError, StaleStoreError
from gradcli.head import GradientHead
from gradcli.scores import (
    BASE_METHODS,
    BATS,
    DETECTORS,
    INPUT_DETECTORS,
    KNN,
    METHODS,
    MSP,
    Embedding,
    Energy,
    Mahalanobis,
    ReAct,
    Readout,
    describe_methods,
    ensemble_scores,
    get_detector,
)

C, D, K = 3, 5, 4


def _energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return temperature * np.log(np.exp(logits / temperature).sum(axis=1))


@pytest.fixture
def features():
    """ReLU-like features with labels, a last Linear layer, and the model's logits."""
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 1, (C, D)).astype(np.float32)
    bias = rng.normal(0, 1, C).astype(np.float32)

    def make(n: int, shift: float) -> Embedding:
        z = np.maximum(rng.normal(shift, 1.0, (n, D)), 0).astype(np.float32)
        labels = rng.integers(0, C, n)
        return Embedding(z=z, logits=z @ weight.T + bias, labels=labels)

    return make(60, 0.5), make(25, 1.0), weight, bias, Readout.from_linear(weight, bias)


@pytest.fixture
def gradients():
    """Reduced gradients and a head with non-trivial BN statistics and affine parameters."""
    rng = np.random.default_rng(1)
    head = GradientHead(K, C).eval()
    with torch.no_grad():
        head.bn.running_mean.copy_(torch.tensor(rng.normal(0, 2, K)))
        head.bn.running_var.copy_(torch.tensor(rng.uniform(0.5, 3, K)))
        head.bn.weight.copy_(torch.tensor([1.5, -0.7, 0.4, 2.0]))
        head.bn.bias.copy_(torch.tensor(rng.normal(0, 0.5, K)))
    train = Embedding(z=rng.normal(0, 2, (50, K)).astype(np.float32), labels=rng.integers(0, C, 50))
    test = Embedding(z=rng.normal(0, 3, (20, K)).astype(np.float32))
    return train, test, head, Readout.from_head(head)


def _head_arrays(head: GradientHead) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().astype(np.float64) for k, v in head.state_dict().items()}


def _bn_numpy(z: np.ndarray, head: GradientHead) -> np.ndarray:
    p = _head_arrays(head)
    scaled = (z - p["bn.running_mean"]) / np.sqrt(p["bn.running_var"] + head.bn.eps)
    return scaled * p["bn.weight"] + p["bn.bias"]


def _fc_numpy(h: np.ndarray, head: GradientHead) -> np.ndarray:
    p = _head_arrays(head)
    return h @ p["fc.weight"].T + p["fc.bias"]


def _round_trip(detector, data, readout):
    """Scores of a detector rebuilt from its state after a trip through plain numpy values."""
    stored = {k: np.asarray(v) for k, v in detector.state().items()}
    rebuilt = type(detector).from_state(stored, **detector.config())
    np.testing.assert_array_equal(rebuilt.score(data, readout), detector.score(data, readout))
    return rebuilt


def test_registry():
    assert BASE_METHODS == (
        "msp",
        "energy",
        "maxlogit",
        "react",
        "bats",
        "maha",
        "knn",
        "vim",
        "gradnorm",
        "residual",
        "gnorm",
    )
    assert (*BASE_METHODS, "odin") == METHODS  # odin needs images: never part of "all"
    assert all(DETECTORS[name].name == name for name in BASE_METHODS)
    assert get_detector("react", percentile=80).config() == {
        "percentile": 80.0,
        "clip_dims": None,
        "rule": "paper",
    }
    assert get_detector("odin", epsilon=0.0).config() == {"temperature": 1000.0, "epsilon": 0.0}
    with pytest.raises(BadInputError, match="msp, energy, maxlogit, react, .*, odin"):
        get_detector("mahalanobis")
    with pytest.raises(BadInputError, match="its options are k, normalise"):
        get_detector("knn", percentile=3)
    for cls in [*DETECTORS.values(), *INPUT_DETECTORS.values()]:
        assert "20" in cls.__doc__  # every docstring cites its paper's year
    listed = {row["name"]: row for row in describe_methods()}
    assert list(listed) == list(METHODS)
    assert listed["vim"]["embeddings"] == ["feat"] and listed["vim"]["fitted"]
    assert listed["odin"]["needs"] == "model + images" and "ICLR 2018" in listed["odin"]["details"]


def test_msp_and_energy_closed_form(features):
    train, test, weight, bias, readout = features
    logits = test.z.astype(np.float64) @ weight.T + bias
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    for source in (readout, None):  # the readout's logits and the stored ones agree
        msp = MSP().fit(train, source)
        np.testing.assert_allclose(msp.score(test, source), softmax.max(axis=1), rtol=1e-5)
        energy = Energy(temperature=2.0).fit(train, source)
        np.testing.assert_allclose(
            energy.score(test, source), _energy(logits, 2.0), rtol=1e-5, atol=1e-5
        )
        assert energy.state() == {} and msp.score(test, source).dtype == np.float64
    with pytest.raises(BadInputError, match="needs logits"):
        MSP().score(Embedding(z=test.z), None)


def test_energy_is_stable_for_large_logits():
    data = Embedding(z=np.zeros((2, 1), np.float32), logits=np.array([[1000.0, 1000.0], [0, -1e4]]))
    np.testing.assert_allclose(Energy().score(data, None), [1000 + np.log(2), 0.0])


def test_react_on_features_uses_one_global_percentile(features):
    train, test, weight, bias, readout = features
    threshold = np.percentile(train.z, 90)
    react = ReAct().fit(train, readout)
    np.testing.assert_allclose(react.state()["thresholds"], [threshold])
    clipped = np.minimum(test.z, threshold)
    np.testing.assert_allclose(
        react.score(test, readout), _energy(clipped @ weight.T + bias), rtol=1e-5
    )
    assert (test.z > threshold).any()  # the clipping did something
    last_two = ReAct(percentile=70, clip_dims=2).fit(train, readout)
    partly = test.z.copy()
    partly[:, -2:] = np.minimum(partly[:, -2:], np.percentile(train.z, 70))
    np.testing.assert_allclose(
        last_two.score(test, readout), _energy(partly @ weight.T + bias), rtol=1e-5
    )
    _round_trip(react, test, readout)


def test_react_on_gradients_per_dim_rule_clips_each_dim_after_the_bn(gradients):
    train, test, head, readout = gradients
    h_train, h_test = _bn_numpy(train.z, head), _bn_numpy(test.z, head)
    thresholds = np.percentile(h_train, 85, axis=0)
    for clip_dims in (None, 2):
        react = ReAct(percentile=85, clip_dims=clip_dims, rule="per-dim").fit(train, readout)
        d = K if clip_dims is None else clip_dims
        clipped = h_test.copy()
        clipped[:, K - d :] = np.minimum(clipped[:, K - d :], thresholds[K - d :])
        expected = _energy(_fc_numpy(clipped, head))
        np.testing.assert_allclose(react.score(test, readout), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(expected, _energy(_fc_numpy(h_test, head)))
    rebuilt = _round_trip(react, test, readout)
    with pytest.raises(StaleStoreError, match="percentile=85"):
        ReAct.from_state(react.state(), percentile=90)
    assert rebuilt.clip_dims == 2


def test_bats_on_gradients_clamps_to_the_bn_affine_range(gradients):
    train, test, head, readout = gradients
    gamma = head.bn.weight.detach().numpy().astype(np.float64)
    beta = head.bn.bias.detach().numpy().astype(np.float64)
    h_test = _bn_numpy(test.z, head)
    bats = BATS(lam=0.5, clip_dims=3).fit(train, readout)
    clamped = h_test.copy()
    low, high = beta - 0.5 * np.abs(gamma), beta + 0.5 * np.abs(gamma)
    clamped[:, 1:] = np.clip(clamped[:, 1:], low[1:], high[1:])
    assert not np.allclose(clamped, h_test)
    np.testing.assert_allclose(
        bats.score(test, readout), _energy(_fc_numpy(clamped, head)), rtol=1e-5, atol=1e-5
    )
    _round_trip(bats, test, readout)
    no_bn = Readout(readout.normalise, readout.classify, "grad")
    with pytest.raises(BadInputError, match="BatchNorm parameters"):
        bats.score(test, no_bn)


def test_paper_rule_rectifies_the_trailing_dims_of_gradients_by_default(gradients):
    """Wu et al.'s rule: the last d = K // 2 dims after the BN, one ReAct threshold pooled over
    them; BATS clamps only those dims. Checked against numpy, with d given and by default."""
    train, test, head, readout = gradients
    h_train, h_test = _bn_numpy(train.z, head), _bn_numpy(test.z, head)
    gamma = head.bn.weight.detach().numpy().astype(np.float64)
    beta = head.bn.bias.detach().numpy().astype(np.float64)
    for clip_dims, d in ((None, K // 2), (3, 3), (1, 1)):
        react = ReAct(percentile=80, clip_dims=clip_dims).fit(train, readout)
        assert react.rule == "paper"
        tau = np.percentile(h_train[:, K - d :].ravel(), 80)  # one threshold, pooled
        np.testing.assert_allclose(react.state()["thresholds"], [tau])
        clipped = h_test.copy()
        clipped[:, K - d :] = np.minimum(clipped[:, K - d :], tau)
        expected = _energy(_fc_numpy(clipped, head))
        np.testing.assert_allclose(react.score(test, readout), expected, rtol=1e-5, atol=1e-5)
        assert _round_trip(react, test, readout).clip_dims == clip_dims

        bats = BATS(lam=0.5, clip_dims=clip_dims).fit(train, readout)
        clamped = h_test.copy()
        low, high = beta - 0.5 * np.abs(gamma), beta + 0.5 * np.abs(gamma)
        clamped[:, K - d :] = np.clip(clamped[:, K - d :], low[K - d :], high[K - d :])
        np.testing.assert_allclose(
            bats.score(test, readout), _energy(_fc_numpy(clamped, head)), rtol=1e-5, atol=1e-5
        )
    # the leading dims are left alone by default, unlike the per-dim rule, which clips them all
    default = ReAct(percentile=80).fit(train, readout).score(test, readout)
    per_dim = ReAct(percentile=80, rule="per-dim").fit(train, readout).score(test, readout)
    assert not np.allclose(default, per_dim)
    every = np.minimum(h_test, np.percentile(h_train, 80, axis=0))
    np.testing.assert_allclose(per_dim, _energy(_fc_numpy(every, head)), rtol=1e-5, atol=1e-5)
    all_bats = BATS(lam=0.5, rule="per-dim").fit(train, readout).score(test, readout)
    all_clamped = np.clip(h_test, beta - 0.5 * np.abs(gamma), beta + 0.5 * np.abs(gamma))
    np.testing.assert_allclose(
        all_bats, _energy(_fc_numpy(all_clamped, head)), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(BadInputError, match="--clip-rule must be one of paper, per-dim"):
        ReAct(rule="all")
    old_fit = {k: v for k, v in ReAct().fit(train, readout).state().items() if k != "rule"}
    with pytest.raises(StaleStoreError, match="lacks 'rule'.*--overwrite"):
        ReAct.from_state(old_fit)  # a fit from before the rule existed is not reused


def test_bats_on_features_clamps_to_training_mean_and_std(features):
    train, test, weight, bias, readout = features
    mean, std = train.z.mean(axis=0, dtype=np.float64), train.z.std(axis=0, dtype=np.float64)
    bats = BATS(lam=1.0).fit(train, readout)
    clamped = np.clip(test.z, mean - std, mean + std)
    np.testing.assert_allclose(
        bats.score(test, readout), _energy(clamped @ weight.T + bias), rtol=1e-5
    )
    _round_trip(bats, test, readout)


def test_rectifiers_need_a_readout_of_the_fitted_kind(features, gradients):
    train, test, _, _, feature_readout = features
    _, grad_test, _, grad_readout = gradients
    for cls in (ReAct, BATS):
        with pytest.raises(BadInputError, match="last Linear layer.*--feature-layer"):
            cls().fit(train, None)
        detector = cls().fit(train, feature_readout)
        with pytest.raises(BadInputError, match="last Linear layer"):
            detector.score(test, None)
        with pytest.raises(BadInputError, match="fitted on 'feat'"):
            detector.score(grad_test, grad_readout)
    with pytest.raises(BadInputError, match="--clip-dims 9 exceeds"):
        ReAct(clip_dims=9).fit(train, feature_readout).score(test, feature_readout)
    with pytest.raises(BadInputError, match="not fitted"):
        ReAct().score(test, feature_readout)


def test_mahalanobis_matches_a_brute_force_loop(features):
    train, test, *_ = features
    z_train = train.z.astype(np.float64)
    classes = np.unique(train.labels)
    means = {c: z_train[train.labels == c].mean(axis=0) for c in classes}
    covariance = np.zeros((D, D))
    for z, y in zip(z_train, train.labels, strict=True):
        covariance += np.outer(z - means[y], z - means[y])
    inverse = np.linalg.inv(covariance / len(z_train))
    expected = [
        max(-(z - means[c]) @ inverse @ (z - means[c]) for c in classes)
        for z in test.z.astype(np.float64)
    ]
    maha = Mahalanobis().fit(train, None)
    np.testing.assert_allclose(maha.score(test, None), expected, rtol=1e-8)
    _round_trip(maha, test, None)
    unlabelled = Embedding(z=train.z, labels=np.where(train.labels == 0, -1, train.labels))
    for bad in (Embedding(z=train.z), unlabelled):
        with pytest.raises(BadInputError, match="labelled ID training set"):
            Mahalanobis().fit(bad, None)


def test_mahalanobis_survives_a_singular_covariance():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 1, (30, 3)).astype(np.float32)
    z[:, 2] = z[:, 0]  # rank-deficient
    maha = Mahalanobis().fit(Embedding(z=z, labels=np.arange(30) % 2), None)
    assert np.isfinite(maha.score(Embedding(z=z), None)).all()


@pytest.mark.parametrize("normalise", [True, False])
def test_knn_matches_brute_force_distances(features, normalise):
    train, test, *_ = features

    def prepare(z):
        z = z.astype(np.float64)
        return z / np.linalg.norm(z, axis=1, keepdims=True) if normalise else z

    distances = np.linalg.norm(prepare(test.z)[:, None] - prepare(train.z)[None], axis=2)
    expected = -np.sort(distances, axis=1)[:, 6]
    knn = KNN(k=7, normalise=normalise).fit(train, None)
    np.testing.assert_allclose(knn.score(test, None), expected, rtol=1e-4, atol=1e-5)
    state = knn.state()
    assert state["index"].dtype == np.uint8
    rebuilt = _round_trip(knn, test, None)
    assert rebuilt.normalise is normalise
    with pytest.raises(StaleStoreError, match="normalise"):
        KNN.from_state(state, normalise=not normalise)
    fewer = KNN.from_state(state, k=1)
    np.testing.assert_allclose(
        fewer.score(test, None), -distances.min(axis=1), rtol=1e-4, atol=1e-5
    )


def test_knn_rejects_k_above_the_training_size(features):
    train, test, *_ = features
    with pytest.raises(BadInputError, match="k=61 exceeds the 60 training samples"):
        KNN(k=61).fit(train, None)
    with pytest.raises(BadInputError, match="exceeds the 60"):
        KNN.from_state(KNN(k=5).fit(train, None).state(), k=100).score(test, None)


def test_zero_vectors_are_safe_for_knn():
    z = np.zeros((4, 3), np.float32)
    z[1:, 0] = 1.0
    scores = KNN(k=1).fit(Embedding(z=z), None).score(Embedding(z=z), None)
    np.testing.assert_allclose(scores, 0.0, atol=1e-6)


def test_embeddings_are_validated():
    with pytest.raises(BadInputError, match="NaN"):
        Embedding(z=np.array([[np.nan, 1.0]], np.float32))
    with pytest.raises(BadInputError, match=r"\(N, D\)"):
        Embedding(z=np.zeros(3, np.float32))
    with pytest.raises(BadInputError, match="labels"):
        Embedding(z=np.zeros((3, 2), np.float32), labels=np.zeros(2, np.int64))


def test_ensemble_closed_form():
    feature, gradient = np.array([1.0, -2.0, 3.5]), np.array([0.5, 4.0, -1.0])
    np.testing.assert_allclose(ensemble_scores(feature, gradient), [1.5, 2.0, 2.5])
    np.testing.assert_allclose(ensemble_scores(feature, gradient, alpha=0.5), [1.25, 0.0, 3.0])
    with pytest.raises(BadInputError, match="same samples"):
        ensemble_scores(feature, gradient[:2])
    with pytest.raises(BadInputError, match="gradient scores contain NaN"):
        ensemble_scores(feature, np.array([0.0, np.nan, 1.0]))


def test_residual_and_gnorm_scores_closed_form():
    from gradcli.scores import get_detector

    rng = np.random.default_rng(11)
    z = rng.normal(size=(6, 3))
    extra = rng.uniform(0.1, 2.0, size=6)
    gnorm = np.sqrt((z**2).sum(1) + extra)  # ‖G‖² = ‖z‖² + ‖residual‖²
    data = Embedding(z=z.astype(np.float32), gnorm=gnorm)
    residual = get_detector("residual").score(data, None)
    np.testing.assert_allclose(residual, -np.sqrt(extra) / gnorm, rtol=1e-5)
    np.testing.assert_allclose(get_detector("gnorm").score(data, None), -gnorm)  # higher = ID
    with pytest.raises(BadInputError, match="re-embed"):
        get_detector("residual").score(Embedding(z=z.astype(np.float32)), None)


def test_a_readout_of_another_width_and_non_numeric_embeddings_are_refused():
    rng = np.random.default_rng(4)
    train = Embedding(z=rng.normal(size=(30, D)).astype(np.float32), labels=rng.integers(0, C, 30))
    narrow = Embedding(z=np.zeros((6, D - 1), np.float32), name="narrow")
    readout = Readout.from_linear(rng.normal(size=(C, D)))
    for method in ("msp", "energy", "react"):
        detector = get_detector(method).fit(train, readout)
        with pytest.raises(BadInputError, match=f"narrow has {D - 1} dimensions but the readout"):
            detector.score(narrow, readout)
    with pytest.raises(BadInputError, match="must hold numbers"):
        Embedding(z=[["a"]])
    with pytest.raises(BadInputError, match="whole class indices"):
        Embedding(z=np.zeros((2, D)), labels=[0.5, 1.0])
    floats = Embedding(z=np.zeros((2, D)), labels=np.array([1.0, -1.0]))
    assert floats.labels.dtype == np.int64 and floats.labels.tolist() == [1, -1]


def test_resolve_methods_expands_all_and_refuses_unknown_names():
    from gradcli.scores import resolve_methods

    assert resolve_methods(["all"]) == list(BASE_METHODS) == resolve_methods([])
    assert resolve_methods(["all", "odin"]) == [*BASE_METHODS, "odin"]
    assert resolve_methods(["knn", "msp", "knn"]) == ["knn", "msp"]
    assert "odin" not in BASE_METHODS  # it needs the images again: only by name
    with pytest.raises(BadInputError, match="unknown method 'knnn'"):
        resolve_methods(["knnn"])
