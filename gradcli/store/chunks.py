"""Row-chunked stage arrays with one ``done`` marker per chunk, and flag vectors.

A stage that many processes fill at once (``embed --shard``) or that a killed run resumes
writes whole row chunks and then marks each done in its own stored object (an array with
chunk size 1), so concurrent writers never share a marker and a rerun starts at the first
chunk not done. Creating these arrays is separate from plain array I/O (:mod:`.arrays`)
because it decides what to keep for resuming and never overwrites what another writer made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from gradcli.errors import StaleStoreError
from gradcli.store.arrays import _create_quietly, _writes, codecs

if TYPE_CHECKING:
    from gradcli.store.runstore import RunStore


@dataclass
class RowChunks:
    """Arrays of one stage that share a row count and row chunking, plus per-chunk done markers.

    Write a chunk's rows in every array with :meth:`write`, then :meth:`mark_done`; readers
    and resumers trust only chunks marked done.
    """

    group: zarr.Group
    n_rows: int
    chunk_rows: int
    owner: RunStore | None = None  # reads go through it: a damaged chunk is named

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows) if self.n_rows else 0

    def chunk_range(self, index: int) -> range:
        """Rows of chunk ``index``."""
        start = index * self.chunk_rows
        return range(start, min(start + self.chunk_rows, self.n_rows))

    @property
    def meta(self) -> dict[str, Any]:
        """What the first writer recorded with the done markers (e.g. the batch size)."""
        return self.group["done"].attrs.asdict() if self.n_chunks else {}

    def done(self) -> np.ndarray:
        """(n_chunks,) bool: which chunks are complete."""
        if self.n_chunks == 0:
            return np.zeros(0, dtype=bool)
        if self.owner is not None:
            return np.asarray(self.owner.read(f"{self.group.path}/done"), dtype=bool)
        return np.asarray(self.group["done"][:], dtype=bool)

    def pending(self) -> list[int]:
        """Indices of chunks still to compute, in order."""
        return [int(i) for i in np.flatnonzero(~self.done())]

    @_writes
    def write(self, index: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write whole rows of chunk ``index`` into each named array."""
        rows = self.chunk_range(index)
        for name, data in arrays.items():
            if data.shape[0] != len(rows):
                raise ValueError(
                    f"{name}: chunk {index} needs {len(rows)} rows, got {data.shape[0]}"
                )
            self.group[name][rows.start : rows.stop] = data

    @_writes
    def mark_done(self, index: int) -> None:
        self.group["done"][index] = True

    def read(self, name: str) -> np.ndarray:
        if self.owner is not None:
            return self.owner.read(f"{self.group.path}/{name}")
        return np.asarray(self.group[name][:])

    def read_chunk(self, name: str, index: int) -> np.ndarray:
        """Rows of chunk ``index`` of one array."""
        rows = self.chunk_range(index)
        if self.owner is not None:
            return self.owner.read_rows(f"{self.group.path}/{name}", rows.start, rows.stop)
        return np.asarray(self.group[name][rows.start : rows.stop])


class Flags:
    """A vector of booleans, one stored object each, so concurrent writers never collide."""

    def __init__(self, array: zarr.Array) -> None:
        self._array = array

    def __getitem__(self, index: int) -> bool:
        return bool(self._array[index])

    @_writes
    def __setitem__(self, index: int, value: bool) -> None:
        self._array[index] = value

    def all(self) -> np.ndarray:
        return np.asarray(self._array[:], dtype=bool)


def open_row_chunks(
    group: zarr.Group,
    path: str,
    n_rows: int,
    chunk_rows: int,
    arrays: Mapping[str, tuple[tuple[int, ...], str]],
    *,
    shared: bool,
    meta: Mapping[str, Any] | None,
    owner: RunStore,
) -> RowChunks:
    """Create (or reopen) the row-chunked arrays of stage ``group``, at ``path`` in the
    store (see :meth:`RunStore.row_chunks`): ``arrays`` maps a name to (trailing shape,
    dtype), each gets (n_rows, *trailing shape); plus the (n_chunks,) bool ``done`` markers."""
    first = next(iter(arrays))
    if first in group and group[first].shape[:1] == (n_rows,) and "done" in group:
        chunk_rows = int(group[first].chunks[0])  # resume with the chunking already on disk
    n_chunks = -(-n_rows // chunk_rows) if n_rows else 0
    specs = {
        name: {
            "shape": (n_rows, *tail),
            "dtype": dtype,
            "chunks": (chunk_rows, *tail),
            "fill_value": 0,
            "compressors": codecs(),
        }
        for name, (tail, dtype) in arrays.items()
    }
    specs["done"] = {
        "shape": (n_chunks,),
        "dtype": "bool",
        "chunks": (1,),
        "fill_value": False,
        "attributes": dict(meta or {}),
        "compressors": codecs(),
    }
    for name, spec in specs.items():
        if name in group and tuple(group[name].shape) == spec["shape"]:
            continue
        if shared:
            _create_quietly(group, name, **spec)
            if tuple(group[name].shape) != spec["shape"]:
                raise StaleStoreError(
                    f"{path}/{name} in {owner.url} has shape {tuple(group[name].shape)}, not "
                    f"{spec['shape']}; use a new --name or --store"
                )
        else:
            group.create_array(name, overwrite=True, **spec)
    return RowChunks(group=group, n_rows=n_rows, chunk_rows=chunk_rows, owner=owner)


def open_flags(group: zarr.Group, name: str, size: int, *, shared: bool) -> Flags:
    """The (size,) bool flag vector ``name`` of ``group`` (created all False if absent;
    ``shared``: created only, never overwritten, as concurrent writers need)."""
    spec = {
        "shape": (size,),
        "dtype": "bool",
        "chunks": (1,),
        "fill_value": False,
        "compressors": codecs(),
    }
    if shared:
        _create_quietly(group, name, **spec)
    elif name not in group or tuple(group[name].shape) != (size,):
        group.create_array(name, overwrite=True, **spec)
    return Flags(group[name])
