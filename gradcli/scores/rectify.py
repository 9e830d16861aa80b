"""Rectified energy scores: clip or clamp the embedding before the last layer, then energy."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from gradcli.errors import BadInputError
from gradcli.scores.base import (
    Detector,
    Embedding,
    Readout,
    StateValue,
    check_clip_dims,
    energy_score,
    normalised,
    readout_logits,
    require_readout,
    scalar,
    trailing_bounds,
)

RULES: tuple[str, ...] = ("paper", "per-dim")


def paper_clip_dims(num_dims: int) -> int:
    """The default d of the paper's rule on K-dim reduced gradients: the trailing half,
    ``max(1, K // 2)``."""
    return max(1, num_dims // 2)


def _check_clip_option(clip_dims: int | None, method: str) -> int | None:
    if clip_dims is None:
        return None
    if int(clip_dims) != clip_dims or clip_dims < 1:
        raise BadInputError(f"{method}: --clip-dims must be a positive integer, got {clip_dims}")
    return int(clip_dims)


def _check_rule(rule: str, method: str) -> str:
    if rule not in RULES:
        raise BadInputError(
            f"{method}: --clip-rule must be one of {', '.join(RULES)}, got {rule!r}"
        )
    return rule


def _rectified_dims(clip_dims: int | None, rule: str, kind: str, num_dims: int, method: str) -> int:
    """How many trailing dimensions are rectified: ``clip_dims`` when given; otherwise the
    trailing half for the paper's rule on gradients, and every dimension for features or the
    per-dim rule."""
    if clip_dims is None and kind == "grad" and rule == "paper":
        return paper_clip_dims(num_dims)
    return check_clip_dims(clip_dims, num_dims, method)


def _check_kind(fitted_kind: str, readout: Readout, method: str) -> None:
    if readout.kind != fitted_kind:
        raise BadInputError(
            f"{method} was fitted on {fitted_kind!r} embeddings but is scoring {readout.kind!r} "
            "ones: fit it on the training embedding of the same kind"
        )


class ReAct(Detector):
    """Rectified activations: clip from above, then energy ``logsumexp(classify(min(h, τ)))``.

    Sun, Guo & Li, "ReAct: Out-of-distribution Detection With Rectified Activations",
    NeurIPS 2021. Here ``h = normalise(z)``.

    - Features (``kind="feat"``): one scalar threshold τ, the ``percentile``-th percentile of all
      training feature activations, as in the paper; every dimension (or the last
      ``clip_dims``) is clipped. ``rule`` does not apply.
    - Gradients (``kind="grad"``, Wu et al., TPAMI 2024): ``h`` is the head's BatchNorm output.
      ``rule="paper"`` (default) follows Wu et al.: only the last d dimensions of the reduced
      gradient (those beyond the leading, most informative ones) are clipped, at one threshold τ,
      the ``percentile``-th percentile of those d dimensions' values over the training set,
      pooled. d is ``clip_dims``, by default the trailing half ``max(1, K // 2)``: the paper
      rectifies the trailing dimensions but its d is not restated here, so the half is a
      chosen default. ``rule="per-dim"`` gives each dimension j its own τ_j, the percentile of
      h_j, and clips all of them (or the last ``clip_dims``).
    """

    name = "react"
    option_names = ("percentile", "clip_dims", "rule")
    fit_option_names = ("percentile", "clip_dims", "rule")
    needs_readout = True

    def __init__(
        self, percentile: float = 90.0, clip_dims: int | None = None, rule: str = "paper"
    ) -> None:
        super().__init__()
        if not 0.0 < percentile <= 100.0:
            raise BadInputError(f"react: --react-percentile must be in (0, 100], got {percentile}")
        self.percentile = float(percentile)
        self.clip_dims = _check_clip_option(clip_dims, self.name)
        self.rule = _check_rule(rule, self.name)
        self.kind: str | None = None
        self.thresholds: np.ndarray | None = None  # (1,) one threshold, or (D,) per dimension

    def _fit(self, train: Embedding, readout: Readout | None) -> None:
        readout = require_readout(readout, self.name)
        num_dims = train.z.shape[1]
        # refused now, not at scoring
        clip_dims = _rectified_dims(self.clip_dims, self.rule, readout.kind, num_dims, self.name)
        h = normalised(train.z, readout)
        if readout.kind == "feat":
            self.thresholds = np.atleast_1d(np.percentile(h, self.percentile)).astype(np.float64)
        elif self.rule == "paper":
            trailing = h[:, num_dims - clip_dims :]
            self.thresholds = np.atleast_1d(np.percentile(trailing, self.percentile))
            self.thresholds = self.thresholds.astype(np.float64)
        else:
            self.thresholds = np.percentile(h, self.percentile, axis=0).astype(np.float64)
        self.kind = readout.kind

    def _score(self, data: Embedding, readout: Readout | None) -> np.ndarray:
        readout = require_readout(readout, self.name)
        _check_kind(self.kind, readout, self.name)
        num_dims = data.z.shape[1]
        if self.thresholds.size not in (1, num_dims):
            raise BadInputError(
                f"react was fitted on {self.thresholds.size}-dim embeddings but {data.name} has "
                f"{num_dims}: refit it on the matching training embedding"
            )
        clip_dims = _rectified_dims(self.clip_dims, self.rule, self.kind, num_dims, self.name)
        _, upper = trailing_bounds(-np.inf, self.thresholds, num_dims, clip_dims)
        logits = readout_logits(data, readout, self.name, lambda h: torch.minimum(h, upper))
        return energy_score(logits)

    def _state(self) -> dict[str, StateValue]:
        return {"kind": self.kind, "thresholds": self.thresholds}

    def _load_state(self, state: Mapping[str, StateValue]) -> None:
        self.rule = _check_rule(str(scalar(state["rule"])), self.name)  # absent: an older fit
        self.kind = str(scalar(state["kind"]))
        self.thresholds = np.atleast_1d(np.asarray(state["thresholds"], dtype=np.float64))


class BATS(Detector):
    """Batch-normalisation-assisted truncation: clamp ``h`` to ``[μ − λσ, μ + λσ]``, then energy.

    Zhu, Chen, Xie, Liu, Li & Zhang, "Boosting Out-of-distribution Detection with Typical
    Features", NeurIPS 2022.

    - Gradients (``kind="grad"``, Wu et al., TPAMI 2024): ``h`` is the head's BatchNorm output and
      μ = β, σ = |γ|, the BN's affine bias and weight, as in the paper (whose BN precedes the
      features). Nothing is learnt from the training set.
    - Features (``kind="feat"``): in general no BN directly precedes the penultimate features,
      so μ and σ are each dimension's mean and (population) standard deviation over the
      training features.

    Which dimensions are clamped: on gradients with ``rule="paper"`` (default), as in Wu et
    al., only the last d, d = ``clip_dims`` or by default the trailing half ``max(1, K // 2)``
    (see :class:`ReAct`); with ``rule="per-dim"``, and on features, the last ``clip_dims`` or
    by default all of them. ``lam`` is λ > 0 (default 1).
    """

    name = "bats"
    option_names = ("lam", "clip_dims", "rule")
    needs_readout = True

    def __init__(self, lam: float = 1.0, clip_dims: int | None = None, rule: str = "paper") -> None:
        super().__init__()
        if not lam > 0:
            raise BadInputError(f"bats: --bats-lambda must be positive, got {lam}")
        self.lam = float(lam)
        self.clip_dims = _check_clip_option(clip_dims, self.name)
        self.rule = _check_rule(rule, self.name)
        self.kind: str | None = None
        self.feature_mean: np.ndarray | None = None  # (D,), features only
        self.feature_std: np.ndarray | None = None

    def _fit(self, train: Embedding, readout: Readout | None) -> None:
        readout = require_readout(readout, self.name)
        # refused now, not at scoring
        _rectified_dims(self.clip_dims, self.rule, readout.kind, train.z.shape[1], self.name)
        self.kind = readout.kind
        if readout.kind == "feat":
            h = normalised(train.z, readout)
            self.feature_mean = h.mean(axis=0, dtype=np.float64)
            self.feature_std = h.std(axis=0, dtype=np.float64)

    def _centre_and_spread(self, readout: Readout) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "feat":
            return self.feature_mean, self.feature_std
        if readout.bn_weight is None or readout.bn_bias is None:
            raise BadInputError(
                "bats on gradients needs the head's BatchNorm parameters: pass the readout built "
                "from the fitted head"
            )
        return np.asarray(readout.bn_bias, np.float64), np.abs(np.asarray(readout.bn_weight))

    def _score(self, data: Embedding, readout: Readout | None) -> np.ndarray:
        readout = require_readout(readout, self.name)
        _check_kind(self.kind, readout, self.name)
        centre, spread = self._centre_and_spread(readout)
        num_dims = data.z.shape[1]
        if centre.shape != (num_dims,):
            raise BadInputError(
                f"bats bounds have {centre.size} dimensions but {data.name} has {num_dims}: "
                "refit on the matching training embedding"
            )
        clip_dims = _rectified_dims(self.clip_dims, self.rule, self.kind, num_dims, self.name)
        lower, upper = trailing_bounds(
            centre - self.lam * spread, centre + self.lam * spread, num_dims, clip_dims
        )
        logits = readout_logits(data, readout, self.name, lambda h: h.clamp(lower, upper))
        return energy_score(logits)

    def _state(self) -> dict[str, StateValue]:
        state: dict[str, StateValue] = {"kind": self.kind}
        if self.kind == "feat":
            state.update(feature_mean=self.feature_mean, feature_std=self.feature_std)
        return state

    def _load_state(self, state: Mapping[str, StateValue]) -> None:
        self.kind = str(scalar(state["kind"]))
        if self.kind == "feat":
            self.feature_mean = np.asarray(state["feature_mean"], dtype=np.float64)
            self.feature_std = np.asarray(state["feature_std"], dtype=np.float64)
