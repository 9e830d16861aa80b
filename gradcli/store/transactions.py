"""One command as a transaction over the run store: what it replaces is moved aside and comes
back if it fails, and the stages it opened afresh go with it.

A command that fails (bad input found late, a full disk) leaves what was already there: the
groups it replaces are moved under ``.replaced`` rather than deleted, its claims on stages
(:mod:`.locks`) are released, and a store its first command made is removed again. This is
kept apart from reading and writing arrays because it concerns the life of one command, not
the data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zarr
from zarr.storage import FsspecStore, LocalStore

from gradcli.errors import Interrupted
from gradcli.store.locks import _alive

ASIDE = ".replaced"  # what a running command replaces, kept until it succeeds


class Transactions:
    """Failure safety of a :class:`RunStore` (a part of the run store, mixed into it): the
    state lives in its ``_aside``, ``_aside_dir``, ``_created`` and ``_locks``."""

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

    def _put_aside(self, path: str) -> bool:
        """Within :meth:`restoring_on_failure`, move ``path`` aside (to come back if the
        command fails) instead of deleting it; False where it is to be deleted outright."""
        if self._aside is not None and not self._made_here(path):
            aside = f"{self._aside_dir}/{len(self._aside)}"
            if self._move(path, aside):
                self._aside.append((path, aside))
                return True
        return False

    def _end_aside(self, restore_attrs: dict[str, Any] | None) -> None:
        try:
            self._restore_or_drop(restore_attrs)
        finally:
            self._locks.release()

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
        self._locks.claim(Path(store.root), path, what, self.url)

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
