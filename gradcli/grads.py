"""Per-sample energy gradients, their training statistics and their projection (the hot path).

For a classifier f with parameters θ and an input x, ``g(x) = ∇θ E(x)`` with the free energy
``E(x) = -logsumexp_y f_y(x)``. Gradients are computed for a whole batch at once with
``torch.func`` (``functional_call`` + ``vmap`` + ``grad``), flattened over the selected
parameters in ``named_parameters()`` order, and projected immediately, so only a batch of
per-sample gradients ever exists, never the N×P matrix of a dataset.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from gradcli.errors import BadInputError


@dataclass(frozen=True)
class ParameterSelection:
    """Which parameters the gradient covers, in ``named_parameters()`` order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    globs: tuple[str, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s)) for s in self.shapes)

    @property
    def size(self) -> int:
        """P, the length of a flattened gradient."""
        return sum(self.sizes)

    def describe(self) -> dict:
        """JSON-able record for the store."""
        return {"globs": list(self.globs), "names": list(self.names), "size": self.size}


def select_parameters(model: nn.Module, globs: Sequence[str] | None = None) -> ParameterSelection:
    """Parameters whose names match any of ``globs`` (default: every trainable parameter)."""
    patterns = tuple(g.strip() for g in (globs or ()) if g.strip())
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or patterns]
    if patterns:
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in named):
                examples = ", ".join(n for n, _ in named[:4])
                raise BadInputError(
                    f"--params pattern '{pattern}' matches no parameter; names look like {examples}"
                )
        named = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, g) for g in patterns)]
    if not named:
        raise BadInputError("the model has no trainable parameters; pass --params to choose some")
    return ParameterSelection(
        names=tuple(n for n, _ in named),
        shapes=tuple(tuple(p.shape) for _, p in named),
        globs=patterns,
    )


def energy(logits: torch.Tensor) -> torch.Tensor:
    """E = -logsumexp over classes; (B, C) -> (B,)."""
    return -torch.logsumexp(logits, dim=-1)


class EnergyGradients:
    """Per-sample ``∇θ E(x)`` of a batch, flattened to (B, P) float32.

    The model must be in eval mode so that BatchNorm uses running statistics and samples are
    independent; parameters outside the selection are held constant.
    """

    def __init__(self, model: nn.Module, selection: ParameterSelection) -> None:
        self.model = model.eval()
        self.selection = selection
        params = dict(model.named_parameters())
        self._selected = {n: params[n].detach() for n in selection.names}
        chosen = set(selection.names)
        self._fixed = {n: p.detach() for n, p in params.items() if n not in chosen}
        self._fixed.update({n: b for n, b in model.named_buffers()})

        def sample_energy(selected: dict, x: torch.Tensor) -> torch.Tensor:
            logits = functional_call(self.model, {**self._fixed, **selected}, (x.unsqueeze(0),))
            return energy(logits)[0]

        self._per_sample = vmap(grad(sample_energy), in_dims=(None, 0))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) inputs -> (B, P) float32 gradients."""
        with torch.enable_grad():
            grads = self._per_sample(self._selected, x)
        flat = [grads[n].reshape(x.shape[0], -1) for n in self.selection.names]
        out = torch.cat(flat, dim=1)
        return out.float()


class GradientStatistics:
    """Running mean, centred variance and per-class sums of gradients, in float64.

    Batches merge with Chan's parallel update, so the variance does not suffer the
    cancellation of ``E[g²] - E[g]²``.
    """

    def __init__(self, size: int, num_classes: int | None = None) -> None:
        self.count = 0
        self.mean = torch.zeros(size, dtype=torch.float64)
        self.m2 = torch.zeros(size, dtype=torch.float64)
        self.class_sums = (
            torch.zeros(num_classes, size, dtype=torch.float64) if num_classes else None
        )
        self.class_counts = np.zeros(num_classes or 0, dtype=np.int64)

    def update(self, grads: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Add a batch: grads (B, P), labels (B,) int64 in [0, C)."""
        g = grads.detach().to("cpu", torch.float64)
        n = g.shape[0]
        if n == 0:
            return
        batch_mean = g.mean(dim=0)
        batch_m2 = ((g - batch_mean) ** 2).sum(dim=0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += batch_m2 + delta**2 * (self.count * n / total)
        self.count = total
        if self.class_sums is not None:
            if labels is None:
                raise ValueError("labels are needed for class sums")
            lab = labels.to("cpu", torch.int64)
            self.class_sums.index_add_(0, lab, g)
            self.class_counts += np.bincount(lab.numpy(), minlength=len(self.class_counts))

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


class Projector:
    """Reduced gradients ``z = ((g - M) / sqrt(var)) · V`` without forming G.

    The mean is subtracted in float32 before the product (centring first keeps the product
    accurate), and ``W = V / sqrt(var)`` is folded once. Also returns ``‖G(x)‖`` per sample.
    """

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor, basis: torch.Tensor) -> None:
        self.mean = mean.float()
        self.inv_scale = (1.0 / scale.double()).float()
        self.weight = (basis.double() / scale.double()[:, None]).float()

    def to(self, device: torch.device | str) -> Projector:
        self.mean = self.mean.to(device)
        self.inv_scale = self.inv_scale.to(device)
        self.weight = self.weight.to(device)
        return self

    def __call__(self, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """grads (B, P) -> (z (B, K) float32, gnorm (B,) float32)."""
        centred = grads - self.mean
        gnorm = torch.linalg.vector_norm(centred * self.inv_scale, dim=1)
        return centred @ self.weight, gnorm


def auto_batch_size(num_params: int, budget_bytes: int = 2 << 30, cap: int = 256) -> int:
    """A batch size whose per-sample gradient buffers (about 4 copies of B×P float32) fit."""
    per_sample = max(1, num_params * 4 * 4)
    return int(max(1, min(cap, budget_bytes // per_sample)))
