"""The per-sample gradient engine: one batched backward, then per-layer tiles (the hot path).

:class:`LayerGradients` runs one batched forward/backward of ``Σ_i E(x_i)`` with hooks that
keep each layer's input and ask the backward for its output gradient only; per-sample weight
gradients are then formed layer by layer, in tiles of a few output channels, and handed to a
consumer (the statistics, the projection) tile by tile, so the B×P per-sample matrix never
exists. Linear, Conv1d/Conv2d (any stride, padding, dilation, groups), BatchNorm, LayerNorm
and GroupNorm are done natively; parameters of any other module, or of one called more than
once per forward, go through :class:`EnergyGradients` (torch.func). How large a tile may be,
and what a sample costs in memory, is memory policy and lives in :mod:`gradcli.budget`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from gradcli.budget import TILE_BYTES, sample_working_bytes, tile_channels
from gradcli.grads.selection import EnergyGradients, ParameterSelection, energy

# Convolutions with at least this many output positions form per-sample weight gradients by a
# grouped convolution backward rather than unfold + bmm (faster on CPU from here up).
GROUPED_MIN_LENGTH = 256
# BatchNorm weight gradients use an expanded (uncentred) dot product while every channel's
# running |mean| / std is at most this; beyond it the cancellation would cost float32 digits.
BATCHNORM_EXPANDED_MAX_OFFSET = 30.0
NATIVE_TYPES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
)


@dataclass
class _Slot:
    """One selected parameter of a natively handled layer: where its rows go."""

    attr: str  # "weight" or "bias"
    start: int  # first row in the flattened gradient
    size: int


@dataclass
class _Layer:
    """A natively handled module, its selected parameters and what the hooks captured."""

    name: str
    module: nn.Module
    slots: list[_Slot]
    inputs: torch.Tensor | None = None
    grad_output: torch.Tensor | None = None
    edge: int | None = None  # index of the output's gradient edge in the backward
    calls: int = 0


def _unfolded_rows(a: torch.Tensor, kernel, dilation, padding, stride) -> torch.Tensor:
    """A convolution's input patches, (B, C, H, W) -> (B, L, C·kh·kw) contiguous: the
    transpose of ``unfold``, in the layout the per-sample product reads fastest. On CPU a
    depthwise convolution with one-hot kernels writes it directly, as channels-last output
    (exact: each output is one input times 1)."""
    if a.device.type != "cpu":
        return torch.nn.functional.unfold(
            a, kernel, dilation=dilation, padding=padding, stride=stride
        ).transpose(1, 2)
    b, channels = a.shape[:2]
    taps = kernel[0] * kernel[1]
    one_hot = torch.eye(taps, dtype=a.dtype).view(taps, 1, *kernel).repeat(channels, 1, 1, 1)
    patches = torch.nn.functional.conv2d(
        a.contiguous(memory_format=torch.channels_last),
        one_hot,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=channels,
    )
    return patches.permute(0, 2, 3, 1).reshape(b, -1, channels * taps)


def _is_native(module: nn.Module) -> bool:
    if isinstance(module, (nn.modules.batchnorm._BatchNorm)):
        return module.track_running_stats and module.running_mean is not None
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        return module.padding_mode == "zeros" and isinstance(module.padding, tuple)
    return isinstance(module, NATIVE_TYPES)


class LayerGradients:
    """Per-sample ``∇θ E`` for a batch, produced layer by layer in tiles.

    ``capture(x)`` runs one forward and one backward of ``Σ_i E(x_i)`` and returns the logits
    (and the features, when a feature module is given); ``tiles()`` then yields
    ``(start_row, tile)`` pairs, ``tile`` (B, r) float32 holding rows
    ``[start_row, start_row + r)`` of every sample's flattened gradient. Together the tiles
    cover each selected row exactly once, in a fixed order. A tile lives in a reused
    workspace: consume it before asking for the next.
    """

    def __init__(
        self,
        model: nn.Module,
        selection: ParameterSelection,
        *,
        feature_module: nn.Module | None = None,
        only: Sequence[str] | None = None,
        rows: tuple[int, int] | None = None,
        tile_bytes: int = TILE_BYTES,
    ) -> None:
        self.model = model.eval()
        # Rows [lo, hi) of the flattened gradient that tiles cover (a block that cuts a
        # parameter): tiles outside are not formed, tiles across an end are cut.
        self.rows = rows
        self.selection = selection
        self.feature_module = feature_module
        self.tile_bytes = tile_bytes
        starts = np.concatenate([[0], np.cumsum(selection.sizes)[:-1]]).astype(int)
        active = set(only) if only is not None else set(selection.names)
        offset = {
            n: (int(s), int(z))
            for n, s, z in zip(selection.names, starts, selection.sizes, strict=True)
            if n in active and (rows is None or (s < rows[1] and s + z > rows[0]))
        }
        self.layers: list[_Layer] = []
        covered: set[str] = set()
        for name, module in model.named_modules():
            if not _is_native(module):
                continue
            slots = []
            for attr in ("weight", "bias"):
                full = f"{name}.{attr}" if name else attr
                if full in offset and getattr(module, attr, None) is not None:
                    slots.append(_Slot(attr, *offset[full]))
                    covered.add(full)
            if slots:
                self.layers.append(_Layer(name, module, slots))
        self._offset = offset
        self._set_fallback(tuple(n for n in offset if n not in covered))
        self._x: torch.Tensor | None = None
        self._workspace: torch.Tensor | None = None

    def _set_fallback(self, names: tuple[str, ...]) -> None:
        """Route these parameters through torch.func (names kept in selection order)."""
        order = {n: i for i, n in enumerate(self.selection.names)}
        self.fallback_names = tuple(sorted(names, key=order.__getitem__))
        self._fallback = None
        if self.fallback_names:
            params = dict(self.model.named_parameters())
            fallback_selection = ParameterSelection(
                names=self.fallback_names,
                shapes=tuple(tuple(params[n].shape) for n in self.fallback_names),
                globs=(),
            )
            self._fallback = EnergyGradients(self.model, fallback_selection)
            self._fallback_offsets = [self._offset[n] for n in self.fallback_names]

    # -- capture -----------------------------------------------------------------------
    def _hooks(self, edges: list) -> list:
        handles = []
        for layer in self.layers:

            def forward_hook(module, args, output, layer=layer):
                layer.inputs = args[0].detach()
                layer.calls += 1
                if output.requires_grad:
                    # The edge names this output as produced here, before any in-place op
                    # (ReLU(inplace=True)) rewrites the tensor.
                    layer.edge = len(edges)
                    edges.append(get_gradient_edge(output))

            handles.append(layer.module.register_forward_hook(forward_hook))
        return handles

    def capture(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward and backward of a batch (B, ...): returns (logits (B, C), features or None).

        The backward asks only for the layers' output gradients, so no parameter gradient
        is formed and it stops at the lowest selected layer.
        """
        for layer in self.layers:
            layer.inputs = layer.grad_output = layer.edge = None
            layer.calls = 0
        captured: list[torch.Tensor] = []
        edges: list = []
        handles = self._hooks(edges)
        if self.feature_module is not None:
            handles.append(
                self.feature_module.register_forward_pre_hook(
                    lambda _m, args: captured.append(args[0])
                )
            )
        try:
            with torch.enable_grad():
                logits = self.model(x)
                if edges:
                    grads = torch.autograd.grad(energy(logits).sum(), edges, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        for layer in self.layers:
            if layer.edge is not None:
                layer.grad_output = grads[layer.edge]
        odd = [layer for layer in self.layers if layer.calls != 1]
        if odd:
            # A module whose parameters are used without calling it (attention's out_proj),
            # or one called more than once (shared weights): its hooks cannot give the
            # per-sample gradient, so torch.func computes those instead.
            names = [
                f"{la.name}.{slot.attr}" if la.name else slot.attr
                for la in odd
                for slot in la.slots
            ]
            self.layers = [layer for layer in self.layers if layer.calls == 1]
            self._set_fallback(self.fallback_names + tuple(names))
        self._x = x
        features = captured[-1].detach().flatten(1).float() if captured else None
        return logits.detach(), features

    def sample_bytes(self) -> int:
        """Working memory per sample of the last capture: activations kept for the backward,
        hook captures, unfolded convolution inputs and the fallback's per-sample copies
        (sized by :func:`gradcli.budget.sample_working_bytes`)."""
        captures = []
        for layer in self.layers:
            if layer.inputs is None:
                continue
            taps = 1
            if isinstance(layer.module, nn.Conv1d | nn.Conv2d):
                taps = int(np.prod(layer.module.kernel_size))
            grad_output = layer.grad_output.numel() if layer.grad_output is not None else 0
            captures.append((layer.inputs.numel(), taps, grad_output))
        fallback_rows = sum(
            self.selection.sizes[self.selection.names.index(n)] for n in self.fallback_names
        )
        return sample_working_bytes(captures, self._x.shape[0], fallback_rows)

    def release(self) -> None:
        """Drop the last capture and the tile workspace (a finished block keeps no memory)."""
        for layer in self.layers:
            layer.inputs = layer.grad_output = None
        self._x = None
        self._workspace = None

    # -- tiles -------------------------------------------------------------------------
    def _buffer(self, numel: int, device: torch.device) -> torch.Tensor:
        ws = self._workspace
        if ws is None or ws.numel() < numel or ws.device != device:
            ws = self._workspace = torch.empty(numel, device=device)
        return ws[:numel]

    def _wanted(self, first: int, end: int) -> bool:
        """Whether rows [first, end) meet the engine's row range (see ``rows``)."""
        return self.rows is None or (first < self.rows[1] and end > self.rows[0])

    def tiles(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start_row, tile (B, r) float32) covering every selected parameter once
        (every selected row in ``rows`` when given).

        Tiles are scratch: a consumer may overwrite one (it is never a view of the captured
        activations, and the next tile does not read it)."""
        if self.rows is None:
            yield from self._all_tiles()
            return
        lo, hi = self.rows
        for start, tile in self._all_tiles():
            first, end = max(start, lo), min(start + tile.shape[1], hi)
            if first >= end:
                continue
            if first == start and end == start + tile.shape[1]:
                yield start, tile
            else:  # a tile across an end of the range: its rows inside, contiguous
                yield first, tile[:, first - start : end - start].contiguous()

    def _all_tiles(self) -> Iterator[tuple[int, torch.Tensor]]:
        for layer in self.layers:
            if layer.grad_output is None:  # the output does not reach the energy
                b = self._x.shape[0]
                for slot in layer.slots:
                    yield slot.start, torch.zeros(b, slot.size, device=self._x.device)
                continue
            yield from self._layer_tiles(layer)
        if self._fallback is not None:
            grads = self._fallback(self._x)
            column = 0
            for start, size in self._fallback_offsets:
                yield start, grads[:, column : column + size]
                column += size

    def _layer_tiles(self, layer: _Layer):
        module = layer.module
        if isinstance(module, nn.Linear):
            yield from self._linear(layer)
        elif isinstance(module, nn.Conv1d | nn.Conv2d):
            yield from self._conv(layer)
        else:
            yield from self._norm(layer)

    def _linear(self, layer: _Layer):
        a, go = layer.inputs, layer.grad_output
        b = a.shape[0]
        a3 = a.reshape(b, -1, a.shape[-1]).float()
        g3 = go.reshape(b, -1, go.shape[-1]).float()
        for slot in layer.slots:
            if slot.attr == "bias":
                yield slot.start, g3.sum(dim=1)
                continue
            in_features = a3.shape[2]
            step = tile_channels(g3.shape[2], b, in_features, self.tile_bytes)
            for o0 in range(0, g3.shape[2], step):
                o1 = min(o0 + step, g3.shape[2])
                if not self._wanted(slot.start + o0 * in_features, slot.start + o1 * in_features):
                    continue
                out = self._buffer(b * (o1 - o0) * in_features, a.device).view(
                    b, o1 - o0, in_features
                )
                torch.bmm(g3[:, :, o0:o1].transpose(1, 2), a3, out=out)
                yield slot.start + o0 * in_features, out.view(b, -1)

    def _conv(self, layer: _Layer):
        module = layer.module
        a, go = layer.inputs.float(), layer.grad_output.float()
        b = a.shape[0]
        if isinstance(module, nn.Conv1d):
            a, go = a.unsqueeze(2), go.unsqueeze(2)
            kernel = (1, *module.kernel_size)
            dilation, padding, stride = (
                (1, *module.dilation),
                (0, *module.padding),
                (1, *module.stride),
            )
        else:
            kernel, dilation = module.kernel_size, module.dilation
            padding, stride = module.padding, module.stride
        groups = module.groups
        out_channels = go.shape[1]
        length = go.shape[2] * go.shape[3]
        g3 = go.reshape(b, out_channels, length)
        for slot in layer.slots:
            if slot.attr == "bias":
                yield slot.start, g3.sum(dim=2)
            elif groups == 1 and length >= GROUPED_MIN_LENGTH and a.device.type == "cpu":
                yield from self._conv_grouped(slot, a, go, kernel, dilation, padding, stride)
            elif groups == 1:
                cols_t = _unfolded_rows(a, kernel, dilation, padding, stride)
                fan_in = cols_t.shape[2]
                step = tile_channels(out_channels, b, fan_in, self.tile_bytes)
                for o0 in range(0, out_channels, step):
                    o1 = min(o0 + step, out_channels)
                    if not self._wanted(slot.start + o0 * fan_in, slot.start + o1 * fan_in):
                        continue
                    out = self._buffer(b * (o1 - o0) * fan_in, a.device).view(b, o1 - o0, fan_in)
                    torch.bmm(g3[:, o0:o1], cols_t, out=out)
                    yield slot.start + o0 * fan_in, out.view(b, -1)
            else:
                cols = torch.nn.functional.unfold(
                    a, kernel, dilation=dilation, padding=padding, stride=stride
                )
                fan_in = cols.shape[1] // groups
                per_group = out_channels // groups
                cols_g = cols.view(b, groups, fan_in, length)
                go_g = g3.view(b, groups, per_group, length)
                grads = torch.einsum("bgol,bgcl->bgoc", go_g, cols_g)
                yield slot.start, grads.reshape(b, -1)

    def _conv_grouped(self, slot: _Slot, a, go, kernel, dilation, padding, stride):
        """Per-sample weight gradients of a large-output convolution as one grouped
        convolution backward (one group per sample): on CPU it beats unfold + bmm when the
        output has many positions, and needs no unfolded copy of the input."""
        b, channels = a.shape[:2]
        out_channels = go.shape[1]
        fan_in = channels * kernel[0] * kernel[1]
        step = tile_channels(out_channels, b, fan_in, self.tile_bytes)
        stacked = a.reshape(1, b * channels, *a.shape[2:])
        for o0 in range(0, out_channels, step):
            o1 = min(o0 + step, out_channels)
            if not self._wanted(slot.start + o0 * fan_in, slot.start + o1 * fan_in):
                continue
            part = go[:, o0:o1].reshape(1, b * (o1 - o0), *go.shape[2:])
            shape_only = a.new_empty(1).expand(b * (o1 - o0), channels, *kernel)
            _, grads, _ = torch.ops.aten.convolution_backward(
                part,
                stacked,
                shape_only,
                None,
                stride,
                padding,
                dilation,
                False,
                (0, 0),
                b,
                (False, True, False),
            )
            yield slot.start + o0 * fan_in, grads.view(b, -1)

    def _norm(self, layer: _Layer):
        module = layer.module
        a, go = layer.inputs.float(), layer.grad_output.float()
        b = a.shape[0]
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            inv_std = torch.rsqrt(module.running_var.float() + module.eps)
            offset = module.running_mean.float() * inv_std
            if float(offset.abs().max()) <= BATCHNORM_EXPANDED_MAX_OFFSET:
                # Σ_l go·(a - μ)/σ = (Σ_l go·a - μ Σ_l go)/σ: a batched dot product instead
                # of a normalised copy of the input (5× faster; safe while |μ|/σ is small).
                channels = a.shape[1]
                a3, go3 = a.reshape(b * channels, 1, -1), go.reshape(b * channels, -1, 1)
                summed_go = go3.sum(dim=(1, 2)).view(b, channels)
                for slot in layer.slots:
                    if slot.attr == "bias":
                        yield slot.start, summed_go.clone()  # consumers may overwrite tiles
                    else:
                        dot = torch.bmm(a3, go3).view(b, channels)
                        yield slot.start, dot.mul_(inv_std).sub_(offset * summed_go)
                return
            shape = (1, -1) + (1,) * (a.dim() - 2)
            normalised = (a - module.running_mean.view(shape)) * torch.rsqrt(
                module.running_var.view(shape) + module.eps
            )
            reduce = [d for d in range(2, a.dim())]
        elif isinstance(module, nn.GroupNorm):
            grouped = a.reshape(b, module.num_groups, -1)
            mean = grouped.mean(dim=2, keepdim=True)
            var = grouped.var(dim=2, unbiased=False, keepdim=True)
            normalised = ((grouped - mean) * torch.rsqrt(var + module.eps)).view_as(a)
            reduce = [d for d in range(2, a.dim())]
        else:  # LayerNorm over the trailing normalized_shape
            dims = tuple(range(a.dim() - len(module.normalized_shape), a.dim()))
            mean = a.mean(dim=dims, keepdim=True)
            var = a.var(dim=dims, unbiased=False, keepdim=True)
            normalised = (a - mean) * torch.rsqrt(var + module.eps)
            reduce = list(range(1, a.dim() - len(module.normalized_shape)))
        for slot in layer.slots:
            product = go * normalised if slot.attr == "weight" else go
            summed = product.sum(dim=reduce) if reduce else product.clone()
            yield slot.start, summed.reshape(b, -1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The full (B, P) per-sample gradient matrix: for tests and small models only."""
        self.capture(x)
        out = torch.empty(x.shape[0], self.selection.size, device=x.device)
        for start, tile in self.tiles():
            out[:, start : start + tile.shape[1]] = tile
        return out
