"""Forward-feature baselines: MaxLogit, GradNorm, ViM on the stored features; ODIN on images.

MaxLogit, GradNorm and ViM need only what ``embed`` stores (penultimate features and the
model's last Linear layer). ODIN needs the model and the images themselves (an input-gradient
step, then a second forward pass), so it is an ``InputDetector``: ``Run.score`` runs it as a
batched model pass over the embedded dataset, and only when it is asked for by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from gradcli.errors import BadInputError
from gradcli.scores.base import (
    SCORE_BATCH,
    Detector,
    Embedding,
    Readout,
    StateValue,
    readout_logits,
    require_readout,
    scalar,
)

ODIN_TEMPERATURE = 1000.0  # ODIN's defaults (Liang et al., ICLR 2018)
ODIN_EPSILON = 0.0014


def _check_temperature(temperature: float, method: str, option: str) -> float:
    if not (temperature > 0 and np.isfinite(temperature)):
        raise BadInputError(f"{method}: {option} must be a positive number, got {temperature}")
    return float(temperature)


def _feature_readout(readout: Readout | None, method: str) -> Readout:
    readout = require_readout(readout, method)
    if readout.kind != "feat":
        raise BadInputError(
            f"{method} works on penultimate features and the model's last Linear layer, "
            f"not on {readout.kind!r} embeddings: score it with --embedding feat"
        )
    return readout


class MaxLogit(Detector):
    """Maximum logit, ``max_c f_c(x)``.

    Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt & Song, "Scaling
    Out-of-Distribution Detection for Real-World Settings", ICML 2022. Logits come from the
    readout (the model's last Linear layer for features, the head for gradients) or from the
    stored logits. Nothing to fit.
    """

    name = "maxlogit"
    needs_fit = False

    def _score(self, data: Embedding, readout: Readout | None) -> np.ndarray:
        return readout_logits(data, readout, self.name).amax(dim=1).numpy()


class GradNorm(Detector):
    """L1 norm of the last Linear layer's weight gradient of ``KL(u ‖ softmax(f(x)/T))``.

    Huang, Geng & Li, "On the Importance of Gradients for Detecting Distributional Shifts in
    the Wild", NeurIPS 2021. With ``f = W h + b`` (W: C × D, h the penultimate features) and u
    the uniform distribution over the C classes,
    ``KL(u ‖ p) = −(1/C) Σ_c log p_c − log C`` with ``p = softmax(f/T)``, so
    ``∂KL/∂f_j = (p_j − 1/C)/T`` and ``∂KL/∂W_jk = (p_j − 1/C) h_k / T``: an outer product,
    whose L1 norm factorises as ``(1/T)·Σ_j |p_j − 1/C| · Σ_k |h_k|``. That is computed for all
    samples at once, without any backward pass. (The authors' code uses all-ones targets
    instead of 1/C, which multiplies every score by C and ranks samples identically.)
    ``temperature`` T > 0 (default 1, as the paper). Nothing to fit.
    """

    name = "gradnorm"
    option_names = ("temperature",)
    needs_fit = False
    needs_readout = True
    kinds = ("feat",)

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature, self.name, "--gradnorm-temperature")

    def _score(self, data: Embedding, readout: Readout | None) -> np.ndarray:
        readout = _feature_readout(readout, self.name)
        logits = readout_logits(data, readout, self.name)
        probabilities = torch.softmax(logits / self.temperature, dim=1)
        output_l1 = (probabilities - 1.0 / logits.shape[1]).abs().sum(dim=1) / self.temperature
        feature_l1 = np.abs(np.asarray(data.z, dtype=np.float64)).sum(axis=1)
        return output_l1.numpy() * feature_l1


def vim_default_dim(feature_dim: int) -> int:
    """ViM's principal dimension for ``feature_dim``-dim features, as the paper chooses it.

    1000 when ``feature_dim >= 1500``, 512 when ``feature_dim >= 768``, else
    ``feature_dim // 2``. (The authors' benchmark script switches to 1000 only at 2048, the
    width of its ResNet/BiT models; the two agree on every model it evaluates.)
    """
    if feature_dim >= 1500:
        return 1000
    if feature_dim >= 768:
        return 512
    return feature_dim // 2


class ViM(Detector):
    """Virtual-logit matching: ``logsumexp(f(x)) − α·‖(h − u)ᵀ R‖``.

    Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022.
    ``u = −pinv(W)·b`` is the origin the last Linear layer (W: C × D, b) maps to zero logits;
    the principal subspace is spanned by the top ``dim`` eigenvectors (``numpy.linalg.eigh``) of
    ``(1/N) Σ (h_i − u)(h_i − u)ᵀ`` over the ID training features, and R (D × (D − dim)) holds
    the remaining ones, so ``‖(h − u)ᵀ R‖`` is the norm of the residual ``x^{P⊥}``.
    ``α = mean_i max_c f_c(h_i) / mean_i ‖(h_i − u)ᵀ R‖`` over the training set. The score is
    the paper's (and its code's) ``energy − virtual logit``: minus the log-odds of the virtual
    class, higher = more in-distribution.

    ``dim`` defaults to :func:`vim_default_dim` of the feature width; it must leave at least
    one residual dimension. Fitted on the ID training features.
    """

    name = "vim"
    option_names = ("dim",)
    fit_option_names = ("dim",)
    needs_readout = True
    kinds = ("feat",)

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        if dim is not None and (int(dim) != dim or dim < 0):
            raise BadInputError(f"vim: --vim-dim must be a non-negative integer, got {dim}")
        self.dim = None if dim is None else int(dim)
        self.principal_dim: int | None = None
        self.origin: np.ndarray | None = None  # (D,) float64, u
        self.residual_basis: np.ndarray | None = None  # (D, D - dim) float64, R
        self.alpha: float | None = None

    def _residual_norm(self, z: np.ndarray) -> np.ndarray:
        """‖(h − u)ᵀ R‖ per row, float64 (N,), in batches."""
        out = np.empty(z.shape[0])
        for start in range(0, z.shape[0], SCORE_BATCH):
            centred = np.asarray(z[start : start + SCORE_BATCH], np.float64) - self.origin
            out[start : start + SCORE_BATCH] = np.linalg.norm(centred @ self.residual_basis, axis=1)
        return out

    def _fit(self, train: Embedding, readout: Readout | None) -> None:
        readout = _feature_readout(readout, self.name)
        if readout.weight is None:
            raise BadInputError(
                "vim needs the weight and bias of the model's last Linear layer: use the "
                "default --feature-layer"
            )
        num_dims = train.z.shape[1]
        dim = vim_default_dim(num_dims) if self.dim is None else self.dim
        if dim >= num_dims:
            raise BadInputError(
                f"vim: --vim-dim {dim} leaves no residual of the {num_dims}-dim features: "
                f"use at most {num_dims - 1}"
            )
        bias = np.zeros(readout.weight.shape[0]) if readout.bias is None else readout.bias
        self.origin = -np.linalg.pinv(readout.weight) @ bias
        covariance = np.zeros((num_dims, num_dims))
        for start in range(0, len(train), SCORE_BATCH):
            centred = np.asarray(train.z[start : start + SCORE_BATCH], np.float64) - self.origin
            covariance += centred.T @ centred
        covariance /= len(train)
        values, vectors = np.linalg.eigh(covariance)
        order = np.argsort(-values, kind="stable")
        self.residual_basis = np.ascontiguousarray(vectors[:, order[dim:]])
        self.principal_dim = dim
        residual = self._residual_norm(train.z).mean()
        if not residual > 0:
            raise BadInputError(
                f"vim: the training features have no residual outside the top {dim} "
                "principal directions: use a smaller --vim-dim"
            )
        max_logit = readout_logits(train, readout, self.name).amax(dim=1).mean().item()
        self.alpha = float(max_logit / residual)

    def _score(self, data: Embedding, readout: Readout | None) -> np.ndarray:
        readout = _feature_readout(readout, self.name)
        if data.z.shape[1] != self.origin.shape[0]:
            raise BadInputError(
                f"vim was fitted on {self.origin.shape[0]}-dim features but {data.name} has "
                f"{data.z.shape[1]}: refit it on the matching training embedding"
            )
        energy = torch.logsumexp(readout_logits(data, readout, self.name), dim=1).numpy()
        return energy - self.alpha * self._residual_norm(data.z)

    def _state(self) -> dict[str, StateValue]:
        return {
            "principal_dim": self.principal_dim,
            "origin": self.origin,
            "residual_basis": self.residual_basis,
            "alpha": self.alpha,
        }

    def _load_state(self, state: Mapping[str, StateValue]) -> None:
        self.principal_dim = int(scalar(state["principal_dim"]))
        self.origin = np.asarray(state["origin"], dtype=np.float64)
        self.residual_basis = np.asarray(state["residual_basis"], dtype=np.float64)
        self.residual_basis = self.residual_basis.reshape(self.origin.shape[0], -1)
        self.alpha = float(scalar(state["alpha"]))


class InputDetector:
    """A detector that scores preprocessed images with the model, not a stored embedding.

    Same small interface as :class:`~gradcli.scores.base.Detector` for listing and options
    (``name``, ``option_names``, ``kinds``, ``config``); scoring is
    ``score_inputs(module, x, std)``. Nothing is fitted.
    """

    name: ClassVar[str]
    option_names: ClassVar[tuple[str, ...]] = ()
    fit_option_names: ClassVar[tuple[str, ...]] = ()
    needs_fit: ClassVar[bool] = False
    needs_readout: ClassVar[bool] = False
    needs_inputs: ClassVar[bool] = True
    kinds: ClassVar[tuple[str, ...]] = ("feat",)

    def config(self) -> dict[str, Any]:
        """The options, as recorded in the scores' provenance."""
        return {option: getattr(self, option) for option in self.option_names}

    def score_inputs(
        self, module: torch.nn.Module, x: torch.Tensor, std: Sequence[float]
    ) -> np.ndarray:
        """Scores (B,) float64 of a batch ``x`` (B, C, H, W) of preprocessed images."""
        raise NotImplementedError

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({options})"


class ODIN(InputDetector):
    """Temperature-scaled maximum softmax of a slightly perturbed input.

    Liang, Li & Srikant, "Enhancing the Reliability of Out-of-distribution Image Detection in
    Neural Networks", ICLR 2018. With ŷ the predicted class and ``S_ŷ(x; T)`` its softmax
    probability at temperature T:

    ``x̃ = x − ε · sign(−∇_x log S_ŷ(x; T)) / σ``,  score ``max_c softmax(f(x̃)/T)_c``.

    ``x`` is the *preprocessed* (normalised) input, as in the reference code, and the sign
    step is divided by the per-channel std σ of the model's preprocessing, as the reference
    code also does: the step is ε in [0, 1] pixel units. ``sign(0)`` counts as +1 (the
    reference takes ``grad >= 0``). The whole batch goes through one forward, one backward
    to the input only (no parameter gradient is formed) and one more forward; in eval mode
    the samples are independent, so each row's gradient is its own. ``temperature`` T > 0
    (default 1000), ``epsilon`` ε >= 0 (default 0.0014; 0 skips the perturbation).
    """

    name = "odin"
    option_names = ("temperature", "epsilon")

    def __init__(
        self, temperature: float = ODIN_TEMPERATURE, epsilon: float = ODIN_EPSILON
    ) -> None:
        self.temperature = _check_temperature(temperature, self.name, "--odin-temperature")
        if not (epsilon >= 0 and np.isfinite(epsilon)):
            raise BadInputError(f"odin: --odin-epsilon must be 0 or more, got {epsilon}")
        self.epsilon = float(epsilon)

    def score_inputs(
        self, module: torch.nn.Module, x: torch.Tensor, std: Sequence[float]
    ) -> np.ndarray:
        if x.ndim != 4:
            raise BadInputError(f"odin needs image batches (B, C, H, W), got shape {x.shape}")
        x = x.detach()
        if self.epsilon > 0:
            scale = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
            with torch.enable_grad():
                leaf = x.clone().requires_grad_(True)
                logits = module(leaf) / self.temperature
                loss = torch.nn.functional.cross_entropy(
                    logits, logits.argmax(dim=1), reduction="sum"
                )
                (gradient,) = torch.autograd.grad(loss, leaf)
            step = torch.where(gradient >= 0, 1.0, -1.0).to(x.dtype) / scale
            x = x - self.epsilon * step
        with torch.no_grad():
            logits = module(x).double() / self.temperature
        return torch.softmax(logits, dim=1).amax(dim=1).cpu().numpy()
