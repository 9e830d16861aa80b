"""The average-gradient basis, orthonormalised from the stored class means one parameter block
at a time, so memory holds C×C matrices and one block, never a C×P array.

The normalised class means ``A = (class_meansᵀ − mean) / scale`` (P, C) are orthonormalised by
CholeskyQR2: pass 1 over ``stats/class_means`` sums the Gram matrix ``AᵀA`` (float64) and
writes ``A`` (float32); an in-order Cholesky that skips dependent columns (QR's rank rule and
order, :func:`gradcli.subspace.in_order_cholesky`) gives R; pass 2 writes ``Q₁ = A R⁻¹`` and
sums the Gram of the stored ``Q₁``; pass 3, only when ``Q₁`` is short of orthonormal at float32
resolution, rewrites the basis as ``Q₁ R₂⁻¹``. Each basis column points along its class mean's
part orthogonal to the kept class means before it, as in QR with a positive diagonal.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from gradcli import layout
from gradcli.budget import ag_basis_plan, format_size
from gradcli.errors import BadInputError
from gradcli.progress import NullProgress, Progress
from gradcli.store import MAX_CHUNK_BYTES, SLAB_CHUNKS, RunStore
from gradcli.subspace import in_order_cholesky

# Largest entry of |Q₁ᵀQ₁ − I| that pass 3 leaves alone: float32's resolution (its unit roundoff
# is 6e-8), so only a basis short of orthonormal beyond its own rounding is rewritten.
REORTHOGONALISE_ABOVE = 1e-7
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def _allocate_blocks_apart() -> None:
    """Have the C library serve allocations of 1 MiB and more by mmap, returned to the
    system when freed. glibc otherwise raises that threshold as large buffers are freed and
    keeps later ones in its heap, where the blocks' buffers of differing sizes fragment it:
    the stage's peak resident set came out at twice its plan (P = 200 k, C = 200, a 64 MiB
    budget: 119 MiB above the libraries, 40 MiB with this). Process-wide; nothing where the
    C library has no ``mallopt``."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


@dataclass(frozen=True)
class AgPlan:
    """The AG basis's blocks of parameter rows, planned from the memory budget."""

    classes: int
    params: int
    block_rows: int
    chunk_rows: int  # rows per chunk of the basis and the normalised class means
    fixed_bytes: int  # the C×C float64 matrices and the store's read buffers

    @property
    def blocks(self) -> int:
        return -(-self.params // self.block_rows)

    def bounds(self) -> Iterator[tuple[int, int]]:
        """Parameter row ranges [start, stop) of the blocks, in order."""
        for start in range(0, self.params, self.block_rows):
            yield start, min(self.params, start + self.block_rows)

    def describe(self) -> str:
        """One line: the blocks, the passes and the disk the outputs take."""
        c, p = self.classes, self.params
        return (
            f"average-gradient basis of {c:,} class means x {p:,} parameters: "
            f"{self.blocks:,} block{'s' if self.blocks > 1 else ''} of up to "
            f"{self.block_rows:,} rows, 2 passes over {layout.STATS_CLASS_MEANS} (a third over "
            f"the basis if it needs a second orthonormalisation); on disk before compression "
            f"the basis takes up to {format_size(4 * p * max(1, c - 1))} and "
            f"{layout.SUBSPACE_CLASS_MEANS} {format_size(4 * p * c)}"
        )


def ag_plan(memory_budget: int, classes: int, params: int) -> AgPlan:
    """Plan the AG basis under ``memory_budget`` bytes, or refuse (BadInputError) one whose
    C×C matrices and read buffers do not fit. Output chunks hold at most MAX_CHUNK_BYTES of
    class means and are a power of two rows, so blocks line up with the P-axis chunks of the
    statistics. The store decodes SLAB_CHUNKS chunks of stats/class_means at a time (one
    row of up to BASIS_CHUNK_ROWS float32 columns each), beside their encoded bytes."""
    cap = min(layout.BASIS_CHUNK_ROWS, max(1, MAX_CHUNK_BYTES // (4 * classes)))
    cap = 1 << (cap.bit_length() - 1)
    read_bytes = 2 * SLAB_CHUNKS * 4 * min(params, layout.BASIS_CHUNK_ROWS)
    block_rows, chunk_rows, fixed = ag_basis_plan(classes, params, memory_budget, cap, read_bytes)
    return AgPlan(classes, params, block_rows, chunk_rows, fixed)


def _normalised(store: RunStore, start: int, stop: int, no_variance: bool) -> torch.Tensor:
    """Normalised class means of parameter rows [start, stop): (C, stop − start) float64,
    ``(class_mean − mean) / sqrt(var)`` with the variance's square root taken in float32 as
    the other stages take it."""
    means = store.read_columns(layout.STATS_CLASS_MEANS, start, stop)
    block = torch.from_numpy(means).double()
    del means
    block -= torch.from_numpy(store.read_rows(layout.STATS_MEAN, start, stop)).double()
    if not no_variance:
        var = torch.from_numpy(store.read_rows(layout.STATS_VAR, start, stop))
        block /= var.sqrt().double()
    return block


def write_average_gradient_basis(
    store: RunStore,
    plan: AgPlan,
    no_variance: bool,
    progress: Progress | None = None,
) -> int:
    """Write ``subspace/basis`` (P, K) and ``subspace/class_means`` (P, C), float32, from
    ``stats/class_means`` (C, P) float32 and the statistics' mean and variance (none with
    ``no_variance``), block by block as ``plan`` says. Returns K.

    K is the rank of the normalised class means: centred on the training mean, they sum to
    zero weighted by class size, so K = C − 1, fewer when more of them are dependent.
    """
    progress = progress or NullProgress()
    c, p = plan.classes, plan.params
    counts = np.asarray(store.group_attrs(layout.STATS).get("class_counts", [1] * c))
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise BadInputError(
            f"classes {empty.tolist()[:5]} have no training samples; the average-gradient "
            "subspace needs every class (raise --max-samples or check the labels)"
        )
    progress.note(plan.describe())
    _allocate_blocks_apart()
    gram = torch.zeros(c, c, dtype=torch.float64)
    store.create_rows(layout.SUBSPACE_CLASS_MEANS, (p, c), "float32", chunk_rows=plan.chunk_rows)
    with progress.task("AG basis, pass 1: Gram of the class means", total=p) as advance:
        for start, stop in plan.bounds():
            block = _normalised(store, start, stop, no_variance)
            gram.addmm_(block, block.T)
            rows = torch.empty(stop - start, c, dtype=torch.float32)
            rows.copy_(block.T)
            del block
            store.write_rows(layout.SUBSPACE_CLASS_MEANS, start, rows.numpy())
            del rows
            advance(stop - start)
    factor = in_order_cholesky(gram)
    del gram
    kept = torch.diagonal(factor) > 0
    if not bool(kept.any()):
        raise BadInputError(
            "the class-average gradients span nothing once centred (one class, or classes "
            "whose mean gradients coincide), so the average-gradient subspace would be empty; "
            "use --method pca --k N instead"
        )
    factor = factor[kept]
    factor = factor[:, kept].contiguous()  # R (K, K) of the kept class means
    k = factor.shape[0]
    prefix = bool(kept[:k].all())  # the usual case: only the last class mean dropped
    store.create_rows(layout.BASIS, (p, k), "float32", chunk_rows=plan.chunk_rows)
    gram = torch.zeros(k, k, dtype=torch.float64)
    with progress.task("AG basis, pass 2: orthonormalised class means", total=p) as advance:
        for start, stop in plan.bounds():
            block = _normalised(store, start, stop, no_variance)
            columns = block.T[:, :k] if prefix else block.T[:, kept]
            q = torch.linalg.solve_triangular(factor, columns, upper=True, left=False)
            del block, columns  # q (rows, K) float64 = A R⁻¹
            low = q.float()
            q.copy_(low)  # the stored values: the second round corrects what is stored
            gram.addmm_(q.T, q)
            del q
            store.write_rows(layout.BASIS, start, low.numpy())
            del low
            advance(stop - start)
    del factor
    gram.diagonal().sub_(1.0)
    short = float(gram.abs().max()) > REORTHOGONALISE_ABOVE
    gram.diagonal().add_(1.0)
    if short:
        _reorthogonalise(store, plan, gram, progress)
    return k


def _reorthogonalise(store: RunStore, plan: AgPlan, gram: torch.Tensor, progress: Progress) -> None:
    """The second CholeskyQR round: ``Q ← Q R₂⁻¹`` for ``gram = QᵀQ`` (K, K) float64 of the
    stored basis, read and rewritten block by block."""
    factor, info = torch.linalg.cholesky_ex(gram, upper=True)
    if int(info) != 0:  # the rank rule keeps the kept class means far from this
        raise RuntimeError("the class means' orthonormalisation lost its rank")
    del gram
    with progress.task("AG basis, pass 3: second orthonormalisation", total=plan.params) as advance:
        for start, stop in plan.bounds():
            q = torch.from_numpy(store.read_rows(layout.BASIS, start, stop)).double()
            low = torch.linalg.solve_triangular(factor, q, upper=True, left=False).float()
            del q
            store.write_rows(layout.BASIS, start, low.numpy())
            del low
            advance(stop - start)
