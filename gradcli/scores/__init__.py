"""OOD detectors, one family per module, behind the ``Detector`` interface.

``DETECTORS`` maps each embedding-based method name to its class (fitted by ``fit-head`` and
scored from stored embeddings); ``INPUT_DETECTORS`` maps the methods that need the model and
the images (ODIN) to theirs. ``METHODS`` lists both, so callers list and dispatch by name;
``BASE_METHODS`` (the embedding-based ones) is what "all" means, so a model pass over the
images happens only when such a method is named.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gradcli.errors import BadInputError
from gradcli.scores.base import Detector, Embedding, Readout
from gradcli.scores.baselines import ODIN, GradNorm, InputDetector, MaxLogit, ViM
from gradcli.scores.distance import KNN, Mahalanobis
from gradcli.scores.ensemble import ensemble_scores
from gradcli.scores.output import MSP, Energy
from gradcli.scores.rectify import BATS, ReAct
from gradcli.scores.residual import GradientNorm, Residual

DETECTORS: dict[str, type[Detector]] = {
    cls.name: cls
    for cls in (
        MSP,
        Energy,
        MaxLogit,
        ReAct,
        BATS,
        Mahalanobis,
        KNN,
        ViM,
        GradNorm,
        Residual,
        GradientNorm,
    )
}
INPUT_DETECTORS: dict[str, type[InputDetector]] = {ODIN.name: ODIN}
BASE_METHODS: tuple[str, ...] = tuple(DETECTORS)
METHODS: tuple[str, ...] = (*DETECTORS, *INPUT_DETECTORS)


def method_class(name: str) -> type[Detector] | type[InputDetector]:
    """The class of method ``name``, or a one-line error listing the known methods."""
    cls = DETECTORS.get(name) or INPUT_DETECTORS.get(name)
    if cls is None:
        raise BadInputError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return cls


def resolve_methods(names: Sequence[str]) -> list[str]:
    """Method names with ``all`` expanded to every embedding-based method (odin, which needs
    the images again, only by name); unknown names are a one-line error. None given: all."""
    for name in names:
        if name != "all":
            method_class(name)
    chosen = [name for name in names if name != "all"]
    if "all" in names or not chosen:
        return list(dict.fromkeys([*BASE_METHODS, *chosen]))
    return list(dict.fromkeys(chosen))


def get_detector(name: str, **options: Any) -> Detector | InputDetector:
    """A new, unfitted detector for method ``name`` with the given options."""
    cls = method_class(name)
    unknown = sorted(set(options) - set(cls.option_names))
    if unknown:
        allowed = ", ".join(cls.option_names) or "none"
        raise BadInputError(f"{name} has no option {', '.join(unknown)}: its options are {allowed}")
    return cls(**options)


def describe_methods() -> list[dict[str, Any]]:
    """One record per method: name, family module, embeddings, options, what it needs, paper."""
    rows = []
    for name in METHODS:
        cls = method_class(name)
        doc = (cls.__doc__ or "").strip().split("\n\n")
        rows.append(
            {
                "name": name,
                "family": cls.__module__.rsplit(".", 1)[-1],
                "embeddings": list(cls.kinds),
                "options": list(cls.option_names),
                "fitted": bool(cls.needs_fit),
                "needs": "model + images" if name in INPUT_DETECTORS else "stored embedding",
                "summary": " ".join(doc[0].split()),
                "details": " ".join(doc[1].split()) if len(doc) > 1 else "",
            }
        )
    return rows


__all__ = [
    "BASE_METHODS",
    "BATS",
    "DETECTORS",
    "INPUT_DETECTORS",
    "KNN",
    "METHODS",
    "MSP",
    "ODIN",
    "Detector",
    "Embedding",
    "Energy",
    "GradNorm",
    "GradientNorm",
    "InputDetector",
    "Mahalanobis",
    "MaxLogit",
    "ReAct",
    "Residual",
    "Readout",
    "ViM",
    "describe_methods",
    "ensemble_scores",
    "get_detector",
    "method_class",
    "resolve_methods",
]
