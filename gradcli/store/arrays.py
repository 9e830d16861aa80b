"""Zarr at the lowest level: opening a store's root, the codecs every array is written with,
creating arrays quietly beside concurrent writers, and moving rows in and out a few chunks at
a time (whole arrays, row ranges, transposing copies).

These functions know arrays and groups but nothing of stages, records or failures of a
command, so the run store above them stays a composition of concerns; with the rest of
:mod:`gradcli.store` this is the only code that touches zarr.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.errors import ContainsArrayError, ContainsGroupError

from gradcli.errors import BadInputError

# Whole-array writes cap a chunk at this many bytes (a basis row block of any width stays a
# modest object), and reads and writes move a few chunks at a time.
MAX_CHUNK_BYTES = 32 << 20
SLAB_CHUNKS = 4
TRANSPOSE_ROWS = 1024  # rows per block of a transposing copy
RESERVED_KEYS = ("zarr.json",)  # Zarr v3's own metadata file: no group or array may take it


def codecs(compress: bool = True) -> tuple:
    """The bytes codecs of every array the store writes: zstd (unless ``compress`` is off)
    and a CRC32C checksum last, so a chunk damaged on disk fails to decode instead of
    decoding into garbage."""
    return (ZstdCodec(level=0), Crc32cCodec()) if compress else (Crc32cCodec(),)


def is_writable(folder: str | os.PathLike) -> bool:
    """Whether this process may write into the existing local ``folder`` (False on a
    read-only file system or without write permission)."""
    return os.access(folder, os.W_OK)


def _member_names(group: zarr.Group) -> list[str]:
    """Names of a group's members; plain files beside them (results.json) are not members."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Object at .* is not recognized")
        return sorted(group.keys())


def open_root(url: str, mode: str, storage_options: Mapping[str, Any] | None = None) -> zarr.Group:
    """The Zarr group at a local path or an fsspec URL (``s3://``, ``gs://``, ``file://``,
    ``memory://`` ...). Credentials come from fsspec's usual environment and config files, or
    from ``storage_options`` (passed to the fsspec filesystem)."""
    if "://" not in url:
        return zarr.open_group(url, mode=mode)
    options = dict(storage_options or {})
    if url.startswith("file://"):
        options.setdefault("auto_mkdir", True)  # fsspec's local files need their folders made
    return zarr.open_group(url, mode=mode, storage_options=options or None)


def _create_quietly(group: zarr.Group, name: str, **spec: Any) -> None:
    """Create array ``name`` unless it exists; never overwrites. Concurrent writers pass the
    same ``spec``, so whichever creates it leaves the metadata every one of them expects."""
    if name in group:
        return
    with contextlib.suppress(ContainsArrayError, ContainsGroupError, FileExistsError):
        group.create_array(name, overwrite=False, **spec)  # another may have created it first


def _writes(method):
    """Turn an OS error while writing (disk full, read-only) into a one-line user error."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            prepare = getattr(self, "_before_write", None)
            if prepare is not None:  # refused on a read-only store; creates a pending one
                prepare(kwargs.get("what") or (args[0] if args else None))
            return method(self, *args, **kwargs)
        except OSError as err:
            url = getattr(self, "url", None) or getattr(self, "where", "the run store")
            reason = err.strerror or str(err)
            raise BadInputError(
                f"cannot write to {url}: {reason}; free space or fix permissions, then rerun "
                "(finished chunks are kept), or choose another --store"
            ) from None

    return wrapper


def read_rows(array: zarr.Array, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of ``array`` (shape (n, ...), any dtype), decoded a few chunks at a
    time into one output array of shape (stop - start, ...), so a large read holds little
    beyond its result."""
    stop = min(stop, array.shape[0])
    out = np.empty((max(0, stop - start), *array.shape[1:]), dtype=array.dtype)
    step = int(array.chunks[0]) * SLAB_CHUNKS
    first = start
    while first < stop:
        last = min(stop, (first // step + 1) * step)
        out[first - start : last - start] = array[first:last]
        first = last
    return out


def read_rows_transposed(array: zarr.Array, bounds: Sequence[int]) -> list[np.ndarray]:
    """Rows [bounds[j], bounds[j + 1]) of a 2-D array (n, d), each part returned transposed
    (d, rows) and C-contiguous in the array's dtype, decoded one chunk at a time (a decoded
    chunk and its rows are all that is held beside the result)."""
    parts = [
        np.empty((array.shape[1], b - a), dtype=array.dtype)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    step = int(array.chunks[0])
    first, stop, part = bounds[0], bounds[-1], 0
    while first < stop:
        last = min(stop, (first // step + 1) * step)
        slab = array[first:last]
        row = first
        while row < last:
            while bounds[part + 1] <= row:
                part += 1
            end = min(last, bounds[part + 1], row + TRANSPOSE_ROWS)  # cache-sized: 4× faster
            at = row - bounds[part]
            parts[part][:, at : at + end - row] = slab[row - first : end - first].T
            row = end
        del slab
        first = last
    return parts


def write_array(
    root: zarr.Group,
    path: str,
    data: np.ndarray,
    *,
    attrs: Mapping[str, Any] | None,
    chunk_rows: int | None,
    compress: bool,
) -> None:
    """Write ``data`` (any shape and dtype) as array ``path`` of ``root``, replacing one,
    chunked along rows (at most ``chunk_rows`` rows and :data:`MAX_CHUNK_BYTES` a chunk) and
    written a few chunks at a time; ``attrs`` go last."""
    data = np.ascontiguousarray(data)
    chunks = None
    if data.ndim >= 1:
        row_bytes = max(1, data[:1].nbytes)
        rows = max(1, min(data.shape[0], chunk_rows or data.shape[0] or 1))
        rows = min(rows, max(1, MAX_CHUNK_BYTES // row_bytes))
        chunks = (rows, *data.shape[1:])
    array = root.create_array(
        path,
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        overwrite=True,
        fill_value=0,
        compressors=codecs(compress),
    )
    if data.ndim == 0:
        array[...] = data
    else:
        step = chunks[0] * SLAB_CHUNKS  # a few chunks in flight at a time: bounded memory
        for first in range(0, data.shape[0], step):
            array[first : first + step] = data[first : first + step]
    if attrs:  # last: attrs such as a provenance record vouch for data already written
        array.attrs.update(dict(attrs))


def create_rows(
    root: zarr.Group,
    path: str,
    shape: tuple[int, ...],
    dtype: str,
    *,
    chunk_rows: int,
    compress: bool,
    chunk_columns: int | None = None,
) -> None:
    """An empty array ``path`` of ``root`` with ``shape`` and ``dtype`` (replacing one),
    chunked along rows (at most ``chunk_rows`` rows and :data:`MAX_CHUNK_BYTES` a chunk) and,
    for a 2-D array given ``chunk_columns``, along columns too (so a block of columns is
    read without decoding whole rows)."""
    trailing = tuple(shape[1:])
    if chunk_columns is not None and len(shape) == 2:
        trailing = (max(1, min(int(chunk_columns), shape[1])),)
    row_bytes = int(np.prod(trailing, dtype=np.int64)) * np.dtype(dtype).itemsize
    rows = max(1, min(chunk_rows, MAX_CHUNK_BYTES // max(1, row_bytes)))
    root.create_array(
        path,
        shape=shape,
        dtype=dtype,
        chunks=(rows, *trailing),
        overwrite=True,
        fill_value=0,
        compressors=codecs(compress),
    )


def write_rows(array: zarr.Array, start: int, data: np.ndarray) -> None:
    """Overwrite rows [start, start + len(data)) of ``array`` with ``data`` (rows of the
    array's trailing shape), a few chunks at a time (writing the same rows again gives the
    same array: safe to redo)."""
    step = int(array.chunks[0]) * SLAB_CHUNKS
    for first in range(0, data.shape[0], step):
        last = min(first + step, data.shape[0])
        array[start + first : start + last] = data[first:last]


def read_columns(array: zarr.Array, start: int, stop: int) -> np.ndarray:
    """Columns [start, stop) of every row of a 2-D array (n, d): (n, stop - start), in the
    array's dtype, decoded a few row chunks at a time."""
    stop = min(stop, array.shape[1])
    out = np.empty((array.shape[0], max(0, stop - start)), dtype=array.dtype)
    step = int(array.chunks[0]) * SLAB_CHUNKS
    for first in range(0, array.shape[0], step):
        out[first : first + step] = array[first : first + step, start:stop]
    return out


def write_columns(array: zarr.Array, start: int, data: np.ndarray) -> None:
    """Overwrite columns [start, start + data.shape[1]) of every row of a 2-D array with
    ``data`` (n, c), a few row chunks at a time (safe to redo)."""
    step = int(array.chunks[0]) * SLAB_CHUNKS
    stop = start + data.shape[1]
    for first in range(0, array.shape[0], step):
        array[first : first + step, start:stop] = data[first : first + step]
