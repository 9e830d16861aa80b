"""Integrity of what is stored: finding chunks whose CRC32C checksum fails (bytes changed on
disk), naming them in one-line errors, and saying what rewrites them.

Every array is written with a checksum codec (:func:`.arrays.codecs`), so damage shows up as
a chunk that fails to decode; this module turns that, or an array that is missing, into an
error naming the array, its rows and the command that repairs it. It is separate from how
arrays are read so that the read path stays plain and the diagnosis lives in one place.
"""

from __future__ import annotations

import functools

import zarr

from gradcli import layout
from gradcli.errors import StaleStoreError
from gradcli.store.records import PROVENANCE


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


class Integrity:
    """Damage reports and repair hints of a :class:`RunStore` (a part of the run store,
    mixed into it)."""

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
        command = layout.overwritten_by(path)
        if stage == layout.EMBED and rest:
            name = rest.split("/", 1)[0]
            record = self.group_attrs(layout.embedding(name)).get(PROVENANCE) or {}
            dataset = record.get("dataset") or "SPEC"
            return f"rerun 'gradcli embed --overwrite --name {name} --dataset {dataset}'"
        if command is not None and stage != layout.EMBED:
            return f"rerun 'gradcli {command} ... --overwrite' (or use a new --store)"
        if layout.is_derived(path):
            where = "/".join(path.split("/")[:2])
            return f"delete {where} from the store (it is recomputed) and rerun"
        return "restore the store from a copy, or use a new --store"
