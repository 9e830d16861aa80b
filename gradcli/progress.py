"""Progress reporting that the library can call without knowing who is watching.

Library code asks for ``progress.task(description, total)`` and calls ``advance(n)``; the
CLI passes a :class:`RichProgress` (bars on stderr), Python users get silence by default.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
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


INTERVAL_ENV = "GRADCLI_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0  # seconds between plain progress lines


def _interval() -> float:
    """Seconds between plain progress lines: env GRADCLI_PROGRESS_INTERVAL, else 30."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return value if math.isfinite(value) and value >= 0 else DEFAULT_INTERVAL


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


class PlainProgress:
    """Plain progress lines for a log file: one when a stage starts, then one every
    ``interval`` seconds or every 10% (whichever comes first), and one when it ends; each
    line is flushed at once, so ``tail -f`` on a batch job's log shows where it is."""

    def __init__(self, console: Console | None = None, interval: float | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.interval = _interval() if interval is None else interval

    def _line(self, text: str) -> None:
        handle = self.console.file
        handle.write(text + "\n")
        handle.flush()

    def _status(self, description: str, done: int, total: int | None, start: float) -> str:
        elapsed = time.monotonic() - start
        if total:
            share = done / total
            left = f", {_clock(elapsed * (1 - share) / share)} left" if 0 < share < 1 else ""
            return (
                f"{description}: {done:,}/{total:,} ({100 * share:.0f}%), "
                f"{_clock(elapsed)} elapsed{left}"
            )
        return f"{description}: {done:,} done, {_clock(elapsed)} elapsed"

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        start = last = time.monotonic()
        state = {"done": 0, "tenth": 0, "last": last}
        self._line(f"{description}: started" + (f" ({total:,} steps)" if total else ""))

        def advance(n: int = 1) -> None:
            state["done"] += n
            now = time.monotonic()
            tenth = int(10 * state["done"] / total) if total else 0
            if now - state["last"] >= self.interval or tenth > state["tenth"]:
                state["last"], state["tenth"] = now, tenth
                self._line(self._status(description, state["done"], total, start))

        yield advance
        if not total or state["done"] < total or state["tenth"] < 10:
            self._line(self._status(description, state["done"], total, start) + " (finished)")

    def note(self, message: str) -> None:
        self._line(message)


class RichProgress:
    """Rich progress bars on stderr, one per stage, plus one-line notes; plain lines at an
    interval (:class:`PlainProgress`) when stderr is not a terminal (a log file, a pipe)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._plain = None if self.console.is_terminal else PlainProgress(self.console)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        if self._plain is not None:
            with self._plain.task(description, total) as advance:
                yield advance
            return
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
        if self._plain is not None:  # a log: one unwrapped line
            self._plain.note(message)
            return
        self.console.print(message, highlight=False)
