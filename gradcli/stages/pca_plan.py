"""PCA's plan: the job it works on and its memory plan (in memory, or row blocks when the
P×(K+p) block does not fit the budget), with the passes over the data and the disk it will
take, checked and told before any pass over the data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gradcli import data as data_mod
from gradcli import layout
from gradcli.budget import (
    BASIS_SHARE,
    NORMALISATION_BYTES,
    PCA_ROW_BYTES,
    PCA_SHARE,
    START_CHUNK_ROWS,
    STORE_CHUNKS_PER_BLOCK,
    block_passes,
    format_size,
    plan_row_ranges,
)
from gradcli.errors import BadInputError
from gradcli.grads import ParameterSelection
from gradcli.stages import defaults
from gradcli.stages.context import RunContext


@dataclass(frozen=True)
class PcaJob:
    """What a PCA subspace extraction works on, shared by its in-memory and row-block
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


@dataclass(frozen=True)
class PcaPlan:
    """How PCA runs under the memory budget.

    ``form`` "memory" (the P×w block and accumulator held whole, one pass per iteration) or
    "blocks" (row blocks of the stored block, two passes per block and iteration);
    ``chunk_rows`` the row chunks of the P-row arrays it stores (a store read or write in
    flight holds one chunk and its copy: see :data:`STORE_CHUNKS_PER_BLOCK`);
    ``dtype`` the iterations' product dtype; ``fixed_bytes`` what the plan holds beside the
    batches; ``blocks`` [(first_row, end_row, parameter names)]; ``passes`` over the data
    (the statistics pass not counted); ``basis_bytes`` and ``checkpoint_bytes`` on disk at
    most (the checkpoints are deleted once the basis is written)."""

    form: str
    dtype: torch.dtype
    fixed_bytes: int
    blocks: tuple[tuple[int, int, list[str]], ...]
    chunk_rows: int
    passes: int
    basis_bytes: int
    checkpoint_bytes: int

    @property
    def blocked(self) -> bool:
        return self.form == "blocks"

    def describe(self) -> dict:
        """The plan as plain numbers (results, JSON, the subspace's attrs)."""
        return {
            "form": self.form,
            "passes": self.passes,
            "row_blocks": len(self.blocks),
            "disk_bytes": self.basis_bytes + self.checkpoint_bytes,
            "basis_bytes": self.basis_bytes,
            "checkpoint_bytes": self.checkpoint_bytes,
            "iteration_dtype": str(self.dtype).removeprefix("torch."),
        }

    def note(self, p: int, width: int) -> str:
        """One line saying up front what the PCA will do."""
        disk = format_size(self.basis_bytes + self.checkpoint_bytes)
        if not self.blocked:
            return (
                f"PCA in memory ({p:,} parameters x {width} columns): {self.passes} passes "
                f"over the data, up to {disk} on disk (basis and checkpoints)"
            )
        return (
            f"the PCA block ({p:,} parameters x {width} columns, "
            f"{format_size(4 * p * width)} float32) exceeds the memory budget: "
            f"{len(self.blocks)} row blocks, {self.passes} passes over the data, up to {disk} "
            "on disk (basis and checkpoints)"
        )


def pca_plan(
    run: RunContext,
    selection: ParameterSelection,
    width: int,
    n: int,
    iteration_dtype: str,
    *,
    iterations: int = defaults.PCA_ITERATIONS,
    k: int | None = None,
) -> PcaPlan:
    """PCA's memory plan, checked before any pass over the data: in memory when the P×w
    block, its accumulator (and bf16 copy) and the normalisation fit ``PCA_SHARE`` of the
    budget, else row blocks (planned here, so a budget too small even for them is refused
    now). ``k`` (default ``width``) sizes the basis on disk."""
    p = selection.size
    k = width if k is None else k
    budget = run.memory_budget
    need = p * width * 8 + p * NORMALISATION_BYTES + _io_bytes(p, width)
    low = run._iteration_dtype(iteration_dtype)
    if low != torch.float32 and need + p * width * 2 > int(budget * PCA_SHARE):
        low = torch.float32  # no room for the block's bf16 copy: float32 iterations
    if low != torch.float32:
        need += p * width * 2
    basis_bytes = p * k * 4
    if need <= int(budget * PCA_SHARE):
        # two block slots V0/V1 and two partial-sum slots, at most
        checkpoints = 2 * p * width * low.itemsize + 2 * p * width * 4
        whole = ((0, p, list(selection.names)),)
        passes = block_passes("memory", 1, iterations)
        chunk = _chunk_rows(p)
        return PcaPlan("memory", low, need, whole, chunk, passes, basis_bytes, checkpoints)
    if run.group.world > 1:
        raise BadInputError(
            f"PCA with K + p = {width} over {p:,} parameters needs "
            f"{format_size(need)}, over {PCA_SHARE:.0%} of the memory budget, and "
            "the row-block form runs in one process only; raise --memory-budget or "
            "run without torchrun"
        )
    blocks, fixed = _blocks(run, selection, width, n)
    rows = max(stop - start for start, stop, _ in blocks)
    checkpoints = 2 * p * width * 4 + 2 * n * width * 8  # slots S0, S1 and U0, U1
    passes = block_passes("blocks", len(blocks), iterations)
    fixed += rows * (width * 4 + PCA_ROW_BYTES) + _io_bytes(rows, width)
    chunk = _chunk_rows(rows)
    return PcaPlan(
        "blocks", torch.float32, fixed, tuple(blocks), chunk, passes, basis_bytes, checkpoints
    )


def _chunk_rows(rows: int) -> int:
    """Row chunks of PCA's stored P-row arrays: an eighth of a block (``rows`` rows)."""
    return max(1, min(layout.BASIS_CHUNK_ROWS, -(-rows // STORE_CHUNKS_PER_BLOCK)))


def _io_bytes(rows: int, width: int) -> int:
    """A store read or write in flight: one decoded chunk of a block of ``rows`` rows and
    its copy, float32."""
    return 2 * _chunk_rows(rows) * width * 4


def blocked_fixed_bytes(p: int, width: int, n: int) -> int:
    """What the row-block form holds whatever the block: U = G V (n, w) float64 and its
    float32 copy, the caller's mean and scale (P,) float32 and a few (w, w) float64
    matrices (Gram, factor, inverse, rotation)."""
    return n * width * 12 + n * 8 + p * 8 + 4 * width * width * 8


def _blocks(
    run: RunContext, selection: ParameterSelection, width: int, n: int
) -> tuple[list[tuple[int, int, list[str]]], int]:
    """Row blocks for PCA whose V or Y rows (float32) fit the basis share of the budget
    beside what the form holds anyway; the fewest there can be (a block may cut a
    parameter). Returns the blocks and those fixed bytes."""
    fixed = blocked_fixed_bytes(selection.size, width, n)
    left = int(run.memory_budget * BASIS_SHARE) - fixed
    if left < run.memory_budget // 8:
        raise BadInputError(
            f"PCA over {n:,} samples keeps U = G V ({n:,} x {width}, "
            f"{format_size(n * width * 8)}) and, with the normalisation of "
            f"{selection.size:,} parameters, {format_size(fixed)} in memory, too much of the "
            f"memory budget's {format_size(run.memory_budget)}; raise --memory-budget, "
            "lower --max-samples or --k, or leave parameters out with --params"
        )
    row_bytes = width * 4 + PCA_ROW_BYTES + -(-width * 8 // STORE_CHUNKS_PER_BLOCK)
    ranges = plan_row_ranges(selection.sizes, row_bytes, left, fewest=True, what="PCA's block")
    return [(a, b, names_in(selection, a, b)) for a, b in ranges], fixed


def pca_blocks(run: RunContext, selection: ParameterSelection, width: int, n: int) -> list:
    """Row blocks [(first_row, end_row, names)] for PCA under the budget (see
    :func:`pca_plan`)."""
    return _blocks(run, selection, width, n)[0]


def names_in(selection: ParameterSelection, start: int, stop: int) -> list[str]:
    """Names of the selected parameters with rows in [start, stop)."""
    ends = np.cumsum(selection.sizes)
    return [
        name
        for name, end, size in zip(selection.names, ends, selection.sizes, strict=True)
        if end > start and end - size < stop
    ]


def start_rows(seed: int, start: int, stop: int, width: int) -> torch.Tensor:
    """Rows [start, stop) of PCA's seeded Gaussian start (P, width) float32, before
    orthonormalisation: chunks of START_CHUNK_ROWS rows, each from its own seeded
    generator, so any row range is drawn without the rows before it and the in-memory and
    row-block forms start from the same block."""
    out = torch.empty(max(0, stop - start), width)
    chunk = start // START_CHUNK_ROWS
    while chunk * START_CHUNK_ROWS < stop:
        first = chunk * START_CHUNK_ROWS
        generator = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
        rows = torch.randn(START_CHUNK_ROWS, width, generator=generator)
        a, b = max(first, start), min(first + START_CHUNK_ROWS, stop)
        out[a - start : b - start] = rows[a - first : b - first]
        chunk += 1
    return out
