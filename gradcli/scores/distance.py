"""Distance-based scores: Mahalanobis distance to class means, and k-th nearest neighbour."""

from __future__ import annotations

from collections.abc import Mapping

import faiss
import numpy as np

from gradcli.errors import BadInputError
from gradcli.scores.base import SCORE_BATCH, Detector, Embedding, Readout, StateValue, scalar


def _check_dims(fitted_dims: int, data: Embedding, method: str) -> None:
    if data.z.shape[1] != fitted_dims:
        raise BadInputError(
            f"{method} was fitted on {fitted_dims}-dim embeddings but {data.name} has "
            f"{data.z.shape[1]}: refit it on the matching training embedding"
        )


class Mahalanobis(Detector):
    """Class-conditional Gaussians with one shared covariance: ``max_c −(z−μ_c)ᵀ Σ⁻¹ (z−μ_c)``.

    Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples
    and Adversarial Attacks", NeurIPS 2018 (without input preprocessing or layer ensembles).
    μ_c are the class means of the labelled training embedding, Σ = (1/N) Σ_i (z_i − μ_{y_i})
    (z_i − μ_{y_i})ᵀ, inverted with a pseudo-inverse so a singular Σ still works.
    """

    name = "maha"

    def __init__(self) -> None:
        super().__init__()
        self.classes: np.ndarray | None = None  # (C,) int64, the labels present
        self.means: np.ndarray | None = None  # (C, D) float64
        self.precision: np.ndarray | None = None  # (D, D) float64, pinv(Σ)

    def _fit(self, train: Embedding, readout: Readout | None) -> None:
        labels = train.labels
        if labels is None or (labels < 0).any():
            raise BadInputError(
                "maha needs a labelled ID training set: embed the training split with its labels"
            )
        classes, class_index = np.unique(labels, return_inverse=True)
        num_dims = train.z.shape[1]
        means = np.empty((classes.size, num_dims))
        for c in range(classes.size):
            means[c] = train.z[class_index == c].mean(axis=0, dtype=np.float64)
        covariance = np.zeros((num_dims, num_dims))
        for start in range(0, len(train), SCORE_BATCH):
            rows = slice(start, start + SCORE_BATCH)
            centred = train.z[rows].astype(np.float64) - means[class_index[rows]]
            covariance += centred.T @ centred
        covariance /= len(train)
        self.classes = classes.astype(np.int64)
        self.means = means
        self.precision = np.linalg.pinv(covariance, hermitian=True)

    def _score(self, data: Embedding, readout: Readout | None) -> np.ndarray:
        _check_dims(self.means.shape[1], data, self.name)
        # Expand (z−μ)ᵀP(z−μ) = zᵀPz − 2zᵀPμ + μᵀPμ: one matrix product for all classes.
        # Centring on the mean of the class means first keeps the cancellation small.
        origin = self.means.mean(axis=0)
        means = self.means - origin
        means_p = means @ self.precision
        means_quad = np.einsum("cd,cd->c", means_p, means)
        scores = np.empty(len(data))
        for start in range(0, len(data), SCORE_BATCH):
            z = data.z[start : start + SCORE_BATCH].astype(np.float64) - origin
            z_quad = np.einsum("nd,nd->n", z @ self.precision, z)
            distances = z_quad[:, None] - 2.0 * (z @ means_p.T) + means_quad[None, :]
            scores[start : start + SCORE_BATCH] = -np.maximum(distances.min(axis=1), 0.0)
        return scores

    def _state(self) -> dict[str, StateValue]:
        return {"classes": self.classes, "means": self.means, "precision": self.precision}

    def _load_state(self, state: Mapping[str, StateValue]) -> None:
        self.classes = np.asarray(state["classes"], dtype=np.int64)
        self.means = np.asarray(state["means"], dtype=np.float64)
        self.precision = np.asarray(state["precision"], dtype=np.float64)


class KNN(Detector):
    """Deep nearest neighbours: ``−‖ẑ − ẑ_(k)‖``, the distance to the k-th nearest training
    embedding, with ``ẑ = z / ‖z‖`` when ``normalise`` (default).

    Sun, Ming, Zhu & Li, "Out-of-Distribution Detection with Deep Nearest Neighbors",
    ICML 2022. Exact search with a FAISS ``IndexFlatL2``; the fitted state is the serialised
    index (uint8 array).
    """

    name = "knn"
    option_names = ("k", "normalise")
    fit_option_names = ("normalise",)

    def __init__(self, k: int = 50, normalise: bool = True) -> None:
        super().__init__()
        if int(k) != k or k < 1:
            raise BadInputError(f"knn: --knn-k must be a positive integer, got {k}")
        self.k = int(k)
        self.normalise = bool(normalise)
        self.index: faiss.Index | None = None

    def _prepare(self, z: np.ndarray) -> np.ndarray:
        """Float32 C-contiguous (n, D) rows, L2-normalised if asked."""
        z = np.ascontiguousarray(z, dtype=np.float32)
        if self.normalise:
            norms = np.linalg.norm(z, axis=1, keepdims=True)
            z = np.ascontiguousarray(z / np.maximum(norms, np.float32(1e-12)))
        return z

    def _check_k(self, num_train: int) -> None:
        if self.k > num_train:
            raise BadInputError(
                f"knn: k={self.k} exceeds the {num_train} training samples: "
                f"refit with 'gradcli fit-head --knn-k {num_train}' (or a smaller k)"
            )

    def _fit(self, train: Embedding, readout: Readout | None) -> None:
        self._check_k(len(train))
        index = faiss.IndexFlatL2(train.z.shape[1])
        for start in range(0, len(train), SCORE_BATCH):
            index.add(self._prepare(train.z[start : start + SCORE_BATCH]))
        self.index = index

    def _score(self, data: Embedding, readout: Readout | None) -> np.ndarray:
        _check_dims(self.index.d, data, self.name)
        self._check_k(self.index.ntotal)
        scores = np.empty(len(data))
        for start in range(0, len(data), SCORE_BATCH):
            squared, _ = self.index.search(
                self._prepare(data.z[start : start + SCORE_BATCH]), self.k
            )
            scores[start : start + SCORE_BATCH] = -np.sqrt(np.maximum(squared[:, -1], 0.0))
        return scores

    def _state(self) -> dict[str, StateValue]:
        return {"normalise": int(self.normalise), "index": faiss.serialize_index(self.index)}

    def _load_state(self, state: Mapping[str, StateValue]) -> None:
        stored = np.ascontiguousarray(np.asarray(state["index"]), dtype=np.uint8)
        self.index = faiss.deserialize_index(stored)
        self.normalise = bool(scalar(state.get("normalise", self.normalise)))
