"""Progress bars (rich) that stay quiet when output is not a terminal or MITOBENCH_QUIET is set."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def _enabled() -> bool:
    return not os.environ.get("MITOBENCH_QUIET") and sys.stderr.isatty()


def say(message: str) -> None:
    """A status line on stderr (also in a log file, where bars are hidden), unless MITOBENCH_QUIET is set."""
    if not os.environ.get("MITOBENCH_QUIET"):
        console.print(message)


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; shows a bar only on an interactive terminal."""
    if not _enabled():
        yield lambda n=1: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
