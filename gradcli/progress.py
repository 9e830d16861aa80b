"""Progress reporting that the library can call without knowing who is watching.

Library code asks for ``progress.task(description, total)`` and calls ``advance(n)``; the
CLI passes a :class:`RichProgress` (bars on stderr), Python users get silence by default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Advance = Callable[[int], None]


class NullProgress:
    """Reports nothing."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        yield lambda n=1: None

    def note(self, message: str) -> None:
        pass


class RichProgress:
    """Rich progress bars on stderr, one per stage, plus one-line notes."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console, transient=False) as bar:
            task_id = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task_id, n)

    def note(self, message: str) -> None:
        self.console.print(message, highlight=False)
