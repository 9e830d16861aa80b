"""Image sources: what a dataset spec resolves to.

An :class:`ImageSource` hands out raw uint8 images and their labels and knows its own
fingerprint; :class:`ArraySource` holds them in memory, :class:`FileSource` decodes files with
:func:`read_image`. Sources only hold paths or arrays, so they pickle cheaply into DataLoader
workers. They sit apart from where images come from (built-in and benchmark sets, specs) and
from what is done with them (preprocessing, loaders), both of which build on this module.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from gradcli.errors import BadInputError


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
