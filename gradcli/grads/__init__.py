"""Per-sample energy gradients, their training statistics and their projection (the hot path).

The public face of four modules of one concern each: :mod:`~gradcli.grads.selection` (which
parameters, the free energy and its per-sample gradient by torch.func),
:mod:`~gradcli.grads.statistics` (mean, variance and class sums of gradients),
:mod:`~gradcli.grads.projector` (tiles onto a basis) and :mod:`~gradcli.grads.engine` (the
tiled per-sample gradient engine). Memory sizes come from :mod:`gradcli.budget`;
``TILE_BYTES`` is re-exported here for callers that import it from this package.
"""

from gradcli.budget import TILE_BYTES
from gradcli.grads.engine import LayerGradients
from gradcli.grads.projector import Projector, native_bfloat16, squared_row_norms
from gradcli.grads.selection import (
    EnergyGradients,
    ParameterSelection,
    energy,
    select_parameters,
)
from gradcli.grads.statistics import GradientStatistics, sanitise_variance

__all__ = [
    "TILE_BYTES",
    "EnergyGradients",
    "GradientStatistics",
    "LayerGradients",
    "ParameterSelection",
    "Projector",
    "energy",
    "native_bfloat16",
    "sanitise_variance",
    "select_parameters",
    "squared_row_norms",
]
