"""The fit stage: the BN→FC head trained on the training embeddings (``head``) and every
detector fitted on them (``detectors/<kind>/<method>``), each with the options it used.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gradcli import layout
from gradcli.errors import BadInputError
from gradcli.head import (
    GradientHead,
    HeadOptions,
    accuracy,
    head_from_arrays,
    head_to_arrays,
    plan_epochs,
    steps_per_epoch,
    train_head,
)
from gradcli.scores import (
    BASE_METHODS,
    DETECTORS,
    get_detector,
)
from gradcli.scores.base import Detector, Embedding, Readout
from gradcli.scores.options import DetectorOptions
from gradcli.stages import embeddings as embeddings_stage
from gradcli.stages import runner
from gradcli.stages.checks import check_batch_size, check_seed, options
from gradcli.stages.context import RunContext


def fit_head(
    run: RunContext,
    *,
    train: str | None = None,
    test: str | None = None,
    head: HeadOptions | None = None,
    detectors: DetectorOptions | None = None,
    batch_size: int | None = None,
    overwrite: bool = False,
    methods: Sequence[str] | None = None,
) -> dict:
    """Train the BN→FC head and fit every detector on the ID training embeddings.

    ``head`` and ``detectors`` take the options dataclasses or dicts of their fields;
    ``methods`` fits those methods' detectors only (scoring fits the others when asked)."""
    run.store.require()  # a store never made: say so, make nothing
    head_opts = options(head, HeadOptions, "head")
    det_opts = options(detectors, DetectorOptions, "detectors")
    check_seed(head_opts.seed, "the head's seed")
    batch_size = check_batch_size(batch_size)
    train_spec = train or embeddings_stage.id_spec(run, "train")
    subset = {
        "max_samples": None if train else run.store.attrs.get("id_max_samples"),
        "seed": run.store.attrs.get("id_seed", 0),
    }
    embeddings_stage.note_embedding(run, train_spec, "fit-head", **subset)
    train_name = embeddings_stage.ensure_embedded(run, train_spec, batch_size=batch_size, **subset)
    train_data = embeddings_stage.load_embedding(run, train_name)
    labels = train_data["labels"]
    if (labels < 0).any():
        raise BadInputError(
            f"ID training embedding '{train_name}' has no labels; fit-head needs a labelled "
            "ID training set"
        )
    train_digest = run.store.stage_digest(layout.embedding(train_name))
    epochs = plan_epochs(len(labels), head_opts.batch_size, head_opts.epochs, head_opts.min_steps)
    recipe = {  # what training runs: epochs, optimiser steps, batch, lr and its schedule
        "epochs": epochs,
        "steps": epochs * steps_per_epoch(len(labels), head_opts.batch_size),
        "batch_size": head_opts.batch_size,
        "lr": head_opts.lr,
        "weight_decay": head_opts.weight_decay,
        "schedule": head_opts.schedule,
        "stopping": "fixed budget: max(10 epochs, min_steps steps)"
        if head_opts.epochs is None
        else "fixed budget: the given epochs",
    }
    record = {
        "train": train_name,
        "train_digest": train_digest,
        **vars(head_opts),
        "recipe": recipe,
    }
    summary: dict = {"train": train_name}
    # --overwrite: a new head whatever the store holds, and everything computed from it
    if not runner.open_stage(
        run, layout.HEAD, record, overwrite=True, replace=overwrite, collective=False
    ):
        with run.progress.task("fit head", total=epochs) as advance:
            fitted = train_head(
                train_data["grad"],
                labels,
                run.model.num_classes,
                epochs=epochs,
                lr=head_opts.lr,
                batch_size=head_opts.batch_size,
                momentum=head_opts.momentum,
                weight_decay=head_opts.weight_decay,
                schedule=head_opts.schedule,
                seed=head_opts.seed,
                progress=lambda done, total: advance(1),
            )
        for key, value in head_to_arrays(fitted).items():
            run.store.write(layout.head_array(key), value)
        run.store.complete_stage(
            layout.HEAD, train_accuracy=accuracy(fitted, train_data["grad"], labels)
        )
    summary["train_accuracy"] = run.store.group_attrs(layout.HEAD)["train_accuracy"]
    test_spec = test or run.store.attrs.get("id_test")
    if test_spec:
        embeddings_stage.note_embedding(run, test_spec, "fit-head")
        test_name = embeddings_stage.ensure_embedded(run, test_spec, batch_size=batch_size)
        test_data = embeddings_stage.load_embedding(run, test_name)
        classes = run.model.num_classes
        if (test_data["labels"] >= classes).any():
            raise BadInputError(
                f"ID test set {test_spec} has labels outside 0..{classes - 1}; the model has "
                f"{classes} classes: give the ID test set of the training data"
            )
        if test and not run.store.attrs.get("id_test"):  # evaluate's default ID set
            run._on_writer(lambda: run.store.update_root(id_test=test_name), value=False)
        if (test_data["labels"] >= 0).all():
            summary["test"] = test_name
            summary["test_accuracy"] = accuracy(
                load_head(run), test_data["grad"], test_data["labels"]
            )
            summary["model_test_accuracy"] = float(
                (test_data["logits"].argmax(1) == test_data["labels"]).mean()
            )
    only = None if methods is None else [(k, m) for k in layout.EMBEDDINGS for m in methods]
    _fit_detectors(run, train_name, train_data, det_opts, only=only)
    return summary


def load_head(run: RunContext) -> GradientHead:
    """The fitted BN→FC head, in eval mode."""
    if not run.store.stage_complete(layout.HEAD):
        raise BadInputError(
            f"store {run.store.url} has no fitted head; run 'gradcli fit-head' first"
        )
    names = [n for n in run.store.children(layout.HEAD)]
    return head_from_arrays({n: run.store.read(layout.head_array(n)) for n in names})


def readout(run: RunContext, embedding: str) -> Readout | None:
    """Embedding -> logits: the head for gradients, the model's last Linear for features."""
    if embedding == "grad":
        return Readout.from_head(load_head(run))
    linear = run.model.classifier
    if linear is None:
        return None
    bias = None if linear.bias is None else linear.bias.detach().cpu()
    return Readout.from_linear(linear.weight.detach().cpu(), bias)


def as_embedding(arrays: dict[str, np.ndarray], kind: str) -> Embedding:
    """An embedding's arrays (as :meth:`load_embedding` gives them) as the detectors'
    input for ``kind`` "grad" (reduced gradients, with ‖G‖) or "feat" (features)."""
    return Embedding(
        z=arrays["grad"] if kind == "grad" else arrays["feat"],
        logits=arrays["logits"],
        labels=arrays["labels"],
        gnorm=arrays["gnorm"] if kind == "grad" else None,
    )


def _fit_detectors(
    run: RunContext,
    train_name: str,
    train_data: dict[str, np.ndarray],
    options: DetectorOptions,
    only: Sequence[tuple[str, str]] | None = None,
) -> None:
    """Fit every detector, or the (embedding, method) pairs in ``only``, on the ID
    training embedding; a detector already fitted with the same record is kept."""
    head_digest = run.store.stage_digest(layout.HEAD)
    pairs = [(k, m) for k in layout.EMBEDDINGS for m in BASE_METHODS if k in DETECTORS[m].kinds]
    if only is not None:
        pairs = [pair for pair in pairs if pair in set(only)]
    readouts: dict[str, Readout | None] = {}
    trains: dict[str, Embedding] = {}
    with run.progress.task("fit detectors", total=len(pairs)) as adv:
        for kind, method in pairs:
            if kind not in readouts:
                readouts[kind] = readout(run, kind)
                trains[kind] = as_embedding(train_data, kind)
            kind_readout = readouts[kind]
            path = layout.detector(kind, method)
            config = options.for_method(method)
            record = {"train": train_name, "head": head_digest, **config}
            adv(1)
            if runner.open_stage(run, path, record, overwrite=True, collective=False):
                continue
            detector = get_detector(method, **config)
            if kind_readout is None and DETECTORS[method].needs_readout:
                run.store.complete_stage(path, available=False)
                continue
            detector.fit(trains[kind], kind_readout)
            scalars = {}
            for key, value in detector.state().items():
                if isinstance(value, np.ndarray) and value.ndim > 0:
                    run.store.write(f"{path}/{key}", value)
                else:
                    scalars[key] = (
                        value.item() if isinstance(value, np.generic | np.ndarray) else value
                    )
            run.store.complete_stage(path, available=True, scalars=scalars)


def fit_missing_detectors(run: RunContext, pairs: Sequence[tuple[str, str]]) -> None:
    """Fit, with default options, detectors of methods that fit-head did not fit (a store
    made before they existed); those fit-head fitted are left as they are."""
    missing = [p for p in pairs if not run.store.stage_complete(layout.detector(p[0], p[1]))]
    if missing:
        train_name = run.store.group_attrs(layout.HEAD)["provenance"]["train"]
        train_data = embeddings_stage.load_embedding(run, train_name)
        _fit_detectors(run, train_name, train_data, DetectorOptions(), only=missing)


def fitted_detector(run: RunContext, kind: str, method: str) -> Detector | None:
    """The detector fit-head fitted for ``method`` on ``kind`` embeddings; None where it
    does not apply to this model (e.g. no last Linear layer)."""
    path = layout.detector(kind, method)
    if not run.store.stage_complete(path):
        raise BadInputError(
            f"detector {method} on {kind} is not fitted in {run.store.url}; "
            "run 'gradcli fit-head' first"
        )
    attrs = run.store.group_attrs(path)
    if not attrs.get("available", True):
        return None
    state = {n: run.store.read(f"{path}/{n}") for n in run.store.children(path)}
    state.update(attrs.get("scalars", {}))
    config = {k: v for k, v in attrs["provenance"].items() if k not in ("train", "head")}
    return get_detector(method, **config).__class__.from_state(state, **config)
