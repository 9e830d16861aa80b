"""Progress reporting that the library can call without knowing who is watching.

Library code asks for ``progress.task(description, total)`` and calls ``advance(n)``; the
CLI passes a :class:`RichProgress` (bars on stderr), Python users get silence by default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as Bars

Advance = Callable[[int], None]


class Progress(Protocol):
    """What library code reports to: a bar per stage and one-line notes."""

    def task(
        self, description: str, total: int | None = None
    ) -> contextlib.AbstractContextManager[Advance]: ...

    def note(self, message: str) -> None: ...


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
        with Bars(*columns, console=self.console, transient=False) as bar:
            task_id = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task_id, n)

    def note(self, message: str) -> None:
        self.console.print(message, highlight=False)
