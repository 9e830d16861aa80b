"""DataLoaders over image sources: preprocessed items and batches.

:class:`PreprocessedDataset` joins an :class:`~gradcli.data.sources.ImageSource` to a
:class:`~gradcli.config.Preprocess` (one vectorised call per batch when the images share a
shape) and :func:`make_loader` wraps it in a DataLoader. Kept apart from the sources and the
transforms it combines, so each of those stays free of torch's loading machinery.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gradcli.config import Preprocess
from gradcli.data.sources import ImageSource
from gradcli.data.transforms import preprocess_batch
from gradcli.errors import BadInputError


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
