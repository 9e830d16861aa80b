"""Provenance records: what each stage was computed from, and the stage lifecycle built on it.

Every stage group carries a record (model hash, parameter selection, K, dataset fingerprint,
upstream digests, options) with its digest and a ``complete`` flag. Opening a stage whose
record differs is an error that names the difference and the command that recomputes it,
never a silent reuse. This is kept apart from how arrays are stored: it decides whether
stored work may be reused, not how it is read or written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from zarr.errors import ContainsArrayError, ContainsGroupError

from gradcli import layout
from gradcli.errors import StaleStoreError
from gradcli.store.arrays import _writes

PROVENANCE = "provenance"
DIGEST = "digest"
COMPLETE = "complete"


def _recompute(path: str, record: Mapping[str, Any], url: str) -> str:
    """How to recompute the stage at ``path``: the command that has --overwrite."""
    stage, _, rest = path.partition("/")
    command = layout.overwritten_by(path)
    if command == "embed" and record.get("dataset"):
        return (
            f"recompute it with 'gradcli embed --dataset {record['dataset']} --name {rest} "
            f"--store {url} --overwrite'"
        )
    if command:
        return f"recompute it with 'gradcli {command} ... --overwrite'"
    return "recompute it with --overwrite"


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


class Stages:
    """Opening, completing and identifying the stage groups of a :class:`RunStore` by their
    provenance records (a part of the run store, mixed into it)."""

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
