"""What a gradient is: the parameter selection, the free energy, and its per-sample gradient.

For a classifier f with parameters θ and an input x, ``g(x) = ∇θ E(x)`` with the free energy
``E(x) = -logsumexp_y f_y(x)``, flattened over the selected parameters in
``named_parameters()`` order (P entries). :class:`EnergyGradients` forms it with torch.func
for any module: the engine's fallback and the reference form. Kept apart from the engine so
the definition of the gradient is readable without the tiling machinery.
"""

from __future__ import annotations

import fnmatch
import warnings
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
        # torch.func cannot call a TorchScript module: one backward per sample instead.
        self._scripted = isinstance(model, torch.jit.ScriptModule)

    def _one_by_one(self, x: torch.Tensor) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        chosen = [params[n] for n in self.selection.names]
        rows = []
        with torch.enable_grad():
            for sample in x.split(1):
                grads = torch.autograd.grad(
                    energy(self.model(sample))[0],
                    chosen,
                    allow_unused=True,
                    materialize_grads=True,  # zeros for parameters the energy does not reach
                )
                rows.append(torch.cat([g.reshape(-1) for g in grads]))
        return torch.stack(rows).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) inputs -> (B, P) float32 gradients."""
        if self._scripted:
            return self._one_by_one(x)
        with torch.enable_grad(), warnings.catch_warnings():
            # torch.func has no batching rule for fused attention yet and says so every call.
            warnings.filterwarnings("ignore", message="There is a performance drop")
            grads = self._per_sample(self._selected, x)
        flat = [grads[n].reshape(x.shape[0], -1) for n in self.selection.names]
        out = torch.cat(flat, dim=1)
        return out.float()
