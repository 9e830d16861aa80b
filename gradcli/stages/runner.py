"""How every stage is run: open it for a record on the writer rank, invalidate what is
computed from it, compute, mark it complete.

A stage's record (its provenance) names what it was computed from. Opening a stage whose
complete record matches means there is nothing to do; a stage with another record is refused
(or replaced with ``overwrite``); an incomplete one resumes. Whenever a stage is (re)computed,
its dependants in :mod:`gradcli.layout`'s stage graph are deleted first, so nothing stale
survives it. Under torchrun rank 0 alone writes and every rank learns the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gradcli import layout
from gradcli.stages.context import RunContext


def open_stage(
    run: RunContext,
    path: str,
    record: Mapping[str, Any],
    *,
    overwrite: bool = False,
    replace: bool = False,
    what: str | None = None,
    shared: bool = False,
    invalidate: Sequence[str] | None = None,
    collective: bool = True,
) -> bool:
    """Open stage ``path`` for ``record``; True when it is complete for it already.

    ``overwrite``: a stage of another record is replaced rather than refused. ``replace``:
    the stage is recomputed even when complete. ``invalidate``: what to delete when the stage
    is (re)computed (default :func:`gradcli.layout.dependants` of ``path``). ``shared``: other
    processes open it at once (``--shard``); nothing is deleted then. ``collective=False``:
    this process opens it itself (a stage that runs per process, not across ranks)."""
    stale = layout.dependants(path) if invalidate is None else tuple(invalidate)

    def open_on_writer() -> bool:
        if replace:
            for doomed in (path, *stale):
                run.store.delete(doomed)
        done = run.store.open_stage(path, record, overwrite=overwrite, what=what, shared=shared)
        if not done and not shared:
            for doomed in stale:
                run.store.delete(doomed)
        return done

    if shared or not collective:
        return open_on_writer()
    return run._on_writer(open_on_writer)


def complete_stage(run: RunContext, path: str, collective: bool = True, **summary: Any) -> None:
    """Mark stage ``path`` complete (on the writer rank) with its summary attrs."""
    if not collective:
        run.store.complete_stage(path, **summary)
        return
    run._on_writer(lambda: run.store.complete_stage(path, **summary), value=False)


def run_stage(
    run: RunContext,
    path: str,
    record: Mapping[str, Any],
    compute: Callable[[], Mapping[str, Any] | None],
    **open_options: Any,
) -> bool:
    """Open stage ``path`` (see :func:`open_stage`), and unless it is complete already,
    ``compute()`` it (on every rank; the writer rank writes its arrays) and mark it complete
    with the summary ``compute`` returns. True when the stage was reused as it was."""
    if open_stage(run, path, record, **open_options):
        return True
    summary = compute() or {}
    complete_stage(run, path, open_options.get("collective", True), **summary)
    return False
