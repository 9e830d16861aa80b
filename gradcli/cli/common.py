"""What every command does around the library call: open the run (progress, stop requests,
storage options) and print its summary (text, or JSON with ``--json``).

Separate from the commands so that a run is opened and a summary printed one way, and tests
can replace :func:`open_run` in one place.
"""

from __future__ import annotations

import json
import os
import sys

from rich.console import Console

from gradcli.cli.app import StopRequests, err
from gradcli.cli.options import DEFAULT_BAD_IMAGE, DEFAULT_BASIS_DTYPE, STORAGE_OPTIONS_ENV
from gradcli.errors import BadInputError


def out() -> Console:
    """Console for results on stdout; wide when piped, so tables stay one row per method."""
    return Console() if sys.stdout.isatty() else Console(width=240)


def open_run(
    store: str,
    device: str,
    data_root: str | None,
    quiet: bool,
    workers: int | None,
    create: bool = False,
    memory_budget: str | None = None,
    basis_dtype: str = DEFAULT_BASIS_DTYPE,
    on_bad_image: str = DEFAULT_BAD_IMAGE,
    group=None,
):
    """The :class:`gradcli.run.Run` of ``store``, with progress bars on stderr (none when
    ``quiet`` or not the writing rank) and SIGINT/SIGTERM as stop requests."""
    from gradcli.progress import NullProgress, RichProgress
    from gradcli.run import Run

    quiet = quiet or (group is not None and not group.is_writer)  # one progress bar per job
    progress = NullProgress() if quiet else RichProgress(err)
    stop = StopRequests()
    stop.install()
    return Run(
        store,
        device=device,
        data_root=data_root,
        progress=progress,
        num_workers=workers,
        create=create,
        memory_budget=memory_budget or None,
        basis_dtype=basis_dtype,
        on_bad_image=on_bad_image,
        should_stop=stop,
        group=group,
        storage_options=storage_options(),
    )


def storage_options() -> dict | None:
    """The fsspec storage options of ``GRADCLI_STORAGE_OPTIONS`` (a JSON object), if set."""
    text = os.environ.get(STORAGE_OPTIONS_ENV)
    if not text:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadInputError(f"{STORAGE_OPTIONS_ENV} is not valid JSON ({error})") from None
    if not isinstance(options, dict):
        raise BadInputError(f'{STORAGE_OPTIONS_ENV} must be a JSON object, e.g. {{"anon": true}}')
    return options


def emit(summary: dict, as_json: bool, text: str | None = None) -> None:
    """``summary`` as JSON on stdout with ``--json``, else ``text``."""
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
    elif text:
        out().print(text, highlight=False)


def with_preprocess(text: str, summary: dict) -> str:
    """``text`` and, when the summary has one, the model's preprocessing line."""
    entry = summary.get("preprocess")
    return f"{text}\npreprocess: {entry['text']}" if entry else text
