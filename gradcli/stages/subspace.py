"""The subspace stage: ``extract_subspace`` runs the statistics pass, then builds the AG or PCA
basis ``V`` (P, K) under ``subspace/``, refusing bad options before any pass over the data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gradcli import layout
from gradcli.errors import BadInputError
from gradcli.grads import (
    select_parameters,
)
from gradcli.stages import ag_basis, defaults, runner
from gradcli.stages import pca as pca_stage
from gradcli.stages import stats as stats_stage
from gradcli.stages.checks import check_batch_size, check_extract_options, test_split_of
from gradcli.stages.context import RunContext
from gradcli.stages.pca_plan import PcaJob, pca_plan
from gradcli.subspace import (
    average_gradient_k_reason,
    check_method,
    pca_width,
)


def extract_subspace(
    run: RunContext,
    dataset: str,
    *,
    method: str = "avg",
    k: int | None = None,
    params: Sequence[str] | None = None,
    max_samples: int | None = None,
    no_variance: bool = False,
    batch_size: int | None = None,
    seed: int = defaults.SEED,
    oversample: int = defaults.PCA_OVERSAMPLE,
    iterations: int = defaults.PCA_ITERATIONS,
    checkpoint_every: int = defaults.CHECKPOINT_EVERY,
    iteration_dtype: str = "auto",
    overwrite: bool = False,
) -> dict:
    """Compute the normalisation statistics and the subspace basis from ID training data.

    ``method="avg"``: class-average gradients. ``method="pca"``: top-``k`` eigenvectors of
    ``GᵀG`` by ``iterations`` passes of subspace iteration with ``k + oversample``
    columns from a ``seed``-ed start. The statistics pass and every PCA pass are
    checkpointed every ``checkpoint_every`` batches, so a rerun resumes them;
    ``iteration_dtype`` (auto, float32, bfloat16) is the precision of the iterations'
    products (auto: bfloat16 where the device multiplies it natively), the final
    Rayleigh–Ritz pass being float32 always.
    """
    check_extract_options(
        method=method,
        k=k,
        oversample=oversample,
        iterations=iterations,
        checkpoint_every=checkpoint_every,
        iteration_dtype=iteration_dtype,
        batch_size=batch_size,
        seed=seed,
        max_samples=max_samples,
    )
    batch_size, seed = check_batch_size(batch_size), int(seed)
    model = run.model
    check_method(method, k, model.num_classes)
    source = run.resolve(dataset, default_split="train")
    if method == "avg" and not source.has_labels:
        raise BadInputError(
            f"{source.spec} has no labels; the average-gradient subspace needs a labelled "
            "ID training set"
        )
    selection = select_parameters(model.module, params)
    indices = run._subset(len(source), max_samples, seed)
    labels = source.labels()[indices]
    if method == "avg" and (labels.min() < 0 or labels.max() >= model.num_classes):
        raise BadInputError(
            f"{source.spec} has labels outside 0..{model.num_classes - 1}; the model has "
            f"{model.num_classes} classes"
        )
    if method == "avg":
        empty = np.flatnonzero(np.bincount(labels, minlength=model.num_classes) == 0)
        if empty.size:
            raise BadInputError(
                f"classes {empty.tolist()[:5]} have no training samples in {source.spec}"
                f"{'' if max_samples is None else f' (--max-samples {max_samples})'}; the "
                "average-gradient subspace needs every class (raise --max-samples, check "
                "the labels, or use --method pca --k N)"
            )
    class_sums = method == "avg"  # PCA needs the mean and variance only
    if class_sums:  # the statistics' class sums, then the basis's C×C matrices
        stats_stage.check_average_gradient_memory(run, selection, model.num_classes)
        ag_basis.ag_plan(run.memory_budget, model.num_classes, selection.size)
    if method == "pca":  # its width and memory plan, refused now rather than after a pass
        width = pca_width(k, oversample, selection.size, len(indices))
        pca_plan(run, selection, width, len(indices), iteration_dtype)
    stats_record = {
        "model_sha256": model.describe().get("weights_sha256"),
        "model": model.spec,
        "params": list(selection.names),
        "dataset": source.spec,
        "fingerprint": source.fingerprint(),
        "samples": int(len(indices)),
        "max_samples": max_samples,
        "seed": seed,
        "preprocess": model.preprocess.to_dict(),
        "class_sums": class_sums,
    }

    # Statistics with class sums serve a PCA subspace as they are.
    usable = (
        stats_stage.usable_stats_record(run, stats_record) if run.group.is_writer else stats_record
    )
    stats_done = runner.open_stage(
        run, layout.STATS, usable, overwrite=overwrite, what="the gradient statistics"
    )
    if not stats_done:
        class_sums = run.group.broadcast_object(
            bool(run.store.group_attrs(layout.STATS)["provenance"].get("class_sums", True))
            if run.group.is_writer
            else class_sums
        )
        stats_stage.compute_statistics(
            run, source, indices, selection, batch_size, no_variance, class_sums, checkpoint_every
        )
    subspace_record = {
        "stats": run.store.stage_digest(layout.STATS),
        "method": method,
        "no_variance": no_variance,
    }
    if method == "pca":
        subspace_record.update(
            k=k, width=width, iterations=iterations, seed=seed, iteration_dtype=iteration_dtype
        )

    sub_done = runner.open_stage(
        run, layout.SUBSPACE, subspace_record, overwrite=overwrite, what="the subspace"
    )
    if not sub_done:
        if method == "pca":
            mean, scale = stats_stage.normalisation(run, no_variance)
            subspace = pca_stage.pca(
                run,
                PcaJob(
                    source,
                    indices,
                    selection,
                    mean,
                    scale,
                    k,
                    width,
                    iterations,
                    seed,
                    batch_size,
                    checkpoint_every,
                    iteration_dtype,
                ),
            )
            del mean, scale

        def write_subspace() -> None:
            if method == "avg":  # from the stored class means, block by block
                plan = ag_basis.ag_plan(run.memory_budget, model.num_classes, selection.size)
                k_found = ag_basis.write_average_gradient_basis(
                    run.store, plan, no_variance, run.progress
                )
            else:
                k_found = subspace.k
                if subspace.basis is not None:  # else written block by block already
                    run.store.write(
                        layout.BASIS, subspace.basis, chunk_rows=layout.BASIS_CHUNK_ROWS
                    )
                stats = run.store.group_attrs(layout.STATS)
                total = (
                    stats["raw_variance_sum"]
                    if no_variance
                    else float(selection.size - stats["variance_replaced"])
                )
                run.store.write(layout.EIGENVALUES, subspace.eigenvalues)
                run.store.set_attrs(layout.SUBSPACE, total_variance=total)
            run.store.delete(layout.SUBSPACE_STATE)
            run.store.complete_stage(layout.SUBSPACE, k=k_found, num_parameters=selection.size)

        run._on_writer(write_subspace, value=False)
    run._on_writer(
        lambda: run.store.update_root(
            params=selection.describe(),
            id_train=source.spec,
            id_test=test_split_of(source.spec),
            id_max_samples=max_samples,
            id_seed=seed,
        )
    )
    sub_attrs = run.store.group_attrs(layout.SUBSPACE)
    return {
        "num_parameters": selection.size,
        "k": int(sub_attrs["k"]),
        "k_reason": (
            average_gradient_k_reason(int(sub_attrs["k"]), model.num_classes)
            if method == "avg"
            else f"K = {k}, as asked (--k)"
        ),
        "explained_variance": (
            float(run.store.read(layout.EIGENVALUES).sum() / sub_attrs["total_variance"])
            if method == "pca"
            else None
        ),
        "method": method,
        "samples": int(len(indices)),
        "variance_replaced": (  # --no-variance divides by none
            0
            if no_variance
            else int(run.store.group_attrs(layout.STATS).get("variance_replaced", 0))
        ),
        "reused": bool(stats_done and sub_done),
        "plan": sub_attrs.get("plan"),  # PCA: passes, row blocks and disk, as told up front
    }
