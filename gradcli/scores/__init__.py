"""OOD detectors, one family per module, behind the ``Detector`` interface.

``DETECTORS`` maps each method name to its class, so callers list and dispatch by name.
"""

from __future__ import annotations

from typing import Any

from gradcli.errors import BadInputError
from gradcli.scores.base import Detector, Embedding, Readout
from gradcli.scores.distance import KNN, Mahalanobis
from gradcli.scores.ensemble import ensemble_scores
from gradcli.scores.output import MSP, Energy
from gradcli.scores.rectify import BATS, ReAct
from gradcli.scores.residual import GradientNorm, Residual

DETECTORS: dict[str, type[Detector]] = {
    cls.name: cls for cls in (MSP, Energy, ReAct, BATS, Mahalanobis, KNN, Residual, GradientNorm)
}
BASE_METHODS: tuple[str, ...] = tuple(DETECTORS)


def get_detector(name: str, **options: Any) -> Detector:
    """A new, unfitted detector for method ``name`` with the given options."""
    try:
        cls = DETECTORS[name]
    except KeyError:
        raise BadInputError(
            f"unknown method {name!r}: use one of {', '.join(BASE_METHODS)}"
        ) from None
    unknown = sorted(set(options) - set(cls.option_names))
    if unknown:
        allowed = ", ".join(cls.option_names) or "none"
        raise BadInputError(f"{name} has no option {', '.join(unknown)}: its options are {allowed}")
    return cls(**options)


__all__ = [
    "BASE_METHODS",
    "BATS",
    "DETECTORS",
    "KNN",
    "MSP",
    "Detector",
    "Embedding",
    "Energy",
    "GradientNorm",
    "Mahalanobis",
    "ReAct",
    "Residual",
    "Readout",
    "ensemble_scores",
    "get_detector",
]
