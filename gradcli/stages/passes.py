"""One pass over a dataset, written once for every stage that needs one.

A pass loads the batches of a seeded selection of rows, moves them to the device, captures
the model's logits and features (and the engine's per-sample gradients) when given an engine,
refuses NaN/Inf logits, steps through the ranks of a process group in lockstep, and turns a
stop request (Ctrl-C, SIGTERM, a cluster's pre-emption) into a saved checkpoint and an
:class:`~gradcli.errors.Interrupted` with the message that says how to resume. The statistics
pass, PCA's passes, the row-block passes, embedding and input-gradient scoring all iterate
:func:`data_pass`; each keeps only what it does with a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from gradcli.errors import Interrupted
from gradcli.grads import LayerGradients
from gradcli.stages.checks import check_finite
from gradcli.stages.context import RunContext


@dataclass
class Step:
    """One step of a pass.

    ``x`` (B, ...) on the device and ``y`` (B,) int64 labels, or both ``None`` on a step this
    rank idles through (its slice is shorter than another's); ``rows`` the positions of the
    batch within the pass's rows; ``logits`` (B, C) and ``features`` (B, D) when the pass
    captured them with an engine (``features`` None for a TorchScript model)."""

    index: int
    x: torch.Tensor | None
    y: torch.Tensor | None
    rows: slice
    logits: torch.Tensor | None = None
    features: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """Samples in this step (0 on an idle step)."""
        return 0 if self.y is None else len(self.y)


def data_pass(
    run: RunContext,
    source,
    indices: np.ndarray,
    batch: int,
    *,
    engine: LayerGradients | None = None,
    start: int = 0,
    ranks: bool = False,
    name_rows: bool = False,
    stop_message: str | None = None,
    checkpoint_every: int = 0,
    checkpoint: Callable[[int], None] | None = None,
    before_stop: Callable[[], None] | None = None,
) -> Iterator[Step]:
    """The steps of one pass over ``source``'s rows ``indices`` in batches of ``batch``.

    ``ranks``: each rank of ``run.group`` takes its slice of the rows, and all take the same
    number of steps (idle ones included) so that their collectives pair up. ``start``: the
    first step (a resumed pass). ``name_rows``: a NaN/Inf error names dataset rows rather
    than batch rows. ``stop_message``: after each step a stop request (agreed over the ranks)
    ends the pass with :class:`Interrupted` and this message; before that, and after every
    ``checkpoint_every`` steps that do not end the pass, ``checkpoint(steps_done)`` runs, and
    ``before_stop()`` runs just before the pass is interrupted. Without ``stop_message`` the
    caller checks for stops itself (between chunks, say)."""
    group = run.group
    mine = group.split(indices) if ranks else indices
    steps = group.steps(len(indices), batch) if ranks else -(-len(indices) // batch)
    batches = iter(run._loader(source, mine[start * batch :], batch))
    offset = start * batch
    for index in range(start, steps):
        item = next(batches, None)
        if item is None:
            yield Step(index, None, None, slice(offset, offset))
        else:
            x, y = item[0].to(run.device), item[1]
            rows = slice(offset, offset + len(y))
            step = Step(index, x, y, rows)
            if engine is not None:
                step.logits, step.features = engine.capture(x)
                row_ids = np.asarray(mine)[rows] if name_rows else None
                check_finite(step.logits, "logits", source.spec, row_ids)
            yield step
            offset += len(y)
        if stop_message is None:
            continue
        done = index + 1
        stop = group.any(run.should_stop()) if ranks else run.should_stop()
        if checkpoint is not None and (done % checkpoint_every == 0 or stop) and done < steps:
            checkpoint(done)
        if stop:
            if before_stop is not None:
                before_stop()
            raise Interrupted(stop_message)
