"""Calibration: the threshold λ that accepts a chosen share of held-out ID data, stored per
score under ``calibration/<key>`` and used to flag samples (``flags/<name>/<key>``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gradcli import layout
from gradcli.metrics import check_tpr, threshold_at_tpr
from gradcli.scores import (
    BASE_METHODS,
    resolve_methods,
)
from gradcli.scores.baselines import ODIN, ODIN_EPSILON, ODIN_TEMPERATURE
from gradcli.stages import defaults, records
from gradcli.stages import embeddings as embeddings_stage
from gradcli.stages import score as score_stage
from gradcli.stages.checks import check_alpha, check_embeddings, name_list
from gradcli.stages.context import RunContext

# Held-out images expected below a calibrated λ under which it is noted as resting on too few.
CALIBRATION_MIN_TAIL = 10


def calibrate(
    run: RunContext,
    dataset: str,
    *,
    tpr: float = 0.95,
    methods: Sequence[str] = BASE_METHODS,
    embeddings: Sequence[str] = layout.SCORE_EMBEDDINGS,
    alpha: float = defaults.ALPHA,
    batch_size: int | None = None,
    odin_temperature: float = ODIN_TEMPERATURE,
    odin_epsilon: float = ODIN_EPSILON,
) -> dict[str, dict]:
    """Store the paper's threshold λ for each score on held-out ID data ``dataset``.

    λ is the score at or above which a ``tpr`` share of ``dataset`` lies (the threshold
    FPR95 uses); afterwards ``score`` flags samples with score < λ as OOD. Kept in
    calibration/<key> with the settings it was made with.
    """
    run.store.require()  # a store never made: say so, make nothing
    tpr = check_tpr(tpr)
    methods = resolve_methods(name_list(methods, "methods"))
    embeddings = check_embeddings(name_list(embeddings, "embeddings"))
    alpha = check_alpha(alpha)
    odin = ODIN(odin_temperature, odin_epsilon)
    scores = score_stage.score(
        run,
        dataset,
        methods=methods,
        embeddings=embeddings,
        alpha=alpha,
        batch_size=batch_size,
        odin_temperature=odin_temperature,
        odin_epsilon=odin_epsilon,
        write_flags=False,
    )
    name = embeddings_stage.ensure_embedded(run, dataset)
    if name == (run.store.group_attrs(layout.HEAD).get("provenance") or {}).get("train"):
        run.progress.note(
            f"calibrating on the ID training set '{name}' gives optimistic thresholds; "
            "use held-out ID data such as the ID test split"
        )
    samples = len(next(iter(scores.values()))) if scores else 0
    tail = samples * (1.0 - tpr)
    if 0 < tail < CALIBRATION_MIN_TAIL:
        run.progress.note(
            f"λ at TPR {tpr:g} from {samples} images rests on the lowest "
            f"{max(1, round(tail))} of them; calibrate on at least "
            f"{math.ceil(round(CALIBRATION_MIN_TAIL / (1.0 - tpr), 6))} held-out ID images "
            "for a stable threshold"
        )
    calibrations = {}
    for key, values in scores.items():
        record = {
            "threshold": threshold_at_tpr(values, tpr),
            "tpr": tpr,
            "dataset": name,
            "samples": int(len(values)),
            "embedding": run.store.stage_digest(layout.embedding(name)),
            "source": records.source(run, key, alpha, odin),
        }
        run.store.put_group(layout.calibration(key), **record)
        calibrations[key] = record
    return calibrations


def flags(run: RunContext, name: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Stored OOD flags (N,) bool of embedding ``name`` (or its dataset's spec) for those
    ``keys`` whose flags match the stored scores and the current calibration (as ``score``
    leaves them)."""
    name = embeddings_stage.stored_name(run, name)
    out = {}
    for key in name_list(keys, "keys"):
        path = layout.flags(name, key)
        record = records.calibration(run, key)
        if not run.store.has(path) or record is None:
            continue
        attrs = run.store.group_attrs(path)
        scores = run.store.group_attrs(layout.scores(name, key)).get("provenance")
        if attrs.get("threshold") == record["threshold"] and attrs.get("provenance") == scores:
            out[key] = run.store.read(path)
    return out
