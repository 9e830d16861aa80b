import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from gradcli.errors import BadInputError
from gradcli.metrics import (
    CONVENTIONS,
    aupr_in,
    aupr_out,
    auroc,
    evaluate_scores,
    fpr_at_tpr,
    fpr_at_tpr_openood,
)


def _roc_fpr_at_tpr(positive: np.ndarray, negative: np.ndarray, tpr: float) -> float:
    """FPR at the first ROC point reaching ``tpr`` (positives score high)."""
    labels = np.r_[np.ones(positive.size), np.zeros(negative.size)]
    fprs, tprs, _ = roc_curve(labels, np.r_[positive, negative], drop_intermediate=False)
    return float(fprs[np.searchsorted(tprs, tpr, side="left")])


def test_fpr_hand_computed():
    id_scores = np.arange(1.0, 21.0)  # 5th percentile: 1 + 0.05·19 = 1.95
    ood_scores = np.array([0.5, 1.94, 1.96, 2.0, 10.0, 12.0])
    assert fpr_at_tpr(id_scores, ood_scores) == pytest.approx(4 / 6)
    # OpenOOD: 95% of 6 OOD scores needs all 6, so the threshold is 12; ID <= 12 → 12 of 20
    # (no interpolation: 11.5, the interpolated 95th percentile, would flag only 5 of 6).
    assert fpr_at_tpr_openood(id_scores, ood_scores) == pytest.approx(12 / 20)
    assert fpr_at_tpr(id_scores, ood_scores, tpr=0.5) == pytest.approx(1 / 6)  # threshold 10.5


def test_metrics_match_sklearn_and_roc_curve():
    rng = np.random.default_rng(0)
    # 201 samples put the 5th/95th percentile exactly on a sample, where ROC points sit.
    id_scores = rng.normal(1.0, 1.0, 201)
    ood_scores = rng.normal(0.0, 1.0, 201)
    assert fpr_at_tpr(id_scores, ood_scores) == pytest.approx(
        _roc_fpr_at_tpr(id_scores, ood_scores, 0.95)
    )
    assert fpr_at_tpr_openood(id_scores, ood_scores) == pytest.approx(
        _roc_fpr_at_tpr(-ood_scores, -id_scores, 0.95)
    )
    labels = np.r_[np.ones(201), np.zeros(201)]
    scores = np.r_[id_scores, ood_scores]
    assert auroc(id_scores, ood_scores) == pytest.approx(roc_auc_score(labels, scores))
    assert aupr_in(id_scores, ood_scores) == pytest.approx(average_precision_score(labels, scores))
    assert aupr_out(id_scores, ood_scores) == pytest.approx(
        average_precision_score(1 - labels, -scores)
    )
    assert aupr_in(id_scores, ood_scores) != pytest.approx(aupr_out(id_scores, ood_scores))


@pytest.mark.parametrize("n_ood", [137, 200, 203])
def test_openood_fpr_is_openood_s_own_computation(n_ood):
    """OpenOOD: roc_curve with OOD positive on negated scores, FPR at the first TPR >= 0.95;
    sample counts where 95% falls between samples, and tied scores."""
    rng = np.random.default_rng(n_ood)
    id_scores = np.round(rng.normal(1.0, 1.0, 311), 1)  # rounding makes ties
    ood_scores = np.round(rng.normal(0.0, 1.0, n_ood), 1)
    indicator = np.r_[np.zeros(id_scores.size), np.ones(ood_scores.size)]
    fprs, tprs, _ = roc_curve(indicator, -np.r_[id_scores, ood_scores])
    assert fpr_at_tpr_openood(id_scores, ood_scores) == fprs[np.argmax(tprs >= 0.95)]


def test_evaluate_scores_conventions():
    rng = np.random.default_rng(1)
    id_scores = rng.normal(2.0, 1.0, 300)
    ood_scores = rng.normal(0.0, 1.5, 400)
    paper = evaluate_scores(id_scores, ood_scores)
    assert set(paper) == {"fpr95", "auroc", "aupr_in", "aupr_out", "id_acceptance"}
    assert paper["fpr95"] == fpr_at_tpr(id_scores, ood_scores)
    threshold = np.percentile(id_scores, 5)
    assert paper["id_acceptance"] == pytest.approx(np.mean(id_scores >= threshold))
    assert paper["id_acceptance"] == pytest.approx(0.95, abs=1 / 300)
    openood = evaluate_scores(id_scores, ood_scores, convention="openood")
    assert openood["fpr95"] == fpr_at_tpr_openood(id_scores, ood_scores)
    assert openood["fpr95"] != paper["fpr95"]
    assert openood["auroc"] == paper["auroc"]
    assert set(CONVENTIONS) == {"paper", "openood"}
    with pytest.raises(BadInputError, match="paper, openood"):
        evaluate_scores(id_scores, ood_scores, convention="other")


def test_perfect_separation():
    result = evaluate_scores(np.linspace(5, 6, 50), np.linspace(0, 1, 70))
    assert result["fpr95"] == 0.0
    assert result["auroc"] == result["aupr_in"] == result["aupr_out"] == 1.0


@pytest.mark.parametrize(
    ("id_scores", "ood_scores", "which"),
    [
        ([], [1.0], "ID"),
        ([1.0], [], "OOD"),
        ([1.0, np.nan], [1.0], "ID"),
        ([1.0], [np.inf, 0.0], "OOD"),
        ([[1.0, 2.0]], [1.0], "ID"),
    ],
)
def test_bad_scores_name_the_set(id_scores, ood_scores, which):
    for metric in (fpr_at_tpr, fpr_at_tpr_openood, auroc, aupr_in, aupr_out, evaluate_scores):
        with pytest.raises(BadInputError, match=f"^{which} scores"):
            metric(id_scores, ood_scores)


def test_tensors_are_taken_as_values_and_non_numbers_refused():
    import torch

    rng = np.random.default_rng(3)
    positive, negative = rng.normal(1, 1, 200), rng.normal(0, 1, 150)
    tracked = torch.tensor(positive, requires_grad=True)
    assert fpr_at_tpr(tracked, torch.tensor(negative)) == fpr_at_tpr(positive, negative)
    assert auroc(tracked, negative) == pytest.approx(
        roc_auc_score(np.r_[np.ones(200), np.zeros(150)], np.r_[positive, negative])
    )
    with pytest.raises(BadInputError, match="ID scores must be numbers"):
        fpr_at_tpr(["a", "b"], negative)
    for tpr in ("0.95", None, True):
        with pytest.raises(BadInputError, match=r"in \(0, 1\]"):
            fpr_at_tpr(positive, negative, tpr)
