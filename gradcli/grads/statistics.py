"""Training statistics of gradients: running mean and centred variance, merged batch by batch,
class by class and across shard processes.

Fed tile by tile by the engine; separate from the engine because it only consumes tiles (any
producer of (B, r) row ranges can feed it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gradcli.distributed import ProcessGroup


class GradientStatistics:
    """Running mean and centred variance of gradients, in float64.

    Fed tile by tile: :meth:`update_rows` for every row range of a batch, then
    :meth:`commit` with the batch size. Batches merge with Chan's parallel update, so the
    variance does not suffer the cancellation of ``E[g²] - E[g]²``; whole statistics (one
    class's, one rank's) merge the same way (:meth:`merge`, :meth:`all_reduce`).
    """

    def __init__(self, size: int) -> None:
        self.count = 0
        self.mean = torch.zeros(size, dtype=torch.float64)
        self.m2 = torch.zeros(size, dtype=torch.float64)

    def update_rows(self, start: int, tile: torch.Tensor) -> None:
        """Merge a batch's gradients for rows [start, start + r): tile (B, r)."""
        g = tile.detach().to("cpu", torch.float64)
        n = g.shape[0]
        rows = slice(start, start + g.shape[1])
        batch_mean = g.mean(dim=0)
        batch_m2 = ((g - batch_mean) ** 2).sum(dim=0)
        total = self.count + n
        delta = batch_mean - self.mean[rows]
        self.mean[rows] += delta * (n / total)
        self.m2[rows] += batch_m2 + delta**2 * (self.count * n / total)

    def commit(self, size: int) -> None:
        """Close a batch of ``size`` samples whose tiles were all merged."""
        self.count += int(size)

    def update(self, grads: torch.Tensor) -> None:
        """Add a whole batch: grads (B, P)."""
        if grads.shape[0] == 0:
            return
        self.update_rows(0, grads)
        self.commit(grads.shape[0])

    def merge(self, other: GradientStatistics) -> None:
        """Add the samples ``other`` summarises (Chan's formula, float64, in place, one (P,)
        temporary): ``μ += δ n_b / n``, ``M2 += M2_b + δ² n_a n_b / n`` with ``δ = μ_b − μ``."""
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean.add_(delta, alpha=other.count / total)
        delta.square_().mul_(self.count * other.count / total)
        self.m2.add_(other.m2).add_(delta)
        self.count = total

    def reset(self) -> None:
        """Back to no samples, keeping the arrays."""
        self.count = 0
        self.mean.zero_()
        self.m2.zero_()

    def all_reduce(self, group: ProcessGroup) -> None:
        """Merge the statistics of every rank of ``group`` (a
        :class:`gradcli.distributed.ProcessGroup`) into each, in float64: counts and sums add;
        centred sums combine by Chan's parallel formula ``M2 = Σ_r M2_r + n_r (μ_r − μ)²``."""
        if not group.active:
            return
        n_r = torch.tensor([float(self.count)], dtype=torch.float64)
        total = group.all_reduce_(n_r.clone())
        mean = group.all_reduce_(self.mean * n_r) / total.clamp_min(1)
        self.m2 = group.all_reduce_(self.m2 + n_r * (self.mean - mean) ** 2)
        self.mean = mean
        self.count = int(total.item())

    def variance(self) -> torch.Tensor:
        """(P,) float64 centred variance (divided by N)."""
        return self.m2 / max(self.count, 1)


def sanitise_variance(var: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Replace zero or non-finite variances by the largest finite one; returns (var, count)."""
    bad = ~torch.isfinite(var) | (var <= 0)
    n_bad = int(bad.sum())
    if n_bad:
        good = var[~bad]
        fill = good.max() if good.numel() else torch.tensor(1.0, dtype=var.dtype)
        var = torch.where(bad, fill, var)
    return var, n_bad
