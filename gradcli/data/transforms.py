"""Preprocessing: raw uint8 images → normalised model inputs, batched and vectorised.

Channel conversion, torchvision's Resize + CenterCrop rules, antialiased bilinear resizing,
and a PIL-exact bilinear (fixed-point coefficients, 8-bit rounding) for models trained on
PIL-resized images. Pure tensor functions with no dataset or file behind them, kept apart so
that the loaders and any caller holding a batch of images use the same arithmetic.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from gradcli.config import Preprocess
from gradcli.errors import BadInputError

# ITU-R BT.601 luma weights, the ones PIL uses for RGB → L.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def preprocess_batch(images: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """Raw images (B, H, W, C) uint8, C in {1, 3} → model inputs (B, C', h, w) float32.

    Channels are converted to ``preprocess.channels`` (grey replicated, colour → BT.601 luma),
    the image is resized (shorter side to ``resize`` then centre crop, or straight to
    ``input_size``; bilinear with antialiasing; kept at its size when ``input_size`` is None),
    scaled to [0, 1] and normalised by mean/std. With ``resize_rounding="uint8"`` luma and
    resized pixels are rounded to 8 bits exactly as PIL does, so that the result equals
    torchvision's ``Resize`` + ``CenterCrop`` on PIL images followed by ``ToTensor`` and
    ``Normalize``; ``"float"`` keeps the interpolated values.
    """
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected (B, H, W, 1|3) images, got shape {tuple(images.shape)}")
    if preprocess.resize_rounding == "uint8":
        x = images.permute(0, 3, 1, 2).to(torch.int64)
        if preprocess.channels == 1 and x.shape[1] == 3:
            x = _pil_luma(x)
        x = _resize(x.to(torch.float64), preprocess, _pil_bilinear).to(torch.float32)
    else:
        x = images.permute(0, 3, 1, 2).to(torch.float32)
        if preprocess.channels == 1 and x.shape[1] == 3:
            luma = torch.tensor(_LUMA_WEIGHTS, dtype=torch.float32).view(1, 3, 1, 1)
            x = (x * luma).sum(dim=1, keepdim=True)
        x = _resize(x, preprocess, _bilinear)
    if preprocess.channels == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x / 255.0 - mean) / std


def _resize(
    x: torch.Tensor,
    preprocess: Preprocess,
    interpolate: Callable[[torch.Tensor, int, int, tuple[int, int, int, int]], torch.Tensor],
) -> torch.Tensor:
    """(B, C, H, W) → (B, C, h, w), following torchvision's Resize + CenterCrop rules.

    ``interpolate(x, height, width, window)`` resizes to height × width and returns the
    ``window`` (top, left, rows, columns) of the result."""
    if preprocess.input_size is None:
        return x
    height, width = x.shape[-2:]
    target_h, target_w = preprocess.input_size
    if preprocess.resize is None:
        if (height, width) != (target_h, target_w):
            x = interpolate(x, target_h, target_w, (0, 0, target_h, target_w))
        return x
    short, long = min(height, width), max(height, width)
    new_short, new_long = preprocess.resize, int(preprocess.resize * long / short)
    new_h, new_w = (new_short, new_long) if height <= width else (new_long, new_short)
    if new_h < target_h or new_w < target_w:
        raise BadInputError(
            f"--resize {preprocess.resize} makes a {height}x{width} image {new_h}x{new_w}, smaller "
            f"than --input-size {target_h}x{target_w}; use a --resize of at least "
            f"{max(target_h, target_w)}"
        )
    top = int(round((new_h - target_h) / 2.0))
    left = int(round((new_w - target_w) / 2.0))
    if (new_h, new_w) != (height, width):
        return interpolate(x, new_h, new_w, (top, left, target_h, target_w))
    return x[..., top : top + target_h, left : left + target_w]


def _bilinear(
    x: torch.Tensor, height: int, width: int, window: tuple[int, int, int, int]
) -> torch.Tensor:
    top, left, rows, columns = window
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x[..., top : top + rows, left : left + columns]


# PIL's fixed-point resampling: coefficients carry 22 fractional bits (32 - 8 - 2).
_PIL_PRECISION_BITS = 22


def _pil_luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) int64 RGB → (B, 1, H, W) int64 luma, rounded as PIL's ``convert("L")``."""
    weights = torch.tensor((19595, 38470, 7471), dtype=torch.int64).view(1, 3, 1, 1)
    return ((x * weights).sum(dim=1, keepdim=True) + 0x8000) >> 16


@functools.lru_cache(maxsize=128)
def _pil_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """PIL's bilinear (antialiased) coefficients for one axis as a dense (in, out) float64
    matrix of its fixed-point integers (22 fractional bits)."""
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear filter's support is 1
    ksize = int(np.ceil(support)) * 2 + 1
    centers = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum(np.trunc(centers - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(centers + support + 0.5).astype(np.int64), in_size) - xmin
    offsets = np.arange(ksize, dtype=np.int64)
    valid = offsets[None, :] < xmax[:, None]
    position = (offsets[None, :] + xmin[:, None] - centers[:, None] + 0.5) * (1.0 / filterscale)
    weights = np.where(valid, np.clip(1.0 - np.abs(position), 0.0, None), 0.0)
    total = np.zeros(out_size)
    for tap in range(ksize):  # summed in PIL's order, tap by tap
        total = total + weights[:, tap]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0, 1, total)[:, None], 0)
    fixed = np.trunc(weights * (1 << _PIL_PRECISION_BITS) + np.where(weights < 0, -0.5, 0.5))
    matrix = np.zeros((in_size, out_size))
    rows = np.where(valid, offsets[None, :] + xmin[:, None], 0)
    np.add.at(matrix, (rows, np.arange(out_size)[:, None]), np.where(valid, fixed, 0.0))
    return torch.from_numpy(matrix)


def _pil_round(total: torch.Tensor) -> torch.Tensor:
    """Fixed-point sums → 8-bit values as PIL: add one half, shift, clip to 0..255."""
    total += 1 << (_PIL_PRECISION_BITS - 1)
    return total.div_(1 << _PIL_PRECISION_BITS).floor_().clamp_(0, 255)


def _pil_bilinear(
    x: torch.Tensor, height: int, width: int, window: tuple[int, int, int, int]
) -> torch.Tensor:
    """(B, C, H, W) float64 integers in 0..255 → the ``window`` (top, left, rows, columns)
    of the image resized to height × width, exactly as PIL's ``Image.resize(..., BILINEAR)``:
    two separable passes, each rounded to 8 bits, in PIL's order (vertical first when the
    height shrinks more than twice as much as the width). Each pass is one float64 matrix
    product whose integer products and sums stay below 2^53, so it is PIL's integer
    arithmetic exactly; only the window's rows and columns are computed."""
    in_h, in_w = x.shape[-2:]
    top, left, rows, columns = window
    horizontal_first = not (in_h - height > 0 and in_h - height > (in_w - width) * 2)

    def horizontal(t: torch.Tensor) -> torch.Tensor:
        if in_w == width:
            return t[..., left : left + columns]
        return _pil_round(t @ _pil_matrix(in_w, width)[:, left : left + columns])

    def vertical(t: torch.Tensor) -> torch.Tensor:
        if in_h == height:
            return t[..., top : top + rows, :]
        return _pil_round(_pil_matrix(in_h, height)[:, top : top + rows].T @ t)

    return vertical(horizontal(x)) if horizontal_first else horizontal(vertical(x))
