"""Progress for people watching a terminal: sites done per source and errors so far.

Under cron (stderr not a terminal) nothing is drawn; structured logs are the record there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol


class ProgressSink(Protocol):
    def start(self, source: str, total: int) -> None: ...

    def update(self, source: str, done: int, errors: int) -> None: ...


class NoProgress:
    """The sink for cron and tests: accepts updates, draws nothing."""

    def start(self, source: str, total: int) -> None:
        return None

    def update(self, source: str, done: int, errors: int) -> None:
        return None


class _RichProgress:
    def __init__(self, progress) -> None:
        self._progress = progress
        self._tasks: dict[str, int] = {}

    def start(self, source: str, total: int) -> None:
        self._tasks[source] = self._progress.add_task(f"{source:<7}", total=total, errors=0)

    def update(self, source: str, done: int, errors: int) -> None:
        self._progress.update(self._tasks[source], completed=done, errors=errors)


@contextlib.contextmanager
def terminal_progress(enabled: bool) -> Iterator[ProgressSink]:
    """A live display on stderr when `enabled` (a terminal), else a sink that draws nothing."""
    if not enabled:
        yield NoProgress()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("sites"),
        TextColumn("[red]{task.fields[errors]} errors"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    with progress:
        yield _RichProgress(progress)
