"""The stats stage: mean and diagonal variance of the per-sample energy gradients over ID training
data (plus the class means the AG subspace needs), in one checkpointed pass that resumes
bitwise and splits across torchrun ranks.

With class means the pass goes class by class (:mod:`gradcli.stages.class_stats`), so it holds
:data:`STATS_VECTORS` (P,) float64 vectors whatever the number of classes.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from gradcli import layout
from gradcli.budget import format_size
from gradcli.errors import BadInputError
from gradcli.grads import (
    GradientStatistics,
    LayerGradients,
    ParameterSelection,
    sanitise_variance,
)
from gradcli.stages import class_stats, defaults
from gradcli.stages.checks import check_finite
from gradcli.stages.context import RunContext
from gradcli.stages.passes import data_pass

# (P,) float64 vectors the AG statistics pass holds at most: the running mean and centred
# sums, the current class's, and a merge's temporary, with room for the float32 row written.
STATS_VECTORS = 6


def usable_stats_record(run: RunContext, record: dict) -> dict:
    """The stats stage's record to open: the stored one when it holds what ``record``
    asks for (statistics with class sums serve PCA too; a store made before the record
    named them has them), else ``record``."""
    existing = run.store.group_attrs(layout.STATS).get("provenance")
    if existing is None:
        return record
    rest = {key: value for key, value in existing.items() if key != "class_sums"}
    if rest != {key: value for key, value in record.items() if key != "class_sums"}:
        return record
    return existing if existing.get("class_sums", True) or not record["class_sums"] else record


def check_average_gradient_memory(
    run: RunContext, selection: ParameterSelection, classes: int
) -> None:
    """Refuse, before any pass over the data, an AG statistics pass whose (P,) float64
    vectors (:data:`STATS_VECTORS` of them) exceed the memory budget. The pass holds no
    per-class arrays (classes are visited one at a time), so ``classes`` does not count."""
    p = selection.size
    need = STATS_VECTORS * 8 * p
    if need <= run.memory_budget:
        return
    last = selection.names[-1].rsplit(".", 1)[0] + ".*"
    raise BadInputError(
        f"--method avg on {p:,} parameters ({classes:,} classes) needs {format_size(need)} "
        f"for the statistics pass ({STATS_VECTORS} float64 vectors of {format_size(8 * p)}), "
        f"over the memory budget's {format_size(run.memory_budget)}: select fewer parameters "
        f"with --params '{last}', or raise --memory-budget"
    )


def compute_statistics(
    run: RunContext,
    source,
    indices: np.ndarray,
    selection: ParameterSelection,
    batch_size: int | None,
    no_variance: bool = False,
    class_sums: bool = True,
    checkpoint_every: int = defaults.CHECKPOINT_EVERY,
) -> None:
    """The statistics pass: mean and centred variance of the gradients (float64), and with
    ``class_sums`` (the AG subspace's; PCA has none) each class's mean gradient, written to
    ``stats/class_means`` (C, P) float32 class by class (:mod:`gradcli.stages.class_stats`).

    Checkpointed every ``checkpoint_every`` batches and on a stop request, so a rerun
    resumes (with the batch size it began with) and gives the same bits as a pass never
    interrupted: after the last saved batch without class sums, after the last saved
    finished class with them.
    """
    model = run.model
    engine = LayerGradients(model.module, selection, tile_bytes=run._tile_bytes())
    stats = GradientStatistics(selection.size)
    summary = {}
    if class_sums:
        labels = source.labels()[indices]
        classes = model.num_classes
        if len(labels) and (labels.min() < 0 or labels.max() >= classes):
            raise BadInputError(
                f"{source.spec} has labels outside 0..{classes - 1}; the model has "
                f"{classes} classes"
            )
        _class_pass(run, source, indices, labels, engine, stats, batch_size, checkpoint_every)
        summary["class_counts"] = np.bincount(labels, minlength=classes).tolist()
    else:
        _sample_pass(run, source, indices, engine, stats, batch_size, checkpoint_every)
    raw = stats.variance()
    raw_sum = float(raw[torch.isfinite(raw)].sum())
    var, replaced = sanitise_variance(raw)

    def write_stats() -> None:
        run.store.write(
            layout.STATS_MEAN, stats.mean.float().numpy(), chunk_rows=layout.BASIS_CHUNK_ROWS
        )
        run.store.write(layout.STATS_VAR, var.float().numpy(), chunk_rows=layout.BASIS_CHUNK_ROWS)
        run.store.delete(layout.STATS_STATE)
        run.store.complete_stage(
            layout.STATS,
            samples=int(stats.count),
            variance_replaced=replaced,
            raw_variance_sum=raw_sum,
            **summary,
        )

    run._on_writer(write_stats, value=False)
    if replaced and not no_variance:  # --no-variance does not divide by it
        run.progress.note(
            f"{replaced} parameters had zero or non-finite gradient variance; "
            "their variance was set to the largest finite one"
        )


def _class_pass(
    run: RunContext,
    source,
    indices: np.ndarray,
    labels: np.ndarray,
    engine: LayerGradients,
    stats: GradientStatistics,
    batch_size: int | None,
    checkpoint_every: int,
) -> None:
    """The statistics pass class by class, resumed from its checkpoint (the classes done,
    the batch size it began with) or begun afresh with an empty ``stats/class_means``."""
    group, classes, size = run.group, run.model.num_classes, stats.mean.shape[0]
    resumed = class_stats.load_class_checkpoint(run, stats, classes) if group.is_writer else None
    done, batch = group.broadcast_object(resumed or (None, None))
    if batch is None:
        run._on_writer(class_stats.create_class_means, run, classes, size, value=False)
        done = np.zeros(classes, dtype=bool)
        fixed = 8 * size * STATS_VECTORS
        batch = group.broadcast_object(
            batch_size or run._batch_size(engine, source, indices, fixed)
        )
    plan = class_stats.class_plan(indices, labels, classes, batch, done, group.world)
    class_stats.class_statistics(run, source, plan, engine, stats, done, batch, checkpoint_every)


def _sample_pass(
    run: RunContext,
    source,
    indices: np.ndarray,
    engine: LayerGradients,
    stats: GradientStatistics,
    batch_size: int | None,
    checkpoint_every: int,
) -> None:
    """The statistics pass in selection order (PCA's), resumed after the last saved batch;
    under torchrun each rank takes a slice and the sums are all-reduced."""
    size = stats.mean.shape[0]
    group = run.group
    # A resumed pass goes on with the batch size it began with; rank 0 holds its sums.
    resumed = _stats_checkpoint(run, stats) if group.is_writer else None
    cursor, batch = group.broadcast_object(resumed or (0, None))
    if batch is None:
        fixed = 8 * size * 3  # float64 mean, m2 and a spare (P,)
        batch = group.broadcast_object(
            batch_size or run._batch_size(engine, source, indices, fixed)
        )
    mine = group.split(indices)  # under torchrun: this rank's slice; sums all-reduced below

    def save(done: int) -> None:
        # A checkpoint holds the sums over all ranks: rank 0 keeps them, the others start
        # again from zero (Chan's merge adds them up at the end).
        stats.all_reduce(group)
        if not group.is_writer:
            stats.reset()
        run._on_writer(
            functools.partial(_save_stats_checkpoint, run), stats, done, batch, value=False
        )

    steps = data_pass(
        run,
        source,
        indices,
        batch,
        engine=engine,
        start=cursor,
        ranks=True,
        stop_message=class_stats.STOP_MESSAGE,
        checkpoint_every=checkpoint_every,
        checkpoint=save,
    )
    with run.progress.task("gradient statistics", total=len(mine)) as advance:
        advance(min(len(mine), cursor * batch))
        for step in steps:
            if step.y is None:
                continue
            for start, tile in engine.tiles():
                check_finite(tile, "gradients", source.spec)
                stats.update_rows(start, tile)
            stats.commit(step.size)
            advance(step.size)
    stats.all_reduce(group)


def _save_stats_checkpoint(
    run: RunContext, stats: GradientStatistics, cursor: int, batch: int
) -> None:
    """Save the statistics after ``cursor`` batches (rank 0 only): the float64 arrays to
    the slot the state does not name, each recording the cursor, then the state."""
    state = layout.STATS_STATE
    slot = 1 - run.store.group_attrs(state).get("slot", 0)
    for name, values in (("mean", stats.mean), ("m2", stats.m2)):
        run.store.write(
            f"{state}/{name}{slot}",
            values.numpy(),
            chunk_rows=layout.BASIS_CHUNK_ROWS,
            compress=False,
            attrs={"cursor": cursor},
        )
    run.store.set_attrs(
        state, slot=slot, cursor=cursor, batch=batch, world=run.group.world, count=int(stats.count)
    )


def _stats_checkpoint(run: RunContext, stats: GradientStatistics) -> tuple[int, int] | None:
    """Load the saved statistics into ``stats``; returns (cursor, batch), or None when
    there is no intact checkpoint of this number of ranks (the pass starts over)."""
    state = layout.STATS_STATE
    attrs = run.store.group_attrs(state)
    if not attrs.get("cursor") or attrs.get("world") != run.group.world:
        return None
    slot, cursor = attrs["slot"], attrs["cursor"]
    paths = [f"{state}/{name}{slot}" for name in ("mean", "m2")]
    if any(run.store.group_attrs(path).get("cursor") != cursor for path in paths):
        return None
    arrays = [
        torch.from_numpy(np.require(run.store.read(path), requirements="W")) for path in paths
    ]
    if any(a.dtype != torch.float64 or a.shape[-1] != stats.mean.shape[0] for a in arrays):
        return None
    stats.mean, stats.m2 = arrays
    stats.count = int(attrs["count"])
    return int(cursor), int(attrs["batch"])


def normalisation(run: RunContext, no_variance: bool) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.from_numpy(run.store.read(layout.STATS_MEAN))
    if no_variance:
        return mean, torch.ones_like(mean)
    return mean, torch.from_numpy(run.store.read(layout.STATS_VAR)).sqrt()
