"""Sweeps of detector options over the stored embeddings: how FPR95 and AUROC move with them.

A sweep rescoring the ID test set and the OOD sets from their stored embeddings for each
value (no gradient is recomputed); options the fitted state depends on (ReAct's percentile)
are refitted in memory on the stored ID training embedding, the others reuse the stored fit.
Nothing is written to the store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gradcli.errors import BadInputError
from gradcli.metrics import evaluate_scores
from gradcli.scores import DETECTORS, get_detector
from gradcli.scores.ensemble import ensemble_scores
from gradcli.scores.options import OPTIONS, DetectorOption
from gradcli.stages import defaults

if TYPE_CHECKING:
    from gradcli.stages.context import RunContext as Run


@dataclass(frozen=True)
class SweepParameter:
    """One sweepable option: its name on the command line, the detector option it sets, the
    methods that have it and whether its values are integers."""

    name: str
    option: str
    methods: tuple[str, ...]
    integer: bool
    description: str


def _swept(options: Sequence[DetectorOption]) -> list[DetectorOption]:
    return sorted((o for o in options if o.sweep is not None), key=lambda o: o.sweep.position)


def sweep_parameters(options: Sequence[DetectorOption]) -> dict[str, SweepParameter]:
    """The sweepable parameters of the detector options that declare a sweep, in order."""
    return {
        o.sweep.name: SweepParameter(
            o.sweep.name, o.parameter, o.methods, o.integer, o.sweep.description
        )
        for o in _swept(options)
    }


def sweep_aliases(options: Sequence[DetectorOption]) -> dict[str, str]:
    """Other spellings of the sweepable parameters, to their names."""
    return {alias: o.sweep.name for o in _swept(options) for alias in o.sweep.aliases}


def sweep_help(options: Sequence[DetectorOption]) -> str:
    """The help of ``--sweep``: the sweepable parameters and what they set."""
    labels = ", ".join(o.sweep.label for o in _swept(options))
    return f"PARAMETER=V1,V2,... over stored embeddings: {labels}; repeat for several."


# Derived from the detector options' one declaration (gradcli.scores.options.OPTIONS)
SWEEP_PARAMETERS: dict[str, SweepParameter] = sweep_parameters(OPTIONS)
ALIASES = sweep_aliases(OPTIONS)
SWEEP_HELP = sweep_help(OPTIONS)


def _parameter(name: str) -> SweepParameter:
    canonical = ALIASES.get(name.strip(), name.strip())
    if canonical not in SWEEP_PARAMETERS:
        raise BadInputError(
            f"unknown sweep parameter '{name}': use one of {', '.join(SWEEP_PARAMETERS)} "
            "(e.g. --sweep k=1,5,10,50)"
        )
    return SWEEP_PARAMETERS[canonical]


def parse_sweep(text: str) -> tuple[str, list[float]]:
    """``'k=1,5,10'`` → ``('k', [1, 5, 10])``; one-line errors for anything else."""
    name, sep, values = text.partition("=")
    if not sep or not name.strip() or not values.strip():
        raise BadInputError(f"--sweep takes PARAMETER=V1,V2,..., e.g. k=1,5,10,50; got '{text}'")
    parameter = _parameter(name)
    try:
        parsed = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise BadInputError(
            f"--sweep {parameter.name} takes comma-separated numbers, got '{values}'"
        ) from None
    return parameter.name, parsed


def check_sweeps(sweeps: Mapping[str, Sequence[float]]) -> dict[str, list[float | int]]:
    """Canonical parameter names and validated values, before anything is computed."""
    plan: dict[str, list[float | int]] = {}
    for name, values in sweeps.items():
        parameter = _parameter(name)
        if not len(values):
            raise BadInputError(f"--sweep {parameter.name} needs at least one value")
        checked: list[float | int] = []
        for value in values:
            if parameter.integer:
                if float(value) != int(value):
                    raise BadInputError(
                        f"--sweep {parameter.name} takes whole numbers, got {value}"
                    )
                value = int(value)
            for method in parameter.methods:  # the detectors' own checks, with their messages
                try:
                    get_detector(method, **{parameter.option: value})
                except BadInputError as err:
                    raise BadInputError(f"--sweep {parameter.name}={value:g}: {err}") from None
            checked.append(value)
        plan[parameter.name] = list(dict.fromkeys(checked))
    return plan


_WIDTH_NAMES = {"grad": "reduced gradient (K)", "feat": "feature"}


def check_sweep_dims(
    plan: Mapping[str, Sequence[float | int]], dims: Mapping[str, int]
) -> dict[str, list[int]]:
    """Clipped dims d apply to each embedding within its own width: ``dims`` maps
    'grad'/'feat' to widths. Returns the d values each embedding skips (wider than it); a value
    that fits none of the embeddings swept is an error."""
    skipped: dict[str, list[int]] = {kind: [] for kind in dims}
    for value in plan.get("d", []):
        over = [kind for kind, width in dims.items() if value > width]
        if dims and len(over) == len(dims):
            widths = ", ".join(f"{dims[k]} {_WIDTH_NAMES.get(k, k)}" for k in dims)
            raise BadInputError(
                f"--sweep d={value} exceeds the dimensions of every embedding swept ({widths}): "
                f"use at most {max(dims.values())}"
            )
        for kind in over:
            skipped[kind].append(int(value))
    return skipped


def _detector(run: Run, kind: str, method: str, option: str, value: Any, train: dict) -> Any:
    """The stored detector with ``option`` set to ``value``; refitted in memory on the ID
    training embedding when its fitted state depends on that option."""
    stored = run.fitted_detector(kind, method)
    if stored is None:
        return None
    config = {**stored.config(), option: value}
    cls = DETECTORS[method]
    if option not in cls.fit_option_names:
        return cls.from_state(stored.state(), **config)
    if "arrays" not in train:
        name = run.store.group_attrs("head")["provenance"]["train"]
        train["arrays"] = run.load_embedding(name)
    detector = get_detector(method, **config)
    return detector.fit(run.as_embedding(train["arrays"], kind), run.readout(kind))


def run_sweeps(
    run: Run,
    id_name: str,
    ood_names: Sequence[str],
    plan: Mapping[str, Sequence[float | int]],
    embeddings: Sequence[str],
    alpha: float = defaults.ALPHA,
    convention: str = "paper",
) -> list[dict]:
    """Metrics for every swept value, method and embedding against each OOD set.

    Returns flat records ``{parameter, value, method, embedding, ood, fpr95, auroc, aupr_in,
    aupr_out}``, with ``ood = "average"`` for the mean over the OOD sets. A clipped-dims value d
    wider than an embedding is left out for that embedding (and its ensemble), with a note.
    """
    names = [id_name, *ood_names]
    arrays = {name: run.load_embedding(name) for name in names}
    kinds = [k for k in ("grad", "feat") if k in embeddings or "ensemble" in embeddings]
    readouts = {kind: run.readout(kind) for kind in kinds}
    data = {(n, k): run.as_embedding(arrays[n], k) for n in names for k in kinds}
    widths = {kind: data[id_name, kind].z.shape[1] for kind in kinds}
    skipped = check_sweep_dims(plan, widths)
    for kind, values in skipped.items():
        if values:
            shown = ",".join(str(v) for v in values)
            run.progress.note(
                f"--sweep d={shown} skipped on the {_WIDTH_NAMES[kind]} embedding: it has "
                f"{widths[kind]} dimensions (d applies to each embedding within its own width)"
            )
    train: dict = {}
    records: list[dict] = []
    for parameter_name, values in plan.items():
        parameter = SWEEP_PARAMETERS[parameter_name]
        for value in values:
            for method in parameter.methods:
                scores: dict[str, dict[str, np.ndarray]] = {}
                for kind in kinds:
                    if parameter_name == "d" and value in skipped[kind]:
                        continue
                    detector = _detector(run, kind, method, parameter.option, value, train)
                    if detector is None:
                        continue
                    with torch.inference_mode():
                        scores[kind] = {
                            n: detector.score(data[n, kind], readouts[kind]) for n in names
                        }
                if "ensemble" in embeddings and {"feat", "grad"} <= set(scores):
                    scores["ensemble"] = {
                        n: ensemble_scores(scores["feat"][n], scores["grad"][n], alpha)
                        for n in names
                    }
                for kind, per_set in scores.items():
                    if kind not in embeddings:
                        continue
                    rows = [
                        {
                            "ood": ood,
                            **evaluate_scores(
                                per_set[id_name], per_set[ood], convention=convention
                            ),
                        }
                        for ood in ood_names
                    ]
                    average = {
                        metric: float(np.mean([row[metric] for row in rows]))
                        for metric in rows[0]
                        if metric != "ood"
                    }
                    base = {
                        "parameter": parameter_name,
                        "value": value,
                        "method": method,
                        "embedding": kind,
                    }
                    records += [{**base, **row} for row in rows]
                    records.append({**base, "ood": "average", **average})
    return records
