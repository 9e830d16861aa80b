"""Projection of gradient tiles onto a basis: ``z = ((g - M) / sqrt(var)) · V`` and ``‖G‖²``.

The numerics of the reduced gradient (float64 accumulation in a fixed order, split float32
products, piecewise row norms) and whether a device multiplies bfloat16 natively. Separate
from the engine: it consumes tiles and never touches a model.
"""

from __future__ import annotations

import bisect
import copy
from collections.abc import Sequence

import numpy as np
import torch

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
