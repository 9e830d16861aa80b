"""The run store: one Zarr v3 group per run, the only module that touches zarr.

Every stage writes into its own group whose attrs carry a *provenance* record: what the
stage was computed from (model hash, parameter selection, K, dataset fingerprint, upstream
digests, options). Reopening a stage with a different provenance is an error that names the
difference, never a silent reuse. Row-chunked arrays get one ``done`` marker per chunk (an
array with chunk size 1), so concurrent writers never share a marker object and a killed run
resumes at the first chunk that is not done.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import json
import os
import shutil
import socket
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.errors import ContainsArrayError, ContainsGroupError
from zarr.storage import FsspecStore, LocalStore, MemoryStore

from gradcli import __version__
from gradcli.errors import BadInputError, Interrupted, StaleStoreError

FORMAT_VERSION = 1
PROVENANCE = "provenance"
DIGEST = "digest"
COMPLETE = "complete"
# Whole-array writes cap a chunk at this many bytes (a basis row block of any width stays a
# modest object), and reads and writes move a few chunks at a time.
MAX_CHUNK_BYTES = 32 << 20
SLAB_CHUNKS = 4
TRANSPOSE_ROWS = 1024  # rows per block of a transposing copy
ASIDE = ".replaced"  # what a running command replaces, kept until it succeeds
LOCKS = ".locks"  # which process computes which stage, while it runs
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


_REWRITTEN_BY = {
    "stats": "extract-subspace",
    "subspace": "extract-subspace",
    "embed": "embed",
    "head": "fit-head",
    "detectors": "fit-head",
}


def _recompute(path: str, record: Mapping[str, Any], url: str) -> str:
    """How to recompute the stage at ``path``: the command that has --overwrite."""
    stage, _, rest = path.partition("/")
    command = _REWRITTEN_BY.get(stage)
    if command == "embed" and record.get("dataset"):
        return (
            f"recompute it with 'gradcli embed --dataset {record['dataset']} --name {rest} "
            f"--store {url} --overwrite'"
        )
    if command:
        return f"recompute it with 'gradcli {command} ... --overwrite'"
    return "recompute it with --overwrite"


def _reads(method):
    """Turn an array that is missing or cannot be decoded (a store damaged by hand or by a
    failing disk) into a one-line error naming it and the command that rewrites it."""

    @functools.wraps(method)
    def wrapper(self, path: str, *args, **kwargs):
        try:
            return method(self, path, *args, **kwargs)
        except (KeyError, RuntimeError, ValueError, OSError) as err:
            if "checksum" in str(err).lower():
                raise self.damage_error(path) from None
            try:
                fix = self.repair_hint(path)
            except Exception:  # the stage's own record is unreadable too
                fix = "restore the store from a copy, or use a new --store"
            if isinstance(err, KeyError):
                problem = "is missing"
            else:
                reason = " ".join(str(err).split())[:120]
                problem = f"cannot be read ({type(err).__name__}: {reason})"
            raise StaleStoreError(
                f"{path} in store {self.url} {problem}; the store looks damaged: {fix}"
            ) from None

    return wrapper


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def digest_of(record: Mapping[str, Any]) -> str:
    """A short, stable hash of a JSON-able record (sorted keys)."""
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        if old.get(key) != new.get(key):
            out.append(f"{key} {_short(old.get(key))} -> {_short(new.get(key))}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


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


class RunStore:
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
        self._locks: list[Path] = []  # its claims on the stages it computes
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

    def damaged_rows(self, path: str) -> list[tuple[int, int]]:
        """Row ranges [start, stop) of the chunks of array ``path`` that fail to decode (a
        checksum that does not match: bytes changed on disk); one chunk at a time."""
        array = self.root[path]
        if array.ndim == 0:
            try:
                array[...]
            except (ValueError, RuntimeError, OSError):
                return [(0, 1)]
            return []
        try:  # one read of the whole array when nothing is damaged
            array[...]
            return []
        except (ValueError, RuntimeError, OSError):
            pass
        step = int(array.chunks[0])
        bad = []
        for first in range(0, array.shape[0], step):
            last = min(first + step, array.shape[0])
            try:
                array[first:last]
            except (ValueError, RuntimeError, OSError):
                if bad and bad[-1][1] == first:
                    bad[-1] = (bad[-1][0], last)
                else:
                    bad.append((first, last))
        return bad

    def damaged_arrays(self, max_bytes: int) -> list[dict]:
        """Every array of up to ``max_bytes`` with chunks that fail their checksum: its path,
        the row ranges [start, stop) of those chunks, and what rewrites it."""
        found = []
        for path, node in self.walk():
            if not isinstance(node, zarr.Array) or node.nbytes > max_bytes:
                continue
            rows = self.damaged_rows(path)
            if rows:
                found.append(
                    {"array": path, "rows": [list(r) for r in rows], "fix": self.repair_hint(path)}
                )
        return found

    def damage_error(self, path: str) -> StaleStoreError:
        """The one-line error for array ``path`` with chunks that fail their checksum: which
        rows, and what rewrites them."""
        ranges = self.damaged_rows(path)
        shown = ", ".join(f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in ranges[:3])
        rows = f"rows {shown}{' ...' if len(ranges) > 3 else ''}" if ranges else "some rows"
        return StaleStoreError(
            f"{path} in store {self.url} is damaged: {rows} fail their checksum (changed on "
            f"disk); {self.repair_hint(path)}"
        )

    def repair_hint(self, path: str) -> str:
        """What rewrites the stage holding ``path``."""
        stage, _, rest = path.partition("/")
        if stage == "embed" and rest:
            name = rest.split("/", 1)[0]
            record = self.group_attrs(f"embed/{name}").get(PROVENANCE) or {}
            dataset = record.get("dataset") or "SPEC"
            return f"rerun 'gradcli embed --overwrite --name {name} --dataset {dataset}'"
        if stage in ("stats", "subspace"):
            return "rerun 'gradcli extract-subspace ... --overwrite' (or use a new --store)"
        if stage in ("head", "detectors"):
            return "rerun 'gradcli fit-head ... --overwrite' (or use a new --store)"
        if stage in ("scores", "scores_parts", "flags", "calibration", "results"):
            where = "/".join(path.split("/")[:2])
            return f"delete {where} from the store (it is recomputed) and rerun"
        return "restore the store from a copy, or use a new --store"

    def _discard_if_unused(self) -> None:
        """Remove a store the running command made and wrote no chunk into (its first
        command failed), and the folders made for it, so that nothing is left behind."""
        if self._made_folder is None or self._root is None:
            return
        if any(
            node.nchunks_initialized > 0 for _, node in self.walk() if isinstance(node, zarr.Array)
        ):
            return
        shutil.rmtree(self._made_folder, ignore_errors=True)
        self._root, self._made_folder = None, None

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
        array = self.root[path]
        stop = min(stop, array.shape[0])
        out = np.empty((max(0, stop - start), *array.shape[1:]), dtype=array.dtype)
        step = int(array.chunks[0]) * SLAB_CHUNKS
        first = start
        while first < stop:
            last = min(stop, (first // step + 1) * step)
            out[first - start : last - start] = array[first:last]
            first = last
        return out

    @_reads
    def read_rows_transposed(self, path: str, bounds: Sequence[int]) -> list[np.ndarray]:
        """Rows [bounds[j], bounds[j + 1]) of a 2-D array, each part returned transposed
        (columns, rows) and C-contiguous, decoded one chunk at a time (a decoded chunk and
        its rows are all that is held beside the result)."""
        array = self.root[path]
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
        data = np.ascontiguousarray(data)
        chunks = None
        if data.ndim >= 1:
            row_bytes = max(1, data[:1].nbytes)
            rows = max(1, min(data.shape[0], chunk_rows or data.shape[0] or 1))
            rows = min(rows, max(1, MAX_CHUNK_BYTES // row_bytes))
            chunks = (rows, *data.shape[1:])
        array = self.root.create_array(
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

    @_writes
    def create_rows(
        self,
        path: str,
        shape: tuple[int, ...],
        dtype: str,
        *,
        chunk_rows: int,
        compress: bool = True,
    ) -> None:
        """An empty row-chunked array at ``path`` (replacing one), filled by :meth:`write_rows`."""
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
        rows = max(1, min(chunk_rows, MAX_CHUNK_BYTES // max(1, row_bytes)))
        self.root.create_array(
            path,
            shape=shape,
            dtype=dtype,
            chunks=(rows, *shape[1:]),
            overwrite=True,
            fill_value=0,
            compressors=codecs(compress),
        )

    @_writes
    def write_rows(self, path: str, start: int, data: np.ndarray) -> None:
        """Overwrite rows [start, start + len(data)) of an existing array, a few chunks at a
        time (writing the same rows again gives the same array: safe to redo)."""
        array = self.root[path]
        step = int(array.chunks[0]) * SLAB_CHUNKS
        for first in range(0, data.shape[0], step):
            last = min(first + step, data.shape[0])
            array[start + first : start + last] = data[first:last]

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
            if self._aside is not None and not self._made_here(path):
                aside = f"{self._aside_dir}/{len(self._aside)}"
                if self._move(path, aside):
                    self._aside.append((path, aside))
                    return
            del self.root[path]

    # -- failure safety ----------------------------------------------------------------
    @contextlib.contextmanager
    def restoring_on_failure(self) -> Iterator[None]:
        """Run one command so that a failure (bad input found late, a full disk) leaves what
        was already there: the groups it replaces are moved aside rather than deleted, and
        come back with the root record (the model) if it fails. Success or an interruption
        drops them: an interrupted command's own results are what its rerun resumes. A stage
        the failed command opened afresh and wrote no chunk of goes too, so that its record
        (a dataset that has since been mended, an option since corrected) does not stand in
        the way of the corrected command."""
        if self._aside is not None or self.read_only:  # nested: the outermost command decides
            yield
            return
        new = not self.exists
        self._drop_orphaned_asides()
        token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._aside, self._aside_dir = [], f"{ASIDE}/{token}"
        self._created = []
        attrs = self.attrs
        try:
            yield
        except (Interrupted, KeyboardInterrupt):
            self._end_aside(restore_attrs=None)
            raise
        except BaseException:
            if new:  # what a store is made with, whatever the failed command recorded after
                stamp = ("gradcli_version", "format_version", "created")
                attrs = {k: v for k, v in self.attrs.items() if k in stamp}
            self._end_aside(restore_attrs=attrs)
            if new:  # its first command failed: leave no store behind
                self._discard_if_unused()
            raise
        else:
            self._end_aside(restore_attrs=None)

    def _made_here(self, path: str) -> bool:
        """Whether ``path`` lies in a stage the running command opened afresh: its own work,
        deleted outright (moving it would copy it on an object store) rather than kept."""
        return any(path == stage or path.startswith(stage + "/") for stage in self._created)

    def _end_aside(self, restore_attrs: dict[str, Any] | None) -> None:
        try:
            self._restore_or_drop(restore_attrs)
        finally:
            for lock in self._locks:
                with contextlib.suppress(OSError):
                    lock.unlink()
                with contextlib.suppress(OSError):  # others may hold claims still
                    lock.parent.rmdir()
            self._locks = []

    def _restore_or_drop(self, restore_attrs: dict[str, Any] | None) -> None:
        moved, self._aside = self._aside or [], None
        created = self._created
        if restore_attrs is not None:
            try:
                for path in created:
                    unfinished = path in self.root and not self.stage_complete(path)
                    if unfinished and not self._holds_chunks(path):
                        del self.root[path]
                for path, aside in reversed(moved):
                    if path in self.root:  # what the failed command wrote there
                        del self.root[path]
                    self._move(aside, path)
                if self.attrs != restore_attrs:
                    self.root.attrs.put(restore_attrs)
            except Exception:  # keep what is aside rather than lose it; the first error wins
                self._created = []
                return
        self._created = []
        self._remove_aside(self._aside_dir)

    def _move(self, source: str, target: str) -> bool:
        """Rename a group or array within the store (a rename on a local disk, fsspec's
        ``mv`` elsewhere); False where the store cannot."""
        store = self.root.store
        if isinstance(store, LocalStore):
            destination = Path(store.root) / target
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(Path(store.root) / source, destination)
            return True
        if isinstance(store, FsspecStore):
            fs, base = self._filesystem()
            fs.mv(f"{base}/{source}", f"{base}/{target}", recursive=True)
            return True
        return False

    def _claim(self, path: str, what: str | None) -> None:
        """While a command runs (:meth:`restoring_on_failure`) on a local disk, the stages it
        computes are its alone: a second process computing the same stage (two PCAs started on
        one store) stops with a one-line error instead of overwriting the first one's
        checkpoints. A claim whose process is gone (killed) is taken over."""
        store = self.root.store
        if self._aside is None or not isinstance(store, LocalStore):
            return
        lock = Path(store.root) / LOCKS / (path.replace("/", "~") + ".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                handle = None
            if handle is not None:
                with os.fdopen(handle, "w") as file:
                    file.write(me)
                self._locks.append(lock)
                return
            try:
                owner = lock.read_text().strip()
            except OSError:  # released meanwhile
                continue
            host, _, pid = owner.rpartition(" ")
            if owner == me:
                return
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    lock.unlink()  # left by a killed process
                continue
            raise BadInputError(
                f"another gradcli process (pid {pid} on {host}) is computing {what or path} in "
                f"{self.url}; wait for it to finish, or use another --store"
            )

    def _holds_chunks(self, path: str) -> bool:
        """Whether any array at or below ``path`` has a chunk written (finished work)."""
        node = self.root[path]
        if isinstance(node, zarr.Array):
            return node.nchunks_initialized > 0
        return any(
            child.nchunks_initialized > 0
            for _, child in self.walk(path)
            if isinstance(child, zarr.Array)
        )

    def _drop_orphaned_asides(self) -> None:
        """Remove what killed commands (``kill -9``) of this host left aside on a local disk:
        folders whose process is gone. Another host's, or a live process's, are left alone."""
        if "://" in self.url:
            return
        folder = Path(self.url) / ASIDE
        host = socket.gethostname()
        with contextlib.suppress(OSError):
            for entry in folder.iterdir():
                name, _, rest = entry.name.rpartition("-")[0].rpartition("-")
                if name == host and rest.isdigit() and not _alive(int(rest)):
                    shutil.rmtree(entry, ignore_errors=True)

    def _remove_aside(self, folder: str) -> None:
        store = self.root.store
        if "://" not in self.url:
            shutil.rmtree(Path(self.url) / folder, ignore_errors=True)
            with contextlib.suppress(OSError):  # another command may use it too
                (Path(self.url) / ASIDE).rmdir()
        elif isinstance(store, FsspecStore):
            fs, base = self._filesystem()
            with contextlib.suppress(FileNotFoundError, OSError):
                fs.rm(f"{base}/{folder}", recursive=True)

    def _filesystem(self):
        import fsspec

        fs, base = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return fs, base.rstrip("/")

    # -- stages ------------------------------------------------------------------------
    def open_stage(
        self,
        path: str,
        provenance: Mapping[str, Any],
        *,
        overwrite: bool = False,
        what: str | None = None,
        shared: bool = False,
    ) -> bool:
        """Make sure the stage group at ``path`` belongs to ``provenance``.

        Returns True when the stage is already complete. A stage with another provenance is
        an error (or is deleted when ``overwrite``); a missing one is created empty.

        ``shared``: other processes open the same stage at the same time (``embed --shard``).
        The group is then created in one write with its provenance, without overwriting one
        another process made first, and nothing is ever deleted.

        On a read-only store a complete stage of this provenance is all there can be; any
        other is an error naming it.
        """
        if self.read_only:
            attrs = self.group_attrs(path)
            if attrs.get(PROVENANCE) == dict(provenance) and attrs.get(COMPLETE, False):
                return True
            raise self.read_only_error(what or path)
        return self._open_stage(path, provenance, overwrite=overwrite, what=what, shared=shared)

    @_writes
    def _open_stage(
        self,
        path: str,
        provenance: Mapping[str, Any],
        *,
        overwrite: bool,
        what: str | None,
        shared: bool,
    ) -> bool:
        record = dict(provenance)
        if shared:
            return self._open_shared_stage(path, record, what)
        if path in self.root:
            existing = self.root[path].attrs.get(PROVENANCE)
            if existing is not None and existing != record:
                if not overwrite:
                    diffs = "; ".join(_differences(existing, record)[:3])
                    label = what or path
                    raise StaleStoreError(
                        f"{label} in {self.url} was computed from something else ({diffs}); "
                        f"{_recompute(path, record, self.url)}, or use a new --store"
                    )
                self._claim(path, what)
                self.delete(path)
            elif existing is not None:
                if self.root[path].attrs.get(COMPLETE, False):
                    return True
                self._claim(path, what)  # resumed: by this process alone
                return False
            else:
                self._claim(path, what)
                self.delete(path)
        else:
            self._claim(path, what)
        if self._aside is not None:
            self._created.append(path)
        group = self.root.require_group(path)
        group.attrs.update({PROVENANCE: record, DIGEST: digest_of(record), COMPLETE: False})
        return False

    def _open_shared_stage(self, path: str, record: dict[str, Any], what: str | None) -> bool:
        attrs = {PROVENANCE: record, DIGEST: digest_of(record), COMPLETE: False}
        if path not in self.root:
            with contextlib.suppress(ContainsGroupError, ContainsArrayError, FileExistsError):
                self.root.create_group(path, attributes=attrs)  # or another shard did first
        existing = self.root[path].attrs.asdict()
        if existing.get(PROVENANCE) is None:  # made by an older writer without provenance
            self.root[path].attrs.update(attrs)
        elif existing[PROVENANCE] != record:
            diffs = "; ".join(_differences(existing[PROVENANCE], record)[:3])
            raise StaleStoreError(
                f"{what or path} in {self.url} was computed from something else ({diffs}); "
                "shards never delete: use a new --name or --store, or "
                + (
                    "rerun 'gradcli score' once without --shard"
                    if path.startswith("scores/")
                    else _recompute(path, record, self.url) + " once, without --shard"
                )
            )
        return bool(self.root[path].attrs.get(COMPLETE, False))

    @_writes
    def complete_stage(self, path: str, **summary: Any) -> None:
        """Mark a stage finished, storing a summary of it in its attrs."""
        self.root[path].attrs.update({**summary, COMPLETE: True})

    def stage_complete(self, path: str) -> bool:
        """Whether the stage at ``path`` was marked complete by :meth:`complete_stage`."""
        return path in self.root and bool(self.root[path].attrs.get(COMPLETE, False))

    def stage_digest(self, path: str) -> str | None:
        """The digest of a stage's provenance, which downstream stages record; None if absent."""
        return self.root[path].attrs.get(DIGEST) if path in self.root else None

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
        group = self.root[path]
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
                        f"{path}/{name} in {self.url} has shape {tuple(group[name].shape)}, not "
                        f"{spec['shape']}; use a new --name or --store"
                    )
            else:
                group.create_array(name, overwrite=True, **spec)
        return RowChunks(group=group, n_rows=n_rows, chunk_rows=chunk_rows, owner=self)

    @_writes
    def flags(self, path: str, name: str, size: int, *, shared: bool = False) -> Flags:
        """The flag vector ``path/name`` of ``size`` entries (created all False if absent;
        ``shared``: created only, never overwritten, as concurrent writers need)."""
        group = self.root[path]
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

    def walk(self, path: str = "") -> Iterator[tuple[str, Any]]:
        """(path, node) for every group and array below ``path``."""
        node = self.root[path] if path else self.root
        if isinstance(node, zarr.Group):
            for name in _member_names(node):
                child = f"{path}/{name}" if path else name
                yield child, node[name]
                yield from self.walk(child)
