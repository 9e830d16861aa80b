"""The run store: one Zarr v3 group per run; this package is the only code that touches zarr.

The names the rest of gradcli uses are re-exported here, so ``from gradcli.store import ...``
is the one public face.
"""

from gradcli.store.runstore import (
    ASIDE,
    COMPLETE,
    DIGEST,
    FORMAT_VERSION,
    LOCKS,
    MAX_CHUNK_BYTES,
    PROVENANCE,
    RESERVED_KEYS,
    SLAB_CHUNKS,
    TRANSPOSE_ROWS,
    Flags,
    RowChunks,
    RunStore,
    codecs,
    digest_of,
    is_writable,
    open_root,
)

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
