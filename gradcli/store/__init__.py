"""The run store: one Zarr v3 group per run; this package is the only code that touches zarr.

:class:`RunStore` (in :mod:`.runstore`) composes the pieces kept in their own modules:
zarr I/O and codecs (:mod:`.arrays`), row-chunked arrays with done markers (:mod:`.chunks`),
provenance records (:mod:`.records`), checksums and repair hints (:mod:`.integrity`), stage
claims (:mod:`.locks`) and failure safety of one command (:mod:`.transactions`). The names
the rest of gradcli uses are re-exported here, so ``from gradcli.store import ...`` is the
one public face.
"""

from gradcli.store.arrays import (
    MAX_CHUNK_BYTES,
    RESERVED_KEYS,
    SLAB_CHUNKS,
    TRANSPOSE_ROWS,
    codecs,
    is_writable,
    open_root,
)
from gradcli.store.chunks import Flags, RowChunks
from gradcli.store.locks import LOCKS
from gradcli.store.records import COMPLETE, DIGEST, PROVENANCE, digest_of
from gradcli.store.runstore import FORMAT_VERSION, RunStore
from gradcli.store.transactions import ASIDE

__all__ = [
    "ASIDE",
    "COMPLETE",
    "DIGEST",
    "FORMAT_VERSION",
    "LOCKS",
    "MAX_CHUNK_BYTES",
    "PROVENANCE",
    "RESERVED_KEYS",
    "SLAB_CHUNKS",
    "TRANSPOSE_ROWS",
    "Flags",
    "RowChunks",
    "RunStore",
    "codecs",
    "digest_of",
    "is_writable",
    "open_root",
]
