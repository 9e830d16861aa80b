"""Detector options, declared once: ``OPTIONS`` names each option, the detector parameter it
sets and its help; its default and type are the detector's own (its constructor's signature).

Everything else is derived from that one table: the :class:`DetectorOptions` record fit-head
keeps with every detector it configured (its fields), ``DetectorOptions.for_method``, the CLI
flags of fit-head, score and evaluate (:mod:`gradcli.cli.options`) and the sweepable parameters
of :mod:`gradcli.stages.sweep`. A new detector option is one entry here (plus the detector's own
constructor parameter, named in its ``option_names``).
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field, make_dataclass
from typing import Any

from gradcli.errors import BadInputError
from gradcli.scores import DETECTORS, INPUT_DETECTORS


@dataclass(frozen=True)
class Sweep:
    """How an option is swept (``--sweep NAME=V1,V2``): its name there, the words naming it in
    ``--sweep``'s help, a description, other spellings accepted for it and its place in the
    list of sweepable options."""

    name: str
    label: str
    description: str
    aliases: tuple[str, ...] = ()
    position: int = 0  # where it is listed among the sweepable options


@dataclass(frozen=True)
class DetectorOption:
    """One detector option: ``name`` is its field in :class:`DetectorOptions` and its flag
    (``--name-with-dashes``, or ``flags``); it sets the detector parameter ``parameter`` of
    each of ``methods``. ``stage`` is "fit" (fitted by fit-head, recorded with the detector)
    or "score" (given to score and evaluate: input detectors). ``omit_default``: left out of
    the detector's record at its default (a record written before the option existed)."""

    name: str
    methods: tuple[str, ...]
    parameter: str
    help: str
    stage: str = "fit"
    flags: tuple[str, ...] = ()
    omit_default: bool = False
    sweep: Sweep | None = None

    @property
    def _classes(self) -> list[type]:
        return [DETECTORS.get(m) or INPUT_DETECTORS[m] for m in self.methods]

    @property
    def default(self) -> Any:
        """The default of the detector's own constructor parameter."""
        return inspect.signature(self._classes[0]).parameters[self.parameter].default

    @property
    def annotation(self) -> Any:
        """The type of the detector's constructor parameter (e.g. ``int | None``)."""
        return typing.get_type_hints(self._classes[0].__init__)[self.parameter]

    @property
    def integer(self) -> bool:
        """Whether the option takes whole numbers."""
        return int in (typing.get_args(self.annotation) or (self.annotation,))

    @property
    def flag(self) -> str:
        """The command-line flag(s) of the option."""
        return "/".join(self.flags) if self.flags else "--" + self.name.replace("_", "-")


OPTIONS: tuple[DetectorOption, ...] = (
    DetectorOption(
        "react_percentile",
        ("react",),
        "percentile",
        "ReAct clipping percentile.",
        sweep=Sweep("percentile", "percentile (react)", "ReAct clip percentile", (), 1),
    ),
    DetectorOption(
        "bats_lambda",
        ("bats",),
        "lam",
        "BATS truncation width λ.",
        sweep=Sweep("lambda", "lambda (bats)", "BATS truncation width λ", ("lam",), 2),
    ),
    DetectorOption(
        "clip_dims",
        ("react", "bats"),
        "clip_dims",
        "ReAct/BATS: rectify the last d dims (default: K // 2 on gradients under the paper "
        "rule, else all).",
        sweep=Sweep(
            "d", "d (clipped dims)", "ReAct/BATS clipped dims d", ("clip_dims", "clip-dims"), 4
        ),
    ),
    DetectorOption(
        "knn_k",
        ("knn",),
        "k",
        "KNN: the k-th neighbour's distance is the score.",
        sweep=Sweep("k", "k (knn)", "KNN: which neighbour's distance is the score", ("knn_k",), 0),
    ),
    DetectorOption(
        "temperature",
        ("energy",),
        "temperature",
        "Energy temperature T.",
        sweep=Sweep("temperature", "temperature (energy)", "energy temperature T", ("T",), 3),
    ),
    DetectorOption(
        "vim_dim",
        ("vim",),
        "dim",
        "ViM principal dimension (default: 1000, 512 or half the features).",
    ),
    DetectorOption("gradnorm_temperature", ("gradnorm",), "temperature", "GradNorm temperature T."),
    DetectorOption(
        "knn_normalise",
        ("knn",),
        "normalise",
        "KNN: L2-normalise embeddings before the neighbour search [default: normalise].",
        flags=("--knn-normalise", "--no-knn-normalise"),
        omit_default=True,
    ),
    DetectorOption(
        "clip_rule",
        ("react", "bats"),
        "rule",
        "ReAct/BATS on gradients: paper (last d dims, one pooled ReAct threshold) or per-dim "
        "(each dim at its own percentile, all dims).",
    ),
    DetectorOption(
        "odin_temperature",
        ("odin",),
        "temperature",
        "ODIN temperature T (odin runs only when named in --method).",
        stage="score",
    ),
    DetectorOption(
        "odin_epsilon",
        ("odin",),
        "epsilon",
        "ODIN input perturbation ε, in [0, 1] pixel units.",
        stage="score",
    ),
)
FIT_OPTIONS: tuple[DetectorOption, ...] = tuple(o for o in OPTIONS if o.stage == "fit")
SCORE_OPTIONS: tuple[DetectorOption, ...] = tuple(o for o in OPTIONS if o.stage == "score")


def _check(self) -> None:
    # Checked before any embedding is computed; named as fit-head's options.
    if self.clip_rule not in ("paper", "per-dim"):
        raise BadInputError(f"--clip-rule must be paper or per-dim, not {self.clip_rule!r}")
    if self.knn_k < 1:
        raise BadInputError(f"--knn-k must be at least 1, not {self.knn_k}")
    if not 0 < self.react_percentile <= 100:
        raise BadInputError(f"--react-percentile must be in (0, 100], not {self.react_percentile}")


def _for_method(self, method: str) -> dict:
    """The options of ``method``'s detector, by its own parameter names."""
    config = {}
    for option in self.declared:
        if method in option.methods:
            value = getattr(self, option.name)
            if not (option.omit_default and value == option.default):
                config[option.parameter] = value
    return config


def options_class(options: tuple[DetectorOption, ...]) -> type:
    """The record of ``options``: a dataclass with a field per option (the detector's type
    and default), checked on creation, with ``for_method``."""
    cls = make_dataclass(
        "DetectorOptions",
        [(o.name, o.annotation, field(default=o.default)) for o in options],
        namespace={
            "__doc__": "Options of the fitted detectors, recorded with them (fields: OPTIONS).",
            "__post_init__": _check,
            "for_method": _for_method,
            "declared": options,
        },
    )
    cls.__module__ = __name__
    return cls


DetectorOptions = options_class(FIT_OPTIONS)
