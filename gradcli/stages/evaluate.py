"""The evaluate stage: scores of the ID test set and each OOD set, their metrics (FPR95, AUROC,
AUPR-In/Out) under ``results/<ood>``, and optional detector-option sweeps; and
:func:`ensure_subspace`, the first stage of a run that evaluate is asked to start from a model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gradcli import layout
from gradcli.errors import BadInputError
from gradcli.head import (
    accuracy,
)
from gradcli.metrics import evaluate_scores
from gradcli.models import default_id_train
from gradcli.results import Results
from gradcli.scores import (
    BASE_METHODS,
    resolve_methods,
)
from gradcli.scores.baselines import ODIN, ODIN_EPSILON, ODIN_TEMPERATURE
from gradcli.stages import defaults, records
from gradcli.stages import embeddings as embeddings_stage
from gradcli.stages import fit as fit_stage
from gradcli.stages import score as score_stage
from gradcli.stages import subspace as subspace_stage
from gradcli.stages.checks import check_alpha, check_batch_size, check_embeddings, name_list
from gradcli.stages.context import RunContext
from gradcli.stages.sweep import check_sweep_dims, check_sweeps, run_sweeps


def ensure_subspace(
    run: RunContext,
    model: str,
    weights: str | None = None,
    *,
    id_train: str | None = None,
    method: str = "avg",
    k: int | None = None,
    params: Sequence[str] | None = None,
    max_samples: int | None = None,
    batch_size: int | None = None,
    overwrite: bool = False,
    **model_options: Any,
) -> dict:
    """Record ``model`` in the store and extract its subspace unless the store holds it: what
    ``gradcli extract-subspace`` does, so that one evaluate call runs a new run end to end.

    ``id_train`` defaults to the store's ID training set, else to the model's benchmark's
    (:func:`gradcli.models.default_id_train`: ``imagenet:train`` for torchvision names).
    ``model_options`` are :meth:`RunContext.set_model`'s (input size, classes, ...); the
    rest are :func:`~gradcli.stages.subspace.extract_subspace`'s. An identical stored
    subspace is reused; another is refused unless ``overwrite``. Returns its summary.
    """
    loaded = run.set_model(model, weights, overwrite=overwrite, **model_options)
    dataset = id_train or run.store.attrs.get("id_train") or default_id_train(loaded)
    if dataset is None:
        raise BadInputError(
            f"--model {loaded.spec} does not say which ID training set it was trained on; "
            "pass --id-train SPEC (the images its subspace is taken from)"
        )
    summary = subspace_stage.extract_subspace(
        run,
        dataset,
        method=method,
        k=k,
        params=params,
        max_samples=max_samples,
        batch_size=batch_size,
        overwrite=overwrite,
    )
    return {**summary, "id_train": dataset}


def evaluate(
    run: RunContext,
    ood: Sequence[str],
    *,
    id_dataset: str | None = None,
    methods: Sequence[str] = BASE_METHODS,
    embeddings: Sequence[str] = layout.SCORE_EMBEDDINGS,
    alpha: float = defaults.ALPHA,
    convention: str = "paper",
    batch_size: int | None = None,
    odin_temperature: float = ODIN_TEMPERATURE,
    odin_epsilon: float = ODIN_EPSILON,
    sweeps: Mapping[str, Sequence[float]] | None = None,
) -> Results:
    """Every missing stage, then metrics of ID test scores against each OOD set.

    Scores with a calibrated threshold λ also report the realised acceptance at λ of the
    ID test set and of each OOD set (``Results.calibration``). ``sweeps`` maps a detector
    option (see :data:`gradcli.stages.sweep.SWEEP_PARAMETERS`) to values tried on the stored
    embeddings (``Results.sweeps``).
    """

    run.store.require()  # a store never made: say so, make nothing
    if isinstance(ood, str | os.PathLike):
        ood = [ood]
    if not ood:
        raise BadInputError("give at least one --ood dataset")
    methods = resolve_methods(name_list(methods, "methods"))
    embeddings = check_embeddings(name_list(embeddings, "embeddings"))
    alpha = check_alpha(alpha)
    batch_size = check_batch_size(batch_size)
    plan = check_sweeps(sweeps or {})
    odin = ODIN(odin_temperature, odin_epsilon)
    options = {
        "methods": methods,
        "embeddings": embeddings,
        "alpha": alpha,
        "batch_size": batch_size,
        "odin_temperature": odin_temperature,
        "odin_epsilon": odin_epsilon,
        "write_flags": False,
    }
    if not run.store.stage_complete(layout.HEAD):
        fit_stage.fit_head(run, batch_size=batch_size, methods=methods)  # their detectors
    id_spec = id_dataset or embeddings_stage.id_spec(run, "test")
    id_scores = score_stage.score(run, id_spec, **options)
    id_name = embeddings_stage.ensure_embedded(run, id_spec)
    kinds = [k for k in layout.EMBEDDINGS if k in embeddings or "ensemble" in embeddings]
    check_sweep_dims(plan, {k: run.store.shape(layout.embedding(id_name, k))[1] for k in kinds})
    results = Results(id_name=id_name, ood_names=[], convention=convention)
    results.settings = {
        "alpha": alpha,
        "odin_temperature": odin_temperature,
        "odin_epsilon": odin_epsilon,
        "subspace": run.store.stage_digest(layout.SUBSPACE),
        "head": run.store.stage_digest(layout.HEAD),
        "detectors": {
            f"{method}-{kind}": run.store.stage_digest(layout.detector(kind, method))
            for method in methods
            for kind in layout.EMBEDDINGS
            if run.store.has(layout.detector(kind, method))
        },
    }
    results.id_scores = id_scores
    id_labels = run.store.read(layout.embedding(id_name, "labels"))
    if len(id_labels) and ((id_labels >= 0) & (id_labels < run.model.num_classes)).all():
        grads = run.store.read(layout.embedding(id_name, "grad"))
        results.head_accuracy = accuracy(fit_stage.load_head(run), grads, id_labels)
    for spec in ood:
        ood_name = embeddings_stage.ensure_embedded(run, spec)
        if ood_name == id_name:
            raise BadInputError(
                f"--ood {spec} is the ID test set '{id_name}' itself; name an OOD dataset"
            )
        ood_scores = score_stage.score(run, spec, **options)
        results.ood_names.append(ood_name)
        results.ood_scores[ood_name] = ood_scores
        table = {}
        for key, scores in ood_scores.items():
            method, emb = key.rsplit("-", 1)
            metrics = evaluate_scores(id_scores[key], scores, convention=convention)
            results.rows.setdefault((method, emb), {})[ood_name] = metrics
            table[key] = metrics
        run.store.put_group(
            layout.result(ood_name), id=id_name, convention=convention, metrics=table, cache=True
        )
    for key, scores in id_scores.items():
        record = records.calibration(run, key)
        if record is None:
            continue
        threshold = record["threshold"]
        entry = {
            "threshold": threshold,
            "tpr": record["tpr"],
            "calibrated_on": record["dataset"],
        }
        if record.get("source") != records.source(run, key, alpha, odin):
            entry["stale"] = True  # calibrated with other settings: no acceptance to report
        else:
            entry["id_acceptance"] = float(np.mean(scores >= threshold))
            entry["ood_acceptance"] = {
                name: float(np.mean(results.ood_scores[name][key] >= threshold))
                for name in results.ood_names
            }
        results.calibration[key] = entry
    if plan:
        results.sweeps = run_sweeps(
            run, id_name, results.ood_names, plan, embeddings, alpha, convention
        )
    return results
