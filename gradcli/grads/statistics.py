"""Training statistics of gradients: running mean, centred variance and class sums.

Fed tile by tile by the engine and merged across shard processes; separate from the engine
because it only consumes tiles (any producer of (B, r) row ranges can feed it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from gradcli.distributed import ProcessGroup


class GradientStatistics:
    """Running mean, centred variance and per-class sums of gradients, in float64 (class
    sums over labelled rows only: label -1 marks an unlabelled sample).

    Fed tile by tile: :meth:`update_rows` for every row range of a batch, then
    :meth:`commit` with the batch size. Batches merge with Chan's parallel update, so the
    variance does not suffer the cancellation of ``E[g²] - E[g]²``.
    """

    def __init__(self, size: int, num_classes: int | None = None) -> None:
        self.count = 0
        self.mean = torch.zeros(size, dtype=torch.float64)
        self.m2 = torch.zeros(size, dtype=torch.float64)
        self.class_sums = (
            torch.zeros(num_classes, size, dtype=torch.float64) if num_classes else None
        )
        self.class_counts = np.zeros(num_classes or 0, dtype=np.int64)

    def update_rows(self, start: int, tile: torch.Tensor, labels: torch.Tensor | None) -> None:
        """Merge a batch's gradients for rows [start, start + r): tile (B, r), labels (B,)."""
        g = tile.detach().to("cpu", torch.float64)
        n = g.shape[0]
        rows = slice(start, start + g.shape[1])
        batch_mean = g.mean(dim=0)
        batch_m2 = ((g - batch_mean) ** 2).sum(dim=0)
        total = self.count + n
        delta = batch_mean - self.mean[rows]
        self.mean[rows] += delta * (n / total)
        self.m2[rows] += batch_m2 + delta**2 * (self.count * n / total)
        if self.class_sums is not None:
            if labels is None:
                raise ValueError("labels are needed for class sums")
            lab = labels.to("cpu", torch.int64)
            known = (lab >= 0) & (lab < self.class_sums.shape[0])  # -1: unlabelled (PCA data)
            if not bool(known.all()):
                lab, g = lab[known], g[known]
            self.class_sums[:, rows].index_add_(0, lab, g)

    def commit(self, labels: torch.Tensor) -> None:
        """Close a batch whose tiles were all merged."""
        self.count += int(labels.shape[0])
        if self.class_sums is not None:
            lab = labels.to("cpu", torch.int64).numpy()
            lab = lab[(lab >= 0) & (lab < len(self.class_counts))]
            self.class_counts += np.bincount(lab, minlength=len(self.class_counts))

    def update(self, grads: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Add a whole batch: grads (B, P), labels (B,) int64 in [0, C)."""
        if grads.shape[0] == 0:
            return
        self.update_rows(0, grads, labels)
        self.commit(labels if labels is not None else torch.zeros(grads.shape[0]))

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
        if self.class_sums is not None:
            group.all_reduce_(self.class_sums)
            counts = torch.from_numpy(self.class_counts.astype(np.float64))
            self.class_counts = group.all_reduce_(counts).numpy().round().astype(np.int64)

    def variance(self) -> torch.Tensor:
        """(P,) float64 centred variance (divided by N)."""
        return self.m2 / max(self.count, 1)

    def class_means(self) -> torch.Tensor:
        """(C, P) float64 mean gradient of each class."""
        counts = torch.as_tensor(self.class_counts, dtype=torch.float64).clamp_min(1)
        return self.class_sums / counts[:, None]


def sanitise_variance(var: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Replace zero or non-finite variances by the largest finite one; returns (var, count)."""
    bad = ~torch.isfinite(var) | (var <= 0)
    n_bad = int(bad.sum())
    if n_bad:
        good = var[~bad]
        fill = good.max() if good.numel() else torch.tensor(1.0, dtype=var.dtype)
        var = torch.where(bad, fill, var)
    return var, n_bad
