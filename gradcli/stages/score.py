"""The score stage: scores of an embedded dataset for each (method, embedding), stored under
``scores/<name>`` with the settings they came from, input-gradient scores (ODIN) computed in
shardable row chunks, and flags under a stored calibration.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from gradcli import data as data_mod
from gradcli import layout
from gradcli.distributed import check_shard, shard_range
from gradcli.errors import BadInputError, GradcliError, StaleStoreError
from gradcli.scores import (
    BASE_METHODS,
    DETECTORS,
    INPUT_DETECTORS,
    method_class,
    resolve_methods,
)
from gradcli.scores.base import Embedding, Readout
from gradcli.scores.baselines import ODIN, ODIN_EPSILON, ODIN_TEMPERATURE
from gradcli.scores.ensemble import ensemble_scores
from gradcli.stages import defaults, records
from gradcli.stages import embeddings as embeddings_stage
from gradcli.stages import fit as fit_stage
from gradcli.stages.checks import (
    check_alpha,
    check_batch_size,
    check_embeddings,
    check_finite,
    check_some_method_applies,
    name_list,
)
from gradcli.stages.context import RunContext
from gradcli.stages.passes import data_pass

INPUT_BATCH = 128  # images per batch of a model pass that needs input gradients (ODIN)


def score(
    run: RunContext,
    dataset: str,
    *,
    methods: Sequence[str] = BASE_METHODS,
    embeddings: Sequence[str] = layout.SCORE_EMBEDDINGS,
    alpha: float = defaults.ALPHA,
    batch_size: int | None = None,
    odin_temperature: float = ODIN_TEMPERATURE,
    odin_epsilon: float = ODIN_EPSILON,
    write_flags: bool = True,
    shard: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """Scores (higher = more ID) keyed '<method>-<embedding>'; written to scores/<name>/.

    ``shard=(i, n)`` splits the model pass of the methods that need the images (odin)
    into row chunks of ``scores_parts/<name>/<key>``, shard ``i`` computing its chunks;
    the process that finds every chunk done writes all the scores as an unsharded run
    would, the others return ``{}``. Needs a finished embedding and head.

    Methods that need the images (``odin``) run one batched model pass over the dataset
    the embedding was made from, only when named. Stored scores are reused while their
    recorded provenance (embedding, fitted detector, ODIN's T and ε, α) matches, else
    recomputed. With ``write_flags``, every score with a calibrated threshold λ (see
    :meth:`calibrate`) also gets its OOD flags (score < λ) in flags/<name>/<key>; a
    threshold calibrated with other settings is an error.
    """
    run.store.require()  # a store never made: say so, make nothing
    methods = resolve_methods(name_list(methods, "methods"))
    embeddings = check_embeddings(name_list(embeddings, "embeddings"))
    alpha = check_alpha(alpha)
    batch_size = check_batch_size(batch_size)
    odin = ODIN(odin_temperature, odin_epsilon)
    classes = {method: method_class(method) for method in methods}  # unknown names fail
    check_some_method_applies(classes, embeddings)
    if shard is not None:
        _check_sharded_score(run, dataset, methods, shard)
    if not run.store.stage_complete(layout.HEAD):
        fit_stage.fit_head(run, batch_size=batch_size)
    name = embeddings_stage.ensure_embedded(run, dataset, batch_size=batch_size)
    arrays = embeddings_stage.load_embedding(run, name)
    embed_digest = run.store.stage_digest(layout.embedding(name))
    bases = [e for e in layout.EMBEDDINGS if e in embeddings or "ensemble" in embeddings]
    pairs = [  # a method's embedding, when asked for or needed by an ensemble it can form
        (m, k)
        for m in methods
        for k in bases
        if k in classes[m].kinds
        and (k in embeddings or set(layout.EMBEDDINGS) <= set(classes[m].kinds))
    ]
    fit_stage.fit_missing_detectors(run, [(k, m) for m, k in pairs if m in DETECTORS])
    calibrations: dict[str, dict] = {}
    if write_flags:  # checked before anything is computed or written
        wanted = [f"{m}-{k}" for m, k in pairs if k in embeddings]
        if "ensemble" in embeddings:
            wanted += [f"{m}-ensemble" for m in methods]
        calibrations = records.calibrations(run, wanted, alpha, odin)
    computed: dict[str, np.ndarray] = {}
    readouts: dict[str, Readout | None] = {}
    data: dict[str, Embedding] = {}
    sharded: dict[str, np.ndarray] = {}
    if shard is not None:
        for method, kind in pairs:
            key = f"{method}-{kind}"
            record = {"embedding": embed_digest, **records.source(run, key, alpha, odin)}
            path = layout.scores(name, key)
            stored = run.store.has(path) and run.store.group_attrs(path).get("provenance")
            if method in INPUT_DETECTORS and stored != record:
                part = _input_scores_shard(run, name, key, record, odin, batch_size, shard)
                if part is None:
                    return {}  # other shards still at work; the last one writes the scores
                sharded[key] = part
    for method in methods:
        for kind in (k for m, k in pairs if m == method):
            key = f"{method}-{kind}"
            path = layout.scores(name, key)
            record = {"embedding": embed_digest, **records.source(run, key, alpha, odin)}
            if run.store.has(path) and run.store.group_attrs(path).get("provenance") == record:
                computed[key] = run.store.read(path)
                continue
            if key in sharded:
                scores = sharded[key]
            elif method in INPUT_DETECTORS:
                scores = _input_scores(run, name, odin, batch_size)
            else:
                detector = fit_stage.fitted_detector(run, kind, method)
                if detector is None:
                    continue
                if kind not in readouts:
                    readouts[kind] = fit_stage.readout(run, kind)
                    data[kind] = fit_stage.as_embedding(arrays, kind)
                with torch.inference_mode():
                    scores = detector.score(data[kind], readouts[kind])
            check_finite(torch.from_numpy(np.asarray(scores)), f"{key} scores", name)
            run.store.write(path, scores, attrs={"provenance": record}, cache=True)
            computed[key] = scores
        feat, grad = computed.get(f"{method}-feat"), computed.get(f"{method}-grad")
        if "ensemble" in embeddings and feat is not None and grad is not None:
            key = f"{method}-ensemble"
            combined = ensemble_scores(feat, grad, alpha)
            record = {"embedding": embed_digest, **records.source(run, key, alpha, odin)}
            run.store.write(
                layout.scores(name, key),
                combined,
                attrs={"alpha": alpha, "provenance": record},
                cache=True,
            )
            computed[key] = combined
    if sharded:  # every score is written: the parts are no longer needed
        run.store.delete(layout.score_parts(name))
    result = {k: v for k, v in computed.items() if k.rsplit("-", 1)[1] in embeddings}
    for key, record in calibrations.items():
        if key in result:
            run.store.write(
                layout.flags(name, key),
                np.asarray(result[key]) < record["threshold"],
                attrs={
                    "threshold": record["threshold"],
                    "tpr": record["tpr"],
                    "calibrated_on": record["dataset"],
                    "provenance": run.store.group_attrs(layout.scores(name, key)).get("provenance"),
                },
                cache=True,
            )
    return result


def _embedded_source(
    run: RunContext, name: str, needed_by: str
) -> tuple[data_mod.ImageSource, np.ndarray]:
    """The image source and row indices an embedding was made from, checked against its
    recorded fingerprint, for work that needs the images themselves."""
    provenance = run.store.group_attrs(layout.embedding(name)).get("provenance") or {}
    spec = provenance.get("dataset")
    if not spec:
        raise BadInputError(
            f"embedding '{name}' records no dataset, so {needed_by} cannot find its images; "
            "re-embed it with 'gradcli embed --dataset SPEC --overwrite'"
        )
    try:
        source = run.resolve(spec)
    except BadInputError as err:
        raise BadInputError(
            f"{needed_by} needs the images of '{name}', but its dataset {spec} cannot be "
            f"opened: {err}"
        ) from None
    if source.fingerprint() != provenance.get("fingerprint"):
        raise StaleStoreError(
            f"the images of {spec} changed since '{name}' was embedded, so {needed_by} "
            f"would score other images; re-embed it (gradcli embed --dataset {spec} "
            f"--name {name} --overwrite) or restore the files"
        )
    indices = run._subset(len(source), provenance.get("max_samples"), provenance.get("seed"))
    if len(indices) != provenance.get("rows"):
        raise StaleStoreError(
            f"'{name}' has {provenance.get('rows')} rows but {spec} now gives {len(indices)}; "
            f"re-embed it (gradcli embed --dataset {spec} --name {name} --overwrite)"
        )
    return source, indices


def _check_sharded_score(
    run: RunContext, dataset: str, methods: Sequence[str], shard: tuple[int, int]
) -> str:
    """The embedding a sharded score reads; one-line errors for what it cannot do."""
    check_shard(*shard, "shard")
    if not any(m in INPUT_DETECTORS for m in methods):
        raise BadInputError(
            "--shard splits the model pass of odin; the other scores take seconds from "
            "the stored embedding: run score without --shard (or add odin to --method)"
        )
    name = (
        dataset if dataset in embeddings_stage.embedding_names(run) else run.resolve(dataset).slug
    )
    if not run.store.stage_complete(layout.embedding(name)) or not run.store.stage_complete(
        layout.HEAD
    ):
        raise BadInputError(
            f"score --shard needs the finished embedding '{name}' and a fitted head; run "
            "'gradcli embed' (all shards) and 'gradcli fit-head' first"
        )
    return name


def _input_scores_shard(
    run: RunContext, name: str, key: str, record: dict, odin: ODIN, batch_size, shard
) -> np.ndarray | None:
    """Shard ``shard``'s row chunks of input-detector scores ``key`` (N,) float64 into
    scores_parts/<name>/<key>; all N scores once every chunk is done, else None. Chunks
    are whole batches, so every score is computed in the batch an unsharded run uses."""
    path = layout.score_parts(name, key)
    run.store.open_stage(path, record, shared=True, what=f"the {key} scores of '{name}'")
    n = int(run.store.shape(layout.embedding(name, "grad"))[0])
    batch = batch_size or INPUT_BATCH
    chunks = run.store.row_chunks(
        path, n, 4 * batch, {"scores": ((), "float64")}, shared=True, meta={"batch": batch}
    )
    batch = int(chunks.meta.get("batch", batch))
    own = shard_range(chunks.n_chunks, *shard)
    for chunk in (c for c in chunks.pending() if c in own):
        rows = chunks.chunk_range(chunk)
        scores = _input_scores(run, name, odin, batch, slice(rows.start, rows.stop))
        chunks.write(chunk, {"scores": scores})
        chunks.mark_done(chunk)
    if not chunks.done().all():
        return None
    return chunks.read("scores")


def _input_scores(
    run: RunContext, name: str, detector, batch_size: int | None, rows: slice | None = None
) -> np.ndarray:
    """Scores (N,) of a detector that needs the model and the images, batch by batch over
    the rows of embedding ``name`` (or those ``rows`` of it)."""
    source, indices = _embedded_source(run, name, detector.name)
    if rows is not None:
        indices = indices[rows]
    model = run.model
    scores = np.empty(len(indices))
    with run.progress.task(f"{detector.name} {name}", total=len(indices)) as advance:
        for step in data_pass(
            run,
            source,
            indices,
            batch_size or INPUT_BATCH,
            stop_message=f"stopped during the {detector.name} pass over '{name}'; rerun the "
            "same command to score it again",
        ):
            batch = detector.score_inputs(model.module, step.x, model.preprocess.std)
            scores[step.rows] = batch
            advance(len(batch))
    return scores


def item_ids(run: RunContext, name: str) -> list[str] | None:
    """Per-row names of embedding ``name``: file paths (``spec#index`` for arrays), or
    ``None`` when its dataset cannot be opened or has changed since."""
    try:
        source, indices = _embedded_source(run, name, "naming the rows")
    except GradcliError:
        return None
    return [source.item_id(int(i)) for i in indices]
