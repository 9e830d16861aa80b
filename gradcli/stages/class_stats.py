"""The statistics pass of the AG subspace, class by class: its memory does not grow with the
number of classes.

The seeded training selection is visited grouped by class (classes in increasing order, each
class's samples in selection order; no batch holds two classes, a class's last batch may be
short). Only the current class's statistics are held beside the running ones: when a class
ends, its mean gradient becomes its row of ``stats/class_means`` and its mean and centred
sums merge into the running ones by Chan's formula, in class order. A checkpoint holds the
running statistics and which classes are done, so a rerun skips those and gives the bits of
a pass never interrupted. Under torchrun each rank takes a contiguous run of whole classes,
writes their rows itself, and only the (P,) statistics are merged across ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gradcli import layout
from gradcli.errors import Interrupted
from gradcli.grads import GradientStatistics, LayerGradients
from gradcli.stages.checks import check_finite
from gradcli.stages.context import RunContext

STATE_FORMAT = "classes"  # a checkpoint of finished classes (stats/state's "format" attr)
STOP_MESSAGE = "stopped after saving the statistics' progress; rerun the same command to resume"


@dataclass(frozen=True)
class ClassPlan:
    """The selection grouped by class, and which rank computes which batches.

    ``rows`` (N,) dataset rows grouped by class; class c's are ``rows[bounds[c]:bounds[c+1]]``.
    ``batches[r]``: rank r's batches as (class, first, end) positions into ``rows``, its
    classes contiguous and in increasing order. ``finished[c]``: the steps after which class c
    is done (0 for a class done already or without samples)."""

    rows: np.ndarray
    bounds: np.ndarray
    batches: list[list[tuple[int, int, int]]]
    finished: np.ndarray

    @property
    def steps(self) -> int:
        """Steps every rank takes (the longest rank's batches): their collectives pair up."""
        return max((len(b) for b in self.batches), default=0)

    def done_by(self, step: int, done: np.ndarray) -> np.ndarray:
        """(C,) bool: the classes done after ``step`` steps, given those done before."""
        return done | ((self.finished > 0) & (self.finished <= step))


def class_plan(
    indices: np.ndarray, labels: np.ndarray, classes: int, batch: int, done: np.ndarray, world: int
) -> ClassPlan:
    """The plan over the selection ``indices`` (dataset rows) with ``labels`` (N,) in
    [0, classes), batches of at most ``batch`` samples, the classes not ``done`` split over
    ``world`` ranks into contiguous runs of about equal numbers of batches."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(classes + 1), side="left")
    per_class = -(-np.diff(bounds) // batch)  # batches of each class
    todo = np.flatnonzero(~done & (per_class > 0))
    first = np.cumsum(per_class[todo]) - per_class[todo]
    owner = first * world // max(1, int(per_class[todo].sum()))
    batches: list[list[tuple[int, int, int]]] = []
    finished = np.zeros(classes, dtype=np.int64)
    for rank in range(world):
        mine: list[tuple[int, int, int]] = []
        for c in todo[owner == rank]:
            end = int(bounds[c + 1])
            mine += [(int(c), lo, min(lo + batch, end)) for lo in range(bounds[c], end, batch)]
            finished[c] = len(mine)
        batches.append(mine)
    return ClassPlan(np.asarray(indices)[order], bounds, batches, finished)


def rebatched(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], sizes: Sequence[int]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The samples of ``batches`` (x, y) again, cut into batches of ``sizes`` (each at most
    the incoming batch size, so at most two incoming batches are held)."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    held = 0
    incoming = iter(batches)
    for size in sizes:
        while held < size:
            x, y = next(incoming)
            xs.append(x)
            ys.append(y)
            held += len(y)
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        y = ys[0] if len(ys) == 1 else torch.cat(ys)
        yield x[:size], y[:size]
        held -= size
        xs, ys = ([x[size:]], [y[size:]]) if held else ([], [])


def class_statistics(
    run: RunContext,
    source,
    plan: ClassPlan,
    engine: LayerGradients,
    stats: GradientStatistics,
    done: np.ndarray,
    batch: int,
    checkpoint_every: int,
) -> None:
    """Run ``plan`` on this rank: write each finished class's mean gradient (float32) to its
    row of ``stats/class_means`` and merge its statistics into ``stats`` in class order.

    Every ``checkpoint_every`` steps that finished a class, and on a stop request, the
    statistics over every rank go to ``stats/state`` with the classes done (``done``, (C,)
    bool, are those of the checkpoint resumed); on return ``stats`` holds every rank's."""
    group = run.group
    mine = plan.batches[group.rank]
    current = GradientStatistics(stats.mean.shape[0])
    saved = {"step": 0}

    def save(step: int) -> None:
        # Rank 0 keeps the statistics of every rank; the others start again from zero.
        stats.all_reduce(group)
        finished = plan.done_by(step, done)
        run._on_writer(lambda: save_class_checkpoint(run, stats, finished, batch), value=False)
        saved["step"] = step
        if not group.is_writer:
            stats.reset()

    first, end = (mine[0][1], mine[-1][2]) if mine else (0, 0)
    loader = run._loader(source, plan.rows[first:end], batch) if mine else ()
    samples = rebatched(loader, [stop - start for _, start, stop in mine])
    with run.progress.task("gradient statistics", total=end - first) as advance:
        for step in range(plan.steps):
            if step < len(mine):
                c, _, stop = mine[step]
                x, y = next(samples)
                logits, _ = engine.capture(x.to(run.device))
                check_finite(logits, "logits", source.spec)
                for start, tile in engine.tiles():
                    check_finite(tile, "gradients", source.spec)
                    current.update_rows(start, tile)
                current.commit(len(y))
                if stop == plan.bounds[c + 1]:  # the class is done
                    row = current.mean.float().numpy()[None]
                    run.store.write_rows(layout.STATS_CLASS_MEANS, c, row)
                    stats.merge(current)
                    current.reset()
                advance(len(y))
            steps = step + 1
            stop_now = group.any(run.should_stop())
            if steps < plan.steps and (stop_now or steps % checkpoint_every == 0):
                newly = (plan.finished > saved["step"]) & (plan.finished <= steps)
                if newly.any():
                    save(steps)
            if stop_now:
                raise Interrupted(STOP_MESSAGE)
    del current
    stats.all_reduce(group)


def create_class_means(run: RunContext, classes: int, size: int) -> None:
    """A fresh pass (rank 0): no checkpoint, and an empty (C, P) float32 ``stats/class_means``
    chunked by rows and column blocks."""
    run.store.delete(layout.STATS_STATE)
    run.store.create_rows(
        layout.STATS_CLASS_MEANS,
        (classes, size),
        "float32",
        chunk_rows=1,
        chunk_columns=layout.CLASS_MEANS_CHUNK_COLUMNS,
    )


def save_class_checkpoint(
    run: RunContext, stats: GradientStatistics, done: np.ndarray, batch: int
) -> None:
    """Save the statistics of the classes ``done`` (rank 0 only): the float64 arrays to the
    slot the state does not name, each stamped with the number of this save, then the state's
    attrs (which name the slot only once it is written)."""
    state = layout.STATS_STATE
    attrs = run.store.group_attrs(state)
    slot, saves = 1 - attrs.get("slot", 0), attrs.get("saves", 0) + 1
    for name, values in (("mean", stats.mean), ("m2", stats.m2)):
        run.store.write(
            f"{state}/{name}{slot}",
            values.numpy(),
            chunk_rows=layout.BASIS_CHUNK_ROWS,
            compress=False,
            attrs={"saves": saves},
        )
    run.store.set_attrs(
        state,
        format=STATE_FORMAT,
        slot=slot,
        saves=saves,
        batch=batch,
        count=int(stats.count),
        done=np.flatnonzero(done).tolist(),
    )


def load_class_checkpoint(
    run: RunContext, stats: GradientStatistics, classes: int
) -> tuple[np.ndarray, int] | None:
    """Load a checkpoint of finished classes into ``stats`` (rank 0 only); returns the (C,)
    bool classes done and the batch size, or None when there is no intact one (the pass
    starts over)."""
    state = layout.STATS_STATE
    attrs = run.store.group_attrs(state)
    if attrs.get("format") != STATE_FORMAT or not run.store.has(layout.STATS_CLASS_MEANS):
        return None
    size = stats.mean.shape[0]
    if run.store.shape(layout.STATS_CLASS_MEANS) != (classes, size):
        return None
    paths = [f"{state}/{name}{attrs['slot']}" for name in ("mean", "m2")]
    if any(run.store.group_attrs(path).get("saves") != attrs["saves"] for path in paths):
        return None
    arrays = [torch.from_numpy(np.require(run.store.read(p), requirements="W")) for p in paths]
    if any(a.dtype != torch.float64 or a.shape != (size,) for a in arrays):
        return None
    stats.mean, stats.m2 = arrays
    stats.count = int(attrs["count"])
    done = np.zeros(classes, dtype=bool)
    done[np.asarray(attrs["done"], dtype=np.int64)] = True
    return done, int(attrs["batch"])
