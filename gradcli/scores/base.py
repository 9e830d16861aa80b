"""The interface every OOD detector implements, and the data it works on.

A detector learns what it needs from the ID training embedding in ``fit`` and never refits in
``score``; ``state`` / ``from_state`` move the fitted part to and from the run store as plain
arrays and scalars. All scores are "higher = more in-distribution".

Embeddings are either forward features (penultimate layer, ``kind="feat"``) or reduced gradients
(``kind="grad"``). A ``Readout`` maps an embedding to logits in two steps, ``normalise`` then
``classify``, so rectifying detectors (ReAct, BATS) can act in between: for features the steps
are the identity and the model's last Linear layer; for gradients the head's BatchNorm (eval
mode) and its Linear layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from numpy.typing import ArrayLike

from gradcli.errors import BadInputError, StaleStoreError

EMBEDDING_KINDS: tuple[str, ...] = ("feat", "grad")

# Rows per batch when pushing embeddings through a readout or an index: bounds temporary memory.
SCORE_BATCH = 4096

StateValue = np.ndarray | float | int | str
DetectorT = TypeVar("DetectorT", bound="Detector")


def identity(x: torch.Tensor) -> torch.Tensor:
    """The ``normalise`` step of feature readouts."""
    return x


@dataclass
class Readout:
    """Embedding → logits in two steps: ``classify(normalise(z))``.

    ``normalise``/``classify`` take and return float32 tensors (B, D) → (B, D) → (B, C).
    ``bn_weight``/``bn_bias`` (D,) are the BatchNorm's affine parameters γ, β, set for gradient
    readouts (BATS needs them) and ``None`` for features. ``weight`` (C, D) and ``bias`` (C,)
    float64 are the last Linear layer's parameters, set for feature readouts (ViM needs them;
    ``bias`` is ``None`` for a layer without one).
    """

    normalise: Callable[[torch.Tensor], torch.Tensor]
    classify: Callable[[torch.Tensor], torch.Tensor]
    kind: str
    bn_weight: np.ndarray | None = None
    bn_bias: np.ndarray | None = None
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    dim: int | None = None  # D, the embedding width it takes, where known

    def __post_init__(self) -> None:
        if self.kind not in EMBEDDING_KINDS:
            raise BadInputError(
                f"unknown embedding kind {self.kind!r}: use one of {', '.join(EMBEDDING_KINDS)}"
            )

    @classmethod
    def from_linear(
        cls, weight: ArrayLike | torch.Tensor, bias: ArrayLike | torch.Tensor | None = None
    ) -> Readout:
        """Feature readout from the model's last Linear layer: ``weight`` (C, D), ``bias`` (C,)."""
        weight_t = torch.as_tensor(np.asarray(_to_numpy(weight), dtype=np.float32))
        if weight_t.ndim != 2:
            raise BadInputError(
                f"the last Linear layer's weight must be (C, D), got {weight_t.shape}"
            )
        bias_t = None if bias is None else torch.as_tensor(np.asarray(_to_numpy(bias), np.float32))

        def classify(h: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(h, weight_t, bias_t)

        return cls(
            normalise=identity,
            classify=classify,
            kind="feat",
            weight=weight_t.numpy().astype(np.float64),
            bias=None if bias_t is None else bias_t.numpy().astype(np.float64),
            dim=int(weight_t.shape[1]),
        )

    @classmethod
    def from_head(cls, head: Any) -> Readout:
        """Gradient readout from a ``gradcli.head.GradientHead`` (its eval-mode BN, then FC)."""
        return cls(
            normalise=head.normalise,
            classify=head.classify,
            kind="grad",
            bn_weight=head.bn.weight.detach().cpu().numpy().astype(np.float32),
            bn_bias=head.bn.bias.detach().cpu().numpy().astype(np.float32),
            dim=int(head.bn.num_features),
        )


def _to_numpy(x: ArrayLike | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


@dataclass
class Embedding:
    """One dataset's embedding.

    ``z`` (N, D) float32 features or reduced gradients; ``logits`` (N, C) the model's logits (MSP
    and Energy on features use them when no readout is given); ``labels`` (N,) int64, -1 for
    unlabelled samples; ``gnorm`` (N,) the norm of the full normalised gradient (gradient
    embeddings only). ``name`` only serves error messages.
    """

    z: np.ndarray
    logits: np.ndarray | None = None
    labels: np.ndarray | None = None
    name: str = "embedding"
    gnorm: np.ndarray | None = None  # (N,) ‖G(x)‖ of the full normalised gradient, for gradients

    def __post_init__(self) -> None:
        self.z = _to_numpy(self.z)
        if not (np.issubdtype(self.z.dtype, np.number) or self.z.dtype == np.bool_):
            raise BadInputError(f"{self.name} must hold numbers, not {self.z.dtype}")
        if self.z.ndim != 2:
            raise BadInputError(f"{self.name} must have shape (N, D), got {self.z.shape}")
        if not np.isfinite(self.z).all():
            raise BadInputError(f"{self.name} contains NaN/Inf values: recompute it")
        n = self.z.shape[0]
        if self.logits is not None:
            self.logits = np.asarray(self.logits)
            if self.logits.ndim != 2 or self.logits.shape[0] != n:
                raise BadInputError(
                    f"{self.name} logits must have shape ({n}, C), got {self.logits.shape}"
                )
        if self.labels is not None:
            self.labels = _to_numpy(self.labels)
            if self.labels.shape != (n,):
                raise BadInputError(
                    f"{self.name} labels must have shape ({n},), got {self.labels.shape}"
                )
            whole = np.issubdtype(self.labels.dtype, np.integer) or (
                np.issubdtype(self.labels.dtype, np.floating)
                and bool(np.all(np.mod(self.labels, 1) == 0))
            )
            if not whole:
                raise BadInputError(f"{self.name} labels must be whole class indices (-1: none)")
            self.labels = self.labels.astype(np.int64, copy=False)

    def __len__(self) -> int:
        return self.z.shape[0]


def _check_width(method: str, data: Embedding, readout: Readout | None) -> None:
    if readout is not None and readout.dim is not None and data.z.shape[1] != readout.dim:
        raise BadInputError(
            f"{method}: {data.name} has {data.z.shape[1]} dimensions but the readout takes "
            f"{readout.dim}: pair each embedding with the readout of its own kind and model"
        )


def require_readout(readout: Readout | None, method: str) -> Readout:
    """``readout``, or a one-line error saying that ``method`` needs the last Linear layer."""
    if readout is None:
        raise BadInputError(
            f"{method} needs the model's last Linear layer to turn embeddings into logits: "
            "use the default --feature-layer (the input of the final Linear layer)"
        )
    return readout


def _batches(z: np.ndarray) -> Iterator[torch.Tensor]:
    for start in range(0, z.shape[0], SCORE_BATCH):
        yield torch.from_numpy(np.ascontiguousarray(z[start : start + SCORE_BATCH], np.float32))


def normalised(z: np.ndarray, readout: Readout) -> np.ndarray:
    """``readout.normalise(z)`` as a float32 array (N, D), computed in batches."""
    if readout.normalise is identity:
        return np.asarray(z, dtype=np.float32)
    with torch.no_grad():
        parts = [readout.normalise(batch).numpy() for batch in _batches(z)]
    if not parts:
        return np.zeros(z.shape, np.float32)
    return np.concatenate(parts)


def readout_logits(
    data: Embedding,
    readout: Readout | None,
    method: str,
    rectify: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits (N, C) float64: ``classify(rectify(normalise(z)))`` in batches, or ``data.logits``
    when there is no readout (and no rectifier)."""
    if readout is None:
        if rectify is not None:
            require_readout(readout, method)
        if data.logits is None:
            raise BadInputError(
                f"{method} needs logits: {data.name} has none and there is no readout "
                "(embed with the model's logits or use the default --feature-layer)"
            )
        return torch.from_numpy(np.asarray(data.logits, dtype=np.float64))
    parts = []
    with torch.no_grad():
        for batch in _batches(data.z):
            h = readout.normalise(batch)
            if rectify is not None:
                h = rectify(h)
            parts.append(readout.classify(h).double())
    if not parts:
        return torch.zeros((0, 0), dtype=torch.float64)
    return torch.cat(parts)


def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """``T·logsumexp(logits / T)`` per row, float64 (N,): negative free energy."""
    logits = logits.double()
    return (temperature * torch.logsumexp(logits / temperature, dim=1)).numpy()


def check_clip_dims(clip_dims: int | None, num_dims: int, method: str) -> int:
    """The number of trailing dimensions to rectify: ``clip_dims`` or all ``num_dims``."""
    if clip_dims is None:
        return num_dims
    if clip_dims > num_dims:
        raise BadInputError(
            f"{method}: --clip-dims {clip_dims} exceeds the {num_dims} embedding dimensions: "
            f"use at most {num_dims}"
        )
    return clip_dims


def trailing_bounds(
    lower: np.ndarray | float, upper: np.ndarray | float, num_dims: int, clip_dims: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension float32 bounds (D,) that apply ``lower``/``upper`` (scalars or (D,)) to the
    last ``clip_dims`` dimensions and leave the others unbounded (±inf)."""
    low = np.full(num_dims, -np.inf)
    high = np.full(num_dims, np.inf)
    first = num_dims - clip_dims
    low[first:] = np.broadcast_to(np.asarray(lower, np.float64), (num_dims,))[first:]
    high[first:] = np.broadcast_to(np.asarray(upper, np.float64), (num_dims,))[first:]
    return torch.from_numpy(low.astype(np.float32)), torch.from_numpy(high.astype(np.float32))


def scalar(value: Any) -> Any:
    """A plain Python scalar from a stored value (numpy scalar or 0-d/1-element array)."""
    if isinstance(value, np.ndarray):
        if value.size != 1:
            return value
        value = value.reshape(-1)[0]  # an object array's element (e.g. None) is returned as is
    if isinstance(value, np.generic):
        return value.item()
    return value


class Detector:
    """Base class: options are constructor keyword arguments (named in ``option_names``);
    ``fit_option_names`` are those the fitted state depends on, stored with it and checked on
    reload."""

    name: ClassVar[str]
    option_names: ClassVar[tuple[str, ...]] = ()
    fit_option_names: ClassVar[tuple[str, ...]] = ()
    needs_fit: ClassVar[bool] = True
    needs_readout: ClassVar[bool] = False  # unavailable when the model has no last Linear layer
    kinds: ClassVar[tuple[str, ...]] = EMBEDDING_KINDS  # embeddings the method applies to

    def __init__(self) -> None:
        self._fitted = not self.needs_fit

    def config(self) -> dict[str, Any]:
        """The options, as recorded in the store's attrs."""
        return {option: getattr(self, option) for option in self.option_names}

    def fit(self: DetectorT, train: Embedding, readout: Readout | None) -> DetectorT:
        """Learn from the ID training embedding; returns ``self``."""
        if len(train) == 0:
            raise BadInputError(f"{self.name}: the training embedding {train.name} is empty")
        _check_width(self.name, train, readout)
        self._fit(train, readout)
        self._fitted = True
        return self

    def score(self, data: Embedding, readout: Readout | None) -> np.ndarray:
        """Scores (N,) float64, higher = more in-distribution."""
        if not self._fitted:
            raise BadInputError(
                f"{self.name} is not fitted: run fit-head on the ID training embedding first"
            )
        if len(data) == 0:
            return np.zeros(0, dtype=np.float64)
        _check_width(self.name, data, readout)
        return np.asarray(self._score(data, readout), dtype=np.float64).reshape(len(data))

    def state(self) -> dict[str, StateValue]:
        """Everything fitted, as arrays and scalars, plus the options the fit depends on."""
        if not self._fitted:
            raise BadInputError(f"{self.name} is not fitted: nothing to store")
        state: dict[str, StateValue] = {n: getattr(self, n) for n in self.fit_option_names}
        state.update(self._state())
        return state

    @classmethod
    def from_state(
        cls: type[DetectorT], state: Mapping[str, StateValue], **options: Any
    ) -> DetectorT:
        """Rebuild a fitted detector; ``options`` may change score-time options only."""
        fitted_with = {n: scalar(state[n]) for n in cls.fit_option_names if n in state}
        for option, value in options.items():
            if option in fitted_with and value != fitted_with[option]:
                raise StaleStoreError(
                    f"{cls.name} was fitted with {option}={fitted_with[option]}, not {value}: "
                    "refit it ('gradcli fit-head --overwrite') or drop the option"
                )
        detector = cls(**{**fitted_with, **options})
        try:
            detector._load_state(state)
        except KeyError as err:
            raise StaleStoreError(
                f"the stored {cls.name} state lacks {err}: rerun 'gradcli fit-head --overwrite'"
            ) from err
        detector._fitted = True
        return detector

    def _fit(self, train: Embedding, readout: Readout | None) -> None:
        """Subclasses: learn the state."""

    def _score(self, data: Embedding, readout: Readout | None) -> np.ndarray:
        raise NotImplementedError

    def _state(self) -> dict[str, StateValue]:
        return {}

    def _load_state(self, state: Mapping[str, StateValue]) -> None:
        """Subclasses: restore what ``_state`` returned."""

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({options})"
