"""Progress bars for long steps: live on a terminal, progress lines under `parti run`.

On a terminal a rich bar is drawn. Inside a pipeline step run by `parti run` (which sets
`PARTI_PROGRESS_LINES`), the step prints `PROGRESS_PREFIX <description> <done>/<total>`
lines at most once a second instead; the local runner reads them from the step's output
and draws one bar for the whole run. Elsewhere (a cluster's pod logs) nothing is drawn.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

T = TypeVar("T")

LINES_ENV = "PARTI_PROGRESS_LINES"
PROGRESS_PREFIX = "parti-progress:"
_INTERVAL_S = 1.0


def _progress() -> Progress:
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    return Progress(*columns, TimeElapsedColumn(), disable=not sys.stderr.isatty())


class _Lines:
    """`update(done, total)` printed as a progress line, at most once per interval."""

    def __init__(self, description: str) -> None:
        self.description = description.replace(" ", "-")
        self.last = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self.last < _INTERVAL_S and done != total:
            return
        self.last = now
        print(f"{PROGRESS_PREFIX} {self.description} {done}/{total or 0}", flush=True)


def _lines_wanted() -> bool:
    return os.environ.get(LINES_ENV) == "1"


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over `items` with a progress bar (or progress lines, see the module)."""
    if _lines_wanted():
        update = _Lines(description)
        for done, item in enumerate(items, 1):
            yield item
            update(done, total)
        return
    with _progress() as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A bar driven by `update(done, total)`, for loops that count on their own (training)."""
    if _lines_wanted():
        yield _Lines(description)
        return
    with _progress() as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def parse_progress(line: str) -> tuple[str, int, int] | None:
    """(description, done, total) of a progress line, None for any other line."""
    text = line.strip()
    if not text.startswith(PROGRESS_PREFIX):
        return None
    try:
        description, counts = text[len(PROGRESS_PREFIX) :].split()
        done, total = (int(n) for n in counts.split("/"))
    except ValueError:
        return None
    return description.replace("-", " "), done, total
