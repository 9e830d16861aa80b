"""Per-sample energy gradients, their training statistics and their projection (the hot path)."""

from gradcli.grads.engine import (
    TILE_BYTES,
    EnergyGradients,
    GradientStatistics,
    LayerGradients,
    ParameterSelection,
    Projector,
    energy,
    native_bfloat16,
    sanitise_variance,
    select_parameters,
    squared_row_norms,
)

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
