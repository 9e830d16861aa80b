"""PCA's plan: the job it works on and its memory plan (in-memory block, or layer blocks
when the P×(K+p) block does not fit the budget), checked before any pass over the data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gradcli import data as data_mod
from gradcli.budget import BASIS_SHARE, PCA_SHARE, format_size, plan_row_blocks
from gradcli.errors import BadInputError
from gradcli.grads import ParameterSelection
from gradcli.stages.context import RunContext


@dataclass(frozen=True)
class PcaJob:
    """What a PCA subspace extraction works on, shared by its in-memory and layer-block
    forms."""

    source: data_mod.ImageSource
    indices: np.ndarray
    selection: ParameterSelection
    mean: torch.Tensor
    scale: torch.Tensor
    k: int
    width: int
    iterations: int
    seed: int
    batch_size: int | None
    checkpoint_every: int
    iteration_dtype: str = "auto"


def pca_plan(
    run: RunContext, selection: ParameterSelection, width: int, n: int, iteration_dtype: str
) -> tuple[torch.dtype, int, bool]:
    """PCA's memory plan, checked before any pass over the data: the iterations' dtype,
    the bytes of the P×(K+p) block and accumulator, and whether they exceed the budget
    (the layer-block form, whose blocks are planned here so a budget too small even for
    them is refused now)."""
    p = selection.size
    need = p * width * 8 + p * 8
    low = run._iteration_dtype(iteration_dtype)
    if low != torch.float32 and need + p * width * 2 > int(run.memory_budget * PCA_SHARE):
        low = torch.float32  # no room for the block's bf16 copy: float32 iterations
    if low != torch.float32:
        need += p * width * 2
    blocked = need > int(run.memory_budget * PCA_SHARE)
    if blocked:
        if run.group.world > 1:
            raise BadInputError(
                f"PCA with K + p = {width} over {p:,} parameters needs "
                f"{need / 2**30:.1f} GiB, over {PCA_SHARE:.0%} of the memory budget, and "
                "the layer-block form runs in one process only; raise --memory-budget or "
                "run without torchrun"
            )
        pca_blocks(run, selection, width, n)
    return low, need, blocked


def pca_blocks(run: RunContext, selection: ParameterSelection, width: int, n: int) -> list:
    """Layer blocks for PCA whose V or Y rows (float32) fit the budget beside U (n, w)."""
    u_bytes = n * width * 8  # U (n, w) float64, saved chunk by chunk
    budget = int(run.memory_budget * BASIS_SHARE) - u_bytes
    if budget < run.memory_budget // 8:
        raise BadInputError(
            f"PCA over {n:,} samples keeps U = G V ({n:,} x {width}, "
            f"{format_size(u_bytes)}) in memory, too much of the memory budget's "
            f"{format_size(run.memory_budget)}; raise --memory-budget or lower --max-samples"
        )
    plan = plan_row_blocks(
        selection.sizes,
        selection.names,
        width * 4 + 8,
        budget,
        remedies="lower --k or --oversample, or leave it out with --params",
    )
    starts = np.concatenate([[0], np.cumsum(selection.sizes)]).astype(int)
    return [(int(starts[a]), int(starts[b]), list(selection.names[a:b])) for a, b in plan]
