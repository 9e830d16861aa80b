"""File helpers shared by the dataset readers: image listing, safe unpickling, path names.

Listing image files (flat, recursive, ImageFolder class sub-folders), the "no images here"
error, an unpickler that admits NumPy arrays only, and path/slug normalisation. The built-in
sets, the benchmark layouts and spec resolution all use these, so they live below all three.
"""

from __future__ import annotations

import codecs
import gzip
import os
import pickle
import re
from pathlib import Path

import numpy as np

from gradcli.errors import BadInputError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
_IMAGE_PATTERN = "<image>"


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
