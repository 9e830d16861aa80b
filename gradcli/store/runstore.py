"""The run store: one Zarr v3 group per run; the :mod:`gradcli.store` package is the only code
that touches zarr.

Every stage writes into its own group whose attrs carry a *provenance* record: what the
stage was computed from (model hash, parameter selection, K, dataset fingerprint, upstream
digests, options). Reopening a stage with a different provenance is an error that names the
difference, never a silent reuse. Row-chunked arrays get one ``done`` marker per chunk (an
array with chunk size 1), so concurrent writers never share a marker object and a killed run
resumes at the first chunk that is not done.

:class:`RunStore` is the composition: it opens (or lazily makes) the store, guards writes to a
read-only one and gives generic access to groups, attrs and arrays, while the array I/O
(:mod:`.arrays`, :mod:`.chunks`), provenance records (:mod:`.records`), checksums
(:mod:`.integrity`), stage claims (:mod:`.locks`) and failure safety (:mod:`.transactions`)
each live in their own module.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore, MemoryStore

from gradcli import __version__
from gradcli.errors import BadInputError, StaleStoreError
from gradcli.store import arrays as array_io
from gradcli.store.arrays import _member_names, _writes, is_writable, open_root
from gradcli.store.chunks import Flags, RowChunks, open_flags, open_row_chunks
from gradcli.store.integrity import Integrity, _reads
from gradcli.store.locks import StageLocks
from gradcli.store.records import Stages
from gradcli.store.transactions import Transactions

FORMAT_VERSION = 1


class RunStore(Integrity, Stages, Transactions):
    """A run store at a local path or any URL zarr understands (``file://``, ``memory://``, ...).

    A store that does not exist yet is made by the first write, not by opening it, so a
    command that fails on its inputs leaves nothing behind; until then it reads as empty.
    An existing local store this process may not write to (a read-only file system, no
    permission) opens read-only (``read_only`` forces either): everything already in it reads
    as usual, and what would need writing is a one-line error.
    """

    def __init__(
        self,
        url: str,
        *,
        create: bool = True,
        storage_options: Mapping[str, Any] | None = None,
        read_only: bool | None = None,
    ) -> None:
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        self._aside: list[tuple[str, str]] | None = None  # (path, where it was moved)
        self._aside_dir = ""
        self._created: list[str] = []  # stages the running command opened afresh
        self._locks = StageLocks()  # its claims on the stages it computes
        self._root: zarr.Group | None = None  # None until the store exists
        self._empty: zarr.Group | None = None  # what a store not made yet reads as
        self._made_folder: Path | None = None  # the topmost folder its first write made
        local = "://" not in self.url
        if local and Path(self.url).is_file():
            raise BadInputError(
                f"--store {self.url} is a file; name a folder (made if missing) or a URL"
            )
        if not self._exists():
            if not create:
                raise self.missing_error()
            self.read_only = bool(read_only)
            return
        if read_only is None:
            read_only = local and not is_writable(self.url)
        self.read_only = bool(read_only)
        self._open("r" if self.read_only else "r+")

    def _open(self, mode: str) -> None:
        try:
            self._root = open_root(self.url, mode, self.storage_options)
        except FileNotFoundError as err:
            if mode == "a":
                raise BadInputError(
                    f"cannot create a run store at {self.url} ({err.strerror or err}); "
                    "check --store"
                ) from None
            raise BadInputError(
                f"no run store at {self.url}; run 'gradcli extract-subspace' first or check --store"
            ) from None
        except (OSError, PermissionError) as err:
            if "://" not in self.url and Path(self.url).is_file():
                raise BadInputError(
                    f"--store {self.url} is a file; name a folder (made if missing) or a URL"
                ) from None
            raise BadInputError(
                f"cannot open run store {self.url} ({err.strerror or err}); check --store"
            ) from None
        except Exception as err:  # zarr raises its own types for non-group paths
            raise BadInputError(f"{self.url} is not a gradcli run store ({err})") from None
        self._check_format()

    def _exists(self) -> bool:
        """Whether the store's root group is there (made by this or another process)."""
        if "://" not in self.url:
            return (Path(self.url) / "zarr.json").is_file()
        try:
            fs, base = self._filesystem()
            return bool(fs.exists(f"{base}/zarr.json"))
        except Exception:  # unreachable or refused: opening it names the problem
            return True

    def missing_error(self) -> BadInputError:
        """The one-line error for reading a store that was never made."""
        return BadInputError(
            f"no run store at {self.url}; make one with 'gradcli extract-subspace --model ... "
            f"--dataset ... --store {self.url}' or check --store"
        )

    def require(self) -> None:
        """Raise :meth:`missing_error` unless the store has been made."""
        if not self.exists:
            raise self.missing_error()

    @property
    def exists(self) -> bool:
        """Whether the store has been made (by a write of this or another process)."""
        return self._root is not None or self._exists()

    @property
    def root(self) -> zarr.Group:
        """The store's root group; an empty in-memory group while the store is not made."""
        if self._root is None:
            if self._exists():  # made meanwhile (another rank, another command)
                self._open("r" if self.read_only else "r+")
                return self._root
            if self._empty is None:
                self._empty = zarr.open_group(MemoryStore(), mode="w")
            return self._empty
        return self._root

    def _before_write(self, what: str | None = None) -> None:
        """Refuse a write to a read-only store, naming what needed it; make the store on its
        first write."""
        if self.read_only:
            raise self.read_only_error(what)
        if self._root is not None or self._exists():
            self.root  # noqa: B018 - opens a store another process made meanwhile
            return
        if "://" not in self.url:
            folder, top = Path(self.url).absolute(), None
            while not folder.exists():
                folder, top = folder.parent, folder
            self._made_folder = top
        self._open("a")

    def read_only_error(self, what: str | None = None) -> BadInputError:
        """The one-line error for a write a read-only store cannot take."""
        needed = f"{what} is not in it and needs computing" if what else "it needs writing"
        return BadInputError(
            f"store {self.url} is read-only and {needed}; work on a writable copy "
            f"(cp -r {self.url} COPY, then --store COPY), or compute it where the store is "
            "writable"
        )

    def write_text(self, name: str, text: str) -> str:
        """Write a plain file ``name`` (results.json) at the store's top level, beside its
        arrays, on a local disk or an object store alike; returns where it went."""
        if self.read_only:
            raise self.read_only_error(name)
        self._before_write(name)
        if "://" not in self.url:
            target = Path(self.url) / name
            target.write_text(text)
            return str(target)
        import fsspec

        target = self.url.rstrip("/") + "/" + name
        with fsspec.open(target, "w", **self.storage_options) as handle:
            handle.write(text)
        return target

    def read_text(self, name: str) -> str | None:
        """A plain file ``name`` at the store's top level; None when there is none."""
        if "://" not in self.url:
            target = Path(self.url) / name
            return target.read_text() if target.is_file() else None
        import fsspec

        try:
            with fsspec.open(self.url.rstrip("/") + "/" + name, "r", **self.storage_options) as f:
                return f.read()
        except FileNotFoundError:
            return None

    # -- root metadata -----------------------------------------------------------------
    def _check_format(self) -> None:
        attrs = self.root.attrs.asdict()
        version = attrs.get("format_version")
        if version is None:
            if _member_names(self.root):
                raise BadInputError(
                    f"{self.url} is a Zarr group but not a gradcli run store; "
                    "choose another --store"
                )
            if not self.read_only:
                self.update_root()
            return
        if version > FORMAT_VERSION:
            raise StaleStoreError(
                f"store {self.url} has format {version}, newer than this gradcli's "
                f"{FORMAT_VERSION}; "
                "upgrade gradcli or use a new --store"
            )

    @property
    def attrs(self) -> dict[str, Any]:
        """The root attrs: format version, model record, ID specs."""
        return self.root.attrs.asdict()

    @property
    def local_folder(self) -> Path | None:
        """The store's folder on a local disk, or None for other stores."""
        if "://" not in self.url:  # also before its first write makes it
            return Path(self.url)
        store = self.root.store
        return Path(store.root) if isinstance(store, LocalStore) else None

    @_writes
    def update_root(self, **values: Any) -> None:
        """Merge values into the root attrs, stamping version and format."""
        base = {"gradcli_version": __version__, "format_version": FORMAT_VERSION}
        if "created" not in self.root.attrs:
            base["created"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        self.root.attrs.update({**base, **values})

    # -- generic access ----------------------------------------------------------------
    def has(self, path: str) -> bool:
        """Whether a group or array exists at ``path``."""
        return path in self.root

    def group_attrs(self, path: str) -> dict[str, Any]:
        """The attrs of the group or array at ``path``; {} when there is none."""
        return self.root[path].attrs.asdict() if path in self.root else {}

    @_writes
    def set_attrs(self, path: str, **values: Any) -> None:
        """Update (merge into) the attrs at ``path``."""
        self.root[path].attrs.update(values)

    def put_group(self, path: str, *, cache: bool = False, **attrs: Any) -> None:
        """A group that holds only attrs (a results table), replacing one at ``path``.
        ``cache``: kept only to be reused, so skipped on a read-only store."""
        if cache and self.read_only:
            return
        self._put_group(path, **attrs)

    @_writes
    def _put_group(self, path: str, **attrs: Any) -> None:
        self.delete(path)
        self.root.require_group(path).attrs.update(attrs)

    def children(self, path: str = "") -> list[str]:
        """Names of the members of the group at ``path`` (the root by default); [] for an array."""
        node = self.root[path] if path else self.root
        if not isinstance(node, zarr.Group):
            return []
        return _member_names(node)

    @_reads
    def read(self, path: str) -> np.ndarray:
        """The whole array at ``path``."""
        array = self.root[path]
        if array.ndim == 0:
            return np.asarray(array[...])
        return self.read_rows(path, 0, array.shape[0])

    @_reads
    def shape(self, path: str) -> tuple[int, ...]:
        """Shape of the array at ``path``, without reading it."""
        return tuple(self.root[path].shape)

    @_reads
    def read_rows(self, path: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop), decoded a few chunks at a time into one output array, so a
        large read holds little beyond its result."""
        return array_io.read_rows(self.root[path], start, stop)

    @_reads
    def read_rows_transposed(self, path: str, bounds: Sequence[int]) -> list[np.ndarray]:
        """Rows [bounds[j], bounds[j + 1]) of a 2-D array, each part returned transposed
        (columns, rows) and C-contiguous, decoded one chunk at a time (a decoded chunk and
        its rows are all that is held beside the result)."""
        return array_io.read_rows_transposed(self.root[path], bounds)

    def write(
        self,
        path: str,
        data: np.ndarray,
        *,
        attrs: Mapping[str, Any] | None = None,
        chunk_rows: int | None = None,
        compress: bool = True,
        cache: bool = False,
    ) -> None:
        """Write a whole array (replacing one at ``path``), chunked along rows.

        ``compress=False`` for short-lived checkpoints of noise-like floats, which compression
        would only slow down. ``cache``: the array is kept only to be reused (scores), so a
        read-only store skips it."""
        if cache and self.read_only:
            return
        self._write(path, data, attrs=attrs, chunk_rows=chunk_rows, compress=compress)

    @_writes
    def _write(
        self,
        path: str,
        data: np.ndarray,
        *,
        attrs: Mapping[str, Any] | None,
        chunk_rows: int | None,
        compress: bool,
    ) -> None:
        array_io.write_array(
            self.root, path, data, attrs=attrs, chunk_rows=chunk_rows, compress=compress
        )

    @_writes
    def create_rows(
        self,
        path: str,
        shape: tuple[int, ...],
        dtype: str,
        *,
        chunk_rows: int,
        compress: bool = True,
        chunk_columns: int | None = None,
    ) -> None:
        """An empty row-chunked array at ``path`` (replacing one), filled by :meth:`write_rows`
        (or, given ``chunk_columns``, chunked by columns too and filled by either)."""
        array_io.create_rows(
            self.root,
            path,
            shape,
            dtype,
            chunk_rows=chunk_rows,
            compress=compress,
            chunk_columns=chunk_columns,
        )

    @_reads
    def read_columns(self, path: str, start: int, stop: int) -> np.ndarray:
        """Columns [start, stop) of every row of a 2-D array: (rows, stop - start)."""
        return array_io.read_columns(self.root[path], start, stop)

    @_writes
    def write_columns(self, path: str, start: int, data: np.ndarray) -> None:
        """Overwrite columns [start, start + data.shape[1]) of every row of a 2-D array."""
        array_io.write_columns(self.root[path], start, data)

    @_writes
    def write_rows(self, path: str, start: int, data: np.ndarray) -> None:
        """Overwrite rows [start, start + len(data)) of an existing array, a few chunks at a
        time (writing the same rows again gives the same array: safe to redo)."""
        array_io.write_rows(self.root[path], start, data)

    def write_bytes(
        self, path: str, payload: bytes, *, attrs: Mapping[str, Any] | None = None
    ) -> None:
        """Store a byte string (a serialised index, a checkpoint) as a uint8 array."""
        self.write(
            path, np.frombuffer(payload, dtype=np.uint8).copy(), attrs=attrs, chunk_rows=1 << 24
        )

    def read_bytes(self, path: str) -> bytes:
        """A byte blob stored by :meth:`write_bytes` (a serialised FAISS index)."""
        return self.read(path).tobytes()

    def delete(self, path: str) -> None:
        """Remove the group or array at ``path``; within :meth:`restoring_on_failure` it is
        moved aside instead, to come back if the command fails. Nothing to remove is no
        write (a read-only store takes it)."""
        if path not in self.root:
            return
        self._delete(path)

    @_writes
    def _delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError, KeyError):  # or another process did first
            if path not in self.root:
                return
            if self._put_aside(path):  # within restoring_on_failure: kept to come back
                return
            del self.root[path]

    @_writes
    def row_chunks(
        self,
        path: str,
        n_rows: int,
        chunk_rows: int,
        arrays: Mapping[str, tuple[tuple[int, ...], str]],
        *,
        shared: bool = False,
        meta: Mapping[str, Any] | None = None,
    ) -> RowChunks:
        """Create (or reopen) the row-chunked arrays of stage ``path``.

        ``arrays`` maps a name to (trailing shape, dtype); every array gets ``n_rows`` rows in
        chunks of ``chunk_rows``. Existing arrays of the right shape are kept for resuming.
        ``meta`` (e.g. the batch size) is stored with the ``done`` markers when they are
        created and read back by every later writer (:attr:`RowChunks.meta`), so all shards
        and resumes compute alike. ``shared``: other processes create the same arrays at the
        same time; arrays are then only ever created, never overwritten.
        """
        return open_row_chunks(
            self.root[path], path, n_rows, chunk_rows, arrays, shared=shared, meta=meta, owner=self
        )

    @_writes
    def flags(self, path: str, name: str, size: int, *, shared: bool = False) -> Flags:
        """The flag vector ``path/name`` of ``size`` entries (created all False if absent;
        ``shared``: created only, never overwritten, as concurrent writers need)."""
        return open_flags(self.root[path], name, size, shared=shared)

    def walk(self, path: str = "") -> Iterator[tuple[str, Any]]:
        """(path, node) for every group and array below ``path``."""
        node = self.root[path] if path else self.root
        if isinstance(node, zarr.Group):
            for name in _member_names(node):
                child = f"{path}/{name}" if path else name
                yield child, node[name]
                yield from self.walk(child)

    def _filesystem(self):
        import fsspec

        fs, base = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return fs, base.rstrip("/")
