"""Per-sample energy gradients, their training statistics and their projection (the hot path).

For a classifier f with parameters θ and an input x, ``g(x) = ∇θ E(x)`` with the free energy
``E(x) = -logsumexp_y f_y(x)``, flattened over the selected parameters in
``named_parameters()`` order (P entries).

:class:`LayerGradients` is the engine: one batched forward/backward of ``Σ_i E(x_i)`` with
hooks that keep each layer's input and ask the backward for its output gradient only;
per-sample weight gradients are then formed layer by layer, in tiles of a few output channels,
and handed to a consumer (the statistics, the projection) tile by tile, so the B×P per-sample
matrix never exists. Linear, Conv1d/Conv2d (any stride, padding, dilation, groups),
BatchNorm, LayerNorm and GroupNorm are done natively; parameters of any other module, or of
one called more than once per forward, go through :class:`EnergyGradients` (torch.func).
"""

from __future__ import annotations

import bisect
import copy
import fnmatch
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.func import functional_call, grad, vmap

from gradcli.budget import _rows_per_tile
from gradcli.errors import BadInputError

if TYPE_CHECKING:
    from gradcli.distributed import ProcessGroup


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


NORM_PIECE = 4096  # columns per float32 partial norm (see squared_row_norms)
SPLIT_MIN_COLUMNS = 4096  # per part of a split float32 projection (see Projector._parts)
SPLIT_MAX_PARTS = 8


def squared_row_norms(tile: torch.Tensor) -> torch.Tensor:
    """‖row‖² of a tile (B, r) float32, as (B,) float64: float32 norms of pieces of at most
    NORM_PIECE columns summed in float64. One float32 reduction over a whole long row loses
    digits (relative error ~1e-4 at 2.4 M columns, the row of one image's largest weight);
    pieces of 4096 keep it ~1e-7 at the same speed."""
    b, r = tile.shape
    whole = r - r % NORM_PIECE
    total = torch.zeros(b, dtype=torch.float64, device=tile.device)
    if whole:
        pieces = tile[:, :whole].unflatten(1, (whole // NORM_PIECE, NORM_PIECE))
        total += torch.linalg.vector_norm(pieces, dim=2).double().square().sum(dim=1)
    if whole < r:
        total += torch.linalg.vector_norm(tile[:, whole:], dim=1).double().square()
    return total


class Projector:
    """Reduced gradients ``z = ((g - M) / sqrt(var)) · V`` of one row block, tile by tile.

    Each tile is centred and scaled in float32 (centring before any cast keeps a bf16 basis
    accurate) and multiplied by the basis rows held in float32 or bfloat16 (half the
    memory); products are accumulated in float64 in tile order, so a run split into row
    blocks adds exactly the same terms in the same order as an unsplit one. The squared norm
    ``‖G(x)‖²`` is accumulated from the same scaled tile.

    The basis is given as rows (r, K) or, with ``transposed=True``, as (K, r) or a list of
    consecutive (K, r_j) parts: the layout the narrow projection GEMM runs fastest in on CPU
    (1.2-1.8× over rows for K ≤ 200). BLAS rounds differently with the row stride, so a
    transposed basis split into one part per parameter gives bitwise the same products
    whatever row block the parameter falls in. A float32 basis on the right device is used
    as given, without a copy.
    """

    def __init__(
        self,
        mean: torch.Tensor,
        scale: torch.Tensor,
        basis: torch.Tensor | Sequence[torch.Tensor],
        *,
        start: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        transposed: bool = False,
    ) -> None:
        parts = [basis] if isinstance(basis, torch.Tensor) else list(basis)
        if not transposed and len(parts) != 1:
            raise ValueError("a basis in parts must be transposed")
        self.start = start
        sizes = [part.shape[1 if transposed else 0] for part in parts]
        self.stop = start + sum(sizes)
        self._offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
        # G = g·(1/s) - M/s: one fused pass over a tile instead of a subtraction and a
        # scaling. In float32 throughout: no row-block-sized float64 temporaries.
        self.inv_scale = torch.reciprocal(scale.to(device, torch.float32))
        self.shift = torch.mul(mean.to(device, torch.float32), self.inv_scale).neg_()
        self.parts = [part.to(device, dtype) for part in parts]
        self.weight = self.parts[0]
        self.transposed = transposed
        self.dtype = dtype

    @property
    def k(self) -> int:
        return int(self.weight.shape[0 if self.transposed else 1])

    def rebased(self, basis: torch.Tensor, dtype: torch.dtype) -> Projector:
        """The same normalisation over another basis of these rows (and layout), without
        recomputing it: for subspace iteration, which changes the basis every pass."""
        other = copy.copy(self)
        other.weight = basis.to(self.weight.device, dtype)
        other.parts = [other.weight]
        other.dtype = dtype
        return other

    def _workspace(self, shape: torch.Size, dtype: torch.dtype, device: torch.device):
        # Fresh buffers of tens of MB page-fault on first touch; these live across tiles.
        key = "_low" if dtype != torch.float32 else "_work"
        numel = shape[0] * shape[1]
        ws = getattr(self, key, None)
        if ws is None or ws.numel() < numel or ws.device != device:
            ws = torch.empty(numel, dtype=dtype, device=device)
            setattr(self, key, ws)
        return ws[:numel].view(shape)

    def normalise(
        self,
        start: int,
        tile: torch.Tensor,
        out: torch.Tensor | None = None,
        *,
        in_place: bool = False,
    ) -> torch.Tensor:
        """G for rows [start, start + r) of a batch: (tile - M) / sqrt(var), float32 (B, r).

        Written over ``tile`` itself with ``in_place`` (the caller's scratch, as the engine's
        tiles are), else to ``out`` when given, else to a workspace reused by the next call
        (consume the result first).
        """
        local = slice(start - self.start, start - self.start + tile.shape[1])
        if in_place and tile.dtype == torch.float32:
            work = tile
        elif out is None:
            work = self._workspace(tile.shape, torch.float32, tile.device)
        else:
            work = out
        return torch.addcmul(self.shift[local], tile, self.inv_scale[local], out=work)

    def add(
        self,
        start: int,
        tile: torch.Tensor,
        z: torch.Tensor,
        gnorm2: torch.Tensor,
        out: torch.Tensor | None = None,
        *,
        in_place: bool = False,
    ) -> None:
        """Add rows [start, start + r) of a batch: tile (B, r); z (B, K), gnorm2 (B,) float64.

        ``out`` (B, r), float32 or the basis dtype, when given, keeps the normalised tile;
        ``in_place`` lets the tile itself be overwritten (see :meth:`normalise`).
        """
        local = slice(start - self.start, start - self.start + tile.shape[1])
        keep_low = out is not None and out.dtype != torch.float32
        if keep_low and out.dtype != self.dtype:
            raise ValueError("out must be float32 or the basis dtype")
        normalised = self.normalise(
            start, tile, None if keep_low else out, in_place=in_place and (out is None or keep_low)
        )
        gnorm2 += squared_row_norms(normalised)
        if self.dtype != torch.float32:
            low = out if keep_low else self._workspace(tile.shape, self.dtype, tile.device)
            normalised = low.copy_(normalised)
        if self.transposed:
            position = local.start
            while position < local.stop:  # part by part (a tile may straddle parts)
                index = bisect.bisect_right(self._offsets, position) - 1
                first = self._offsets[index]
                end = min(local.stop, first + self.parts[index].shape[1])
                weight_t = self.parts[index][:, position - first : end - first]
                piece = normalised[:, position - local.start : end - local.start]
                z += self._product_t(weight_t, piece).T.double()
                position = end
        else:
            z += self._product(normalised, self.weight[local]).double()

    @staticmethod
    def _parts(tile: torch.Tensor) -> int:
        """How many column slices a float32 CPU product is split into, each one
        single-threaded GEMM of a batch: MKL runs a narrow GEMM's threads far below their
        single-thread rate, a batch of single-thread GEMMs at it (1.2-2× for K ≤ 200). The
        count follows the tile's width alone, never the thread count, so the terms are
        summed in the same order on any number of threads (a plain GEMM's are not: at K = 10
        MKL's 1- and 2-thread products differ in the last bits), and shard processes with
        fewer threads each store bitwise what one process with every thread does."""
        if tile.device.type != "cpu" or tile.dtype != torch.float32 or tile.shape[1] < 2:
            return 1
        return max(2, min(SPLIT_MAX_PARTS, tile.shape[1] // SPLIT_MIN_COLUMNS))

    def _product(self, tile: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """tile (B, r) @ weight (r, K) -> (B, K)."""
        parts = self._parts(tile)
        if parts == 1:
            return tile @ weight
        h = tile.shape[1] // parts
        b, k = tile.shape[0], weight.shape[1]
        left = tile.as_strided((parts, b, h), (h * tile.stride(1), tile.stride(0), tile.stride(1)))
        right = weight.as_strided(
            (parts, h, k), (h * weight.stride(0), weight.stride(0), weight.stride(1))
        )
        total = torch.bmm(left, right).sum(0)
        if parts * h < tile.shape[1]:
            total += tile[:, parts * h :] @ weight[parts * h :]
        return total

    def _product_t(self, weight_t: torch.Tensor, tile: torch.Tensor) -> torch.Tensor:
        """weight_t (K, r) @ tileᵀ -> (K, B)."""
        parts = self._parts(tile)
        if parts == 1:
            return weight_t @ tile.T
        h = tile.shape[1] // parts
        b, k = tile.shape[0], weight_t.shape[0]
        left = weight_t.as_strided(
            (parts, k, h), (h * weight_t.stride(1), weight_t.stride(0), weight_t.stride(1))
        )
        right = tile.as_strided((parts, h, b), (h * tile.stride(1), tile.stride(1), tile.stride(0)))
        total = torch.bmm(left, right).sum(0)
        if parts * h < tile.shape[1]:
            total += weight_t[:, parts * h :] @ tile[:, parts * h :].T
        return total

    def __call__(self, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-matrix form: grads (B, P) -> (z (B, K) float32, ‖G‖ (B,) float32)."""
        z = torch.zeros(grads.shape[0], self.k, dtype=torch.float64, device=grads.device)
        gnorm2 = torch.zeros(grads.shape[0], dtype=torch.float64, device=grads.device)
        self.add(self.start, grads, z, gnorm2)
        return z.float(), gnorm2.sqrt().float()


def native_bfloat16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 natively (a CUDA GPU with bf16, or a CPU with
    AVX512-BF16 or AMX): elsewhere bf16 products are emulated and slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


TILE_BYTES = 32 << 20  # per-sample gradient workspace per tile: small enough to stay cache-warm
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
        tile_bytes: int = TILE_BYTES,
    ) -> None:
        self.model = model.eval()
        self.selection = selection
        self.feature_module = feature_module
        self.tile_bytes = tile_bytes
        starts = np.concatenate([[0], np.cumsum(selection.sizes)[:-1]]).astype(int)
        active = set(only) if only is not None else set(selection.names)
        offset = {
            n: (int(s), int(z))
            for n, s, z in zip(selection.names, starts, selection.sizes, strict=True)
            if n in active
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
        hook captures, unfolded convolution inputs and the fallback's per-sample copies."""
        b = self._x.shape[0]
        total = 0
        for layer in self.layers:
            if layer.inputs is None:
                continue
            factor = 1
            if isinstance(layer.module, nn.Conv1d | nn.Conv2d):
                factor = int(np.prod(layer.module.kernel_size))
            total += layer.inputs.numel() * (2 + factor)
            if layer.grad_output is not None:
                total += layer.grad_output.numel()
        per_sample = 4 * total // b
        if self._fallback is not None:
            per_sample += (
                4
                * sum(
                    self.selection.sizes[self.selection.names.index(n)] for n in self.fallback_names
                )
                * 3
            )
        return per_sample

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

    def tiles(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start_row, tile (B, r) float32) covering every selected parameter once.

        Tiles are scratch: a consumer may overwrite one (it is never a view of the captured
        activations, and the next tile does not read it)."""
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
            step = _rows_per_tile(g3.shape[2], 4 * b * in_features, self.tile_bytes)
            for o0 in range(0, g3.shape[2], step):
                o1 = min(o0 + step, g3.shape[2])
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
                step = _rows_per_tile(out_channels, 4 * b * fan_in, self.tile_bytes)
                for o0 in range(0, out_channels, step):
                    o1 = min(o0 + step, out_channels)
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
        step = _rows_per_tile(out_channels, 4 * b * fan_in, self.tile_bytes)
        stacked = a.reshape(1, b * channels, *a.shape[2:])
        for o0 in range(0, out_channels, step):
            o1 = min(o0 + step, out_channels)
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
