"""The stats stage: mean and diagonal variance of the per-sample energy gradients over ID training
data (plus the class means the AG subspace needs), in one checkpointed pass that resumes
bitwise and splits across torchrun ranks.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from gradcli import layout
from gradcli.budget import AG_BYTES_PER_ENTRY, format_size
from gradcli.errors import BadInputError
from gradcli.grads import (
    GradientStatistics,
    LayerGradients,
    ParameterSelection,
    sanitise_variance,
)
from gradcli.stages import defaults
from gradcli.stages.checks import check_finite
from gradcli.stages.context import RunContext
from gradcli.stages.passes import data_pass


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
    """Refuse, before any pass over the data, an AG subspace whose class arrays exceed the
    memory budget: the statistics pass sums gradients per class (C×P float64), and the
    orthonormalisation holds the class means, their normalised copy and QR's (float64)
    and the float32 results: at most AG_BYTES_PER_ENTRY bytes per class and parameter."""
    p = selection.size
    need = AG_BYTES_PER_ENTRY * classes * p
    if need <= run.memory_budget:
        return
    last = selection.names[-1].rsplit(".", 1)[0] + ".*"
    raise BadInputError(
        f"--method avg on {classes:,} classes x {p:,} parameters needs {format_size(need)} "
        f"(float64 class sums of {format_size(8 * classes * p)}, and their "
        f"orthonormalisation), over the memory budget's {format_size(run.memory_budget)}: "
        f"select fewer parameters with --params '{last}', use --method pca --k N, or raise "
        "--memory-budget"
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
    """The statistics pass: mean and centred variance of the gradients (float64), and
    their per-class sums when ``class_sums`` (the AG subspace's; PCA has none).

    Every ``checkpoint_every`` batches, and on a stop request, the float64 sums so far go
    to ``stats/state`` (alternating slots, named in the state's attrs only once written),
    so a rerun resumes after the last saved batch, with the batch size it began with,
    and gives the same bits as a pass never interrupted.
    """
    model = run.model
    engine = LayerGradients(model.module, selection, tile_bytes=run._tile_bytes())
    classes = model.num_classes if class_sums else None
    stats = GradientStatistics(selection.size, classes)
    group = run.group
    state = layout.STATS_STATE
    # A resumed pass goes on with the batch size it began with; rank 0 holds its sums.
    resumed = _stats_checkpoint(run, stats) if group.is_writer else None
    cursor, batch = group.broadcast_object(resumed or (0, None))
    if batch is None:
        # float64 mean, m2 and a spare (P,), plus the class sums (C, P)
        fixed = 8 * selection.size * (3 + (classes or 0))
        batch = group.broadcast_object(
            batch_size or run._batch_size(engine, source, indices, fixed)
        )
    mine = group.split(indices)  # under torchrun: this rank's slice; sums all-reduced below

    def save(done: int) -> None:
        # A checkpoint holds the sums over all ranks: rank 0 keeps them, the others start
        # again from zero (Chan's merge adds them up at the end).
        nonlocal stats
        stats.all_reduce(group)
        if not group.is_writer:
            stats = GradientStatistics(selection.size, classes)
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
        stop_message="stopped after saving the statistics' progress; rerun the same command "
        "to resume",
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
                stats.update_rows(start, tile, step.y)
            stats.commit(step.y)
            advance(step.size)
    stats.all_reduce(group)
    raw = stats.variance()
    raw_sum = float(raw[torch.isfinite(raw)].sum())
    var, replaced = sanitise_variance(raw)

    def write_stats() -> None:
        run.store.write(
            layout.STATS_MEAN, stats.mean.float().numpy(), chunk_rows=layout.BASIS_CHUNK_ROWS
        )
        run.store.write(layout.STATS_VAR, var.float().numpy(), chunk_rows=layout.BASIS_CHUNK_ROWS)
        summary = {}
        if class_sums:
            counts = torch.as_tensor(stats.class_counts, dtype=torch.float64)
            stats.class_sums /= counts.clamp_min(1)[:, None]  # the class means, in place
            run.store.write(
                layout.STATS_CLASS_MEANS, stats.class_sums.float().numpy(), chunk_rows=1
            )
            summary["class_counts"] = stats.class_counts.tolist()
        run.store.delete(state)
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


def _save_stats_checkpoint(
    run: RunContext, stats: GradientStatistics, cursor: int, batch: int
) -> None:
    """Save the statistics after ``cursor`` batches (rank 0 only): the float64 arrays to
    the slot the state does not name, each recording the cursor, then the state."""
    state = layout.STATS_STATE
    slot = 1 - run.store.group_attrs(state).get("slot", 0)
    arrays = {"mean": stats.mean, "m2": stats.m2}
    if stats.class_sums is not None:
        arrays["class_sums"] = stats.class_sums
    for name, values in arrays.items():
        run.store.write(
            f"{state}/{name}{slot}",
            values.numpy(),
            chunk_rows=layout.BASIS_CHUNK_ROWS if values.ndim == 1 else 1,
            compress=False,
            attrs={"cursor": cursor},
        )
    run.store.set_attrs(
        state,
        slot=slot,
        cursor=cursor,
        batch=batch,
        world=run.group.world,
        count=int(stats.count),
        class_counts=stats.class_counts.tolist(),
    )


def _stats_checkpoint(run: RunContext, stats: GradientStatistics) -> tuple[int, int] | None:
    """Load the saved statistics into ``stats``; returns (cursor, batch), or None when
    there is no intact checkpoint of this number of ranks (the pass starts over)."""
    state = layout.STATS_STATE
    attrs = run.store.group_attrs(state)
    if not attrs.get("cursor") or attrs.get("world") != run.group.world:
        return None
    slot, cursor = attrs["slot"], attrs["cursor"]
    names = ["mean", "m2"] + (["class_sums"] if stats.class_sums is not None else [])
    paths = [f"{state}/{name}{slot}" for name in names]
    if any(run.store.group_attrs(path).get("cursor") != cursor for path in paths):
        return None
    arrays = [
        torch.from_numpy(np.require(run.store.read(path), requirements="W")) for path in paths
    ]
    if any(a.dtype != torch.float64 or a.shape[-1] != stats.mean.shape[0] for a in arrays):
        return None
    stats.mean, stats.m2 = arrays[0], arrays[1]
    if stats.class_sums is not None:
        stats.class_sums = arrays[2]
        stats.class_counts = np.asarray(attrs["class_counts"], dtype=np.int64)
    stats.count = int(attrs["count"])
    return int(cursor), int(attrs["batch"])


def normalisation(run: RunContext, no_variance: bool) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.from_numpy(run.store.read(layout.STATS_MEAN))
    if no_variance:
        return mean, torch.ones_like(mean)
    return mean, torch.from_numpy(run.store.read(layout.STATS_VAR)).sqrt()
