"""OOD detection metrics: FPR at a fixed TPR, AUROC, AUPR-In and AUPR-Out.

Scores follow one sign convention everywhere: higher = more in-distribution (ID). Every function
takes ID scores (N,) and OOD scores (M,) as 1-D arrays of any real dtype or tensors, read as
float64; empty, non-finite or non-numeric input is a one-line ``BadInputError``. Two
conventions for FPR95 exist in the literature and give different numbers on the same scores,
so every result names the one it used (see ``CONVENTIONS``).
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from numpy.typing import ArrayLike
from sklearn.metrics import average_precision_score, roc_auc_score

from gradcli.errors import BadInputError

CONVENTIONS: dict[str, str] = {
    "paper": (
        "ID positive: threshold at the 5th percentile of ID scores; "
        "FPR95 = share of OOD scores at or above it"
    ),
    "openood": (
        "OOD positive, as OpenOOD computes it: threshold at the lowest OOD score at or below "
        "which at least 95% of OOD samples lie (the first ROC point reaching TPR 0.95); FPR95 = "
        "share of ID scores at or below it"
    ),
}


def _check_scores(scores: ArrayLike, which: str) -> np.ndarray:
    """Return ``scores`` as a 1-D float64 array; reject empty, non-1-D, non-numeric and
    non-finite input. Tensors (on any device, with or without grad) are taken as values."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu()
    try:
        array = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError):
        raise BadInputError(f"{which} scores must be numbers (one score per sample)") from None
    if array.ndim != 1:
        raise BadInputError(
            f"{which} scores must be a 1-D array (one score per sample), got shape {array.shape}"
        )
    if array.size == 0:
        raise BadInputError(f"{which} scores are empty: score a non-empty {which} dataset")
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise BadInputError(
            f"{which} scores contain {bad} NaN/Inf values: check the embeddings and rescore"
        )
    return array


def check_tpr(tpr: float) -> float:
    """``tpr`` as a float, or a one-line error when it is not in (0, 1]."""
    if isinstance(tpr, bool) or not isinstance(tpr, numbers.Real) or not 0.0 < tpr <= 1.0:
        raise BadInputError(
            f"the target TPR must be in (0, 1], got {tpr}: e.g. --tpr 0.95 accepts 95% of ID data"
        )
    return float(tpr)


def _paper_threshold(id_scores: np.ndarray, tpr: float) -> float:
    return float(np.percentile(id_scores, 100.0 * (1.0 - tpr)))


def threshold_at_tpr(id_scores: ArrayLike, tpr: float = 0.95) -> float:
    """The paper's threshold λ: the score at or above which ``tpr`` of the ID samples lie.

    ``np.percentile(id_scores, 100·(1 − tpr))`` (linear interpolation), the threshold FPR95
    uses; a sample with score ``>= λ`` is accepted as ID, one below is flagged OOD.
    """
    return _paper_threshold(_check_scores(id_scores, "ID"), check_tpr(tpr))


def _openood_threshold(ood_scores: np.ndarray, tpr: float) -> float:
    # The smallest score with at least ``tpr`` of OOD at or below it: no interpolation, as
    # OpenOOD's first point of sklearn's ROC curve with TPR >= tpr.
    return float(np.quantile(ood_scores, tpr, method="inverted_cdf"))


def fpr_at_tpr(id_scores: ArrayLike, ood_scores: ArrayLike, tpr: float = 0.95) -> float:
    """False-positive rate on OOD data when ``tpr`` of the ID data is accepted (ID positive).

    threshold = ``np.percentile(id_scores, 100·(1 − tpr))`` (linear interpolation);
    FPR = share of OOD scores ``>=`` threshold.
    """
    tpr = check_tpr(tpr)
    id_array = _check_scores(id_scores, "ID")
    ood_array = _check_scores(ood_scores, "OOD")
    threshold = _paper_threshold(id_array, tpr)
    return float(np.mean(ood_array >= threshold))


def fpr_at_tpr_openood(id_scores: ArrayLike, ood_scores: ArrayLike, tpr: float = 0.95) -> float:
    """OpenOOD's variant (OOD positive): FPR on ID data when ``tpr`` of the OOD data is flagged.

    threshold = the lowest OOD score with at least ``tpr`` of the OOD scores ``<=`` it
    (``np.quantile(..., method="inverted_cdf")``, OpenOOD's first ROC point reaching ``tpr``);
    a score ``<=`` threshold flags OOD; FPR = share of ID scores ``<=`` threshold.
    """
    tpr = check_tpr(tpr)
    id_array = _check_scores(id_scores, "ID")
    ood_array = _check_scores(ood_scores, "OOD")
    threshold = _openood_threshold(ood_array, tpr)
    return float(np.mean(id_array <= threshold))


def _labelled(id_array: np.ndarray, ood_array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated scores (float64) and labels (1 = ID, 0 = OOD)."""
    scores = np.concatenate([id_array, ood_array])
    labels = np.concatenate([np.ones(id_array.size, np.int64), np.zeros(ood_array.size, np.int64)])
    return scores, labels


def auroc(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Area under the ROC curve with ID as the positive class (symmetric in the convention)."""
    scores, labels = _labelled(_check_scores(id_scores, "ID"), _check_scores(ood_scores, "OOD"))
    return float(roc_auc_score(labels, scores))


def aupr_in(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Average precision with ID as the positive class, scores as they are."""
    scores, labels = _labelled(_check_scores(id_scores, "ID"), _check_scores(ood_scores, "OOD"))
    return float(average_precision_score(labels, scores))


def aupr_out(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Average precision with OOD as the positive class, scores negated."""
    scores, labels = _labelled(_check_scores(id_scores, "ID"), _check_scores(ood_scores, "OOD"))
    return float(average_precision_score(1 - labels, -scores))


def evaluate_scores(
    id_scores: ArrayLike, ood_scores: ArrayLike, *, convention: str = "paper"
) -> dict[str, float]:
    """All metrics for one ID/OOD pair: ``fpr95`` (per ``convention``), ``auroc``, ``aupr_in``,
    ``aupr_out`` and ``id_acceptance``, the share of ID samples the FPR95 threshold accepts as
    ID (about 0.95 under "paper", a sanity check; ``1 − fpr95`` under "openood").
    """
    if convention not in CONVENTIONS:
        raise BadInputError(
            f"unknown FPR convention {convention!r}: use one of {', '.join(CONVENTIONS)}"
        )
    id_array = _check_scores(id_scores, "ID")
    ood_array = _check_scores(ood_scores, "OOD")
    if convention == "paper":
        threshold = _paper_threshold(id_array, 0.95)
        fpr95 = float(np.mean(ood_array >= threshold))
        id_acceptance = float(np.mean(id_array >= threshold))
    else:
        threshold = _openood_threshold(ood_array, 0.95)
        fpr95 = float(np.mean(id_array <= threshold))
        id_acceptance = float(np.mean(id_array > threshold))
    return {
        "fpr95": fpr95,
        "auroc": auroc(id_array, ood_array),
        "aupr_in": aupr_in(id_array, ood_array),
        "aupr_out": aupr_out(id_array, ood_array),
        "id_acceptance": id_acceptance,
    }
